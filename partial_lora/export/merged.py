"""`plr export --merged`: the base with the adapter merged in, saved with its tokenizer/processor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from partial_lora import config
from partial_lora.models.backbones import ModelSpec
from partial_lora.models.source import resolve_source
from partial_lora.working_set.build import Setup


def save_merged(peft_model: Any, s: Setup, spec: ModelSpec, dest: Path) -> list[str]:
    """Merge the adapter into the base and save it with its tokenizer/processor; returns notes."""
    net = peft_model.merge_and_unload()
    notes: list[str] = []
    if spec.family == "timm":
        from timm.models import save_for_hf

        args = {k: v for k, v in config.plain(spec.config).items() if k != "architecture"}
        save_for_hf(net, str(dest), model_args=args, safe_serialization=True)
        notes.append("merged/ is a timm checkpoint (config.json + model.safetensors, with its preprocessing config)")
        return notes
    labels = s.data.label_names
    if labels and not s.data.regression and spec.family != "hf-causal":  # an LM's outputs are its vocabulary
        net.config.id2label = dict(enumerate(labels))
        net.config.label2id = {name: i for i, name in enumerate(labels)}
    net.save_pretrained(str(dest))
    if s.built.tokenizer is not None:
        s.built.tokenizer.save_pretrained(str(dest))
    elif spec.family == "hf-vision" and spec.pretrained:
        _image_processor(spec).save_pretrained(str(dest))
    elif spec.family == "hf-vision":
        notes.append("merged/ has no image processor: a random-init model has none (see Inputs for preprocessing)")
    return notes


def _image_processor(spec: ModelSpec) -> Any:
    from transformers import AutoImageProcessor

    from partial_lora.fetch.hub import load_from_hub

    path, local = resolve_source(spec.source)
    if local:
        return AutoImageProcessor.from_pretrained(path)
    return load_from_hub(
        lambda lfo: AutoImageProcessor.from_pretrained(path, revision=spec.revision, local_files_only=lfo),
        path, what="model", key="model.source")
