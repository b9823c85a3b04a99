"""Build a backbone with a new classification head from a hub name, a local dir or a config.

Three families behind one factory (`MODELS`):
- `hf-text`: Hugging Face `AutoModelForSequenceClassification` (BERT, RoBERTa, DeBERTa-v2/v3...)
- `hf-vision`: Hugging Face `AutoModelForImageClassification` (ViT...)
- `timm`: `timm.create_model(..., num_classes=n)` (ViT with fused `qkv`)

`pretrained: false` builds a random model from `config` (the `tiny-*` test models). A source
`package:<module>[/<subdir>]` points inside an installed Python package (the MiniLM fixture).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from partial_lora.data.base import ImagePreprocess
from partial_lora.errors import PlrError
from partial_lora.hub import check_local_path, load_from_hub, looks_local


@dataclass(frozen=True)
class ModelSpec:
    """A model YAML's values.

    Attributes:
        name: config name, used in run names.
        family: `hf-text`, `hf-vision` or `timm`.
        source: hub id, local dir, `package:<module>/<subdir>`, or (timm) a timm model name.
        pretrained: False builds random weights from `config` (tests).
        config: for random init: HF config kwargs (with `model_type`) or timm kwargs.
        tokenizer: tokenizer source when it differs from `source` (random-init text models).
        revision: hub revision.
        lora_targets: named target sets, e.g. {"qv": [query, value], "all": [...]}.
        fused: fused projections and their slices (timm `qkv: [q, k, v]`).
        head_modules: modules trained with the head learning rate (new classifier, pooler).
        max_length: tokenizer truncation length.
        image: preprocessing overrides for image models (None: from the model's processor).
    """

    name: str
    family: str
    source: str | None = None
    pretrained: bool = True
    config: Mapping[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    revision: str | None = None
    lora_targets: Mapping[str, Sequence[str]] = field(default_factory=dict)
    fused: Mapping[str, Sequence[str]] = field(default_factory=dict)
    head_modules: Sequence[str] = ("classifier",)
    max_length: int = 128
    image: Mapping[str, Any] | None = None


class Classifier(nn.Module):
    """A backbone `net` with one call convention: `logits = model(batch)`.

    Adapters are injected into `net`, so layer ids are the backbone's own module names.
    """

    def __init__(self, net: nn.Module, family: str, head_modules: Sequence[str]) -> None:
        super().__init__()
        self.net = net
        self.family = family
        self.head_modules = list(head_modules)

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        if self.family == "timm":
            return self.net(batch["pixel_values"])
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return self.net(**inputs).logits

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for n in self.head_modules for p in self.net.get_submodule(n).parameters()]

    def head_state_dict(self) -> dict[str, Tensor]:
        """Head tensors keyed by their names in `net` (e.g. `classifier.weight`)."""
        return {f"{n}.{k}": v.detach().cpu().clone() for n in self.head_modules
                for k, v in self.net.get_submodule(n).state_dict().items()}

    def load_head_state_dict(self, state: Mapping[str, Tensor], source: str = "head") -> None:
        own = self.head_state_dict()
        if set(own) != set(state) or any(own[k].shape != state[k].shape for k in own):
            raise PlrError(f"{source} does not fit this model's head (another model or label count?); "
                           "rerun the stage that wrote it")
        for n in self.head_modules:
            mod = self.net.get_submodule(n)
            mod.load_state_dict({k[len(n) + 1:]: v for k, v in state.items() if k.startswith(n + ".")})


@dataclass
class Built:
    """What the factory returns: the model and how to feed it."""

    model: Classifier
    tokenizer: Any | None = None
    image: ImagePreprocess | None = None
    max_length: int = 128


def resolve_source(source: str | None, key: str = "model.source") -> tuple[str, bool]:
    """Return (name or path, is_local) for a model source string."""
    if not source:
        raise PlrError(f"the model has no source; set {key}=<hub id or local dir>")
    if source.startswith("package:"):
        module, _, sub = source[len("package:"):].partition("/")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise PlrError(f"package '{module}' is not installed; pip install {module.replace('_', '-')} "
                           "(or pip install 'plr[offline]')")
        return str(Path(spec.submodule_search_locations[0]) / sub), True
    if looks_local(source):
        return str(check_local_path(source, what="model", key=key)), True
    return source, False


def _hf_load(fn: Callable[..., Any], source: str | None, revision: str | None, key: str, **kw: Any) -> Any:
    path, local = resolve_source(source, key)
    if local:
        return fn(path, **kw)
    return load_from_hub(lambda lfo: fn(path, revision=revision, local_files_only=lfo, **kw), path,
                         what="model", key=key)


def _quiet_transformers() -> None:
    # "Some weights were newly initialized" is expected (we add a head); keep the console clean.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # the per-tensor "Loading weights" bar


def build_hf_text(spec: ModelSpec, num_labels: int) -> Built:
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    _quiet_transformers()
    if spec.pretrained:
        net = _hf_load(AutoModelForSequenceClassification.from_pretrained, spec.source, spec.revision,
                       "model.source", num_labels=num_labels, ignore_mismatched_sizes=True)
    else:
        kwargs = dict(spec.config)
        cfg = AutoConfig.for_model(kwargs.pop("model_type"), num_labels=num_labels, **kwargs)
        net = AutoModelForSequenceClassification.from_config(cfg)
    if num_labels == 1:
        net.config.problem_type = "regression"
    tok = _hf_load(AutoTokenizer.from_pretrained, spec.tokenizer or spec.source, spec.revision, "model.tokenizer")
    return Built(Classifier(net, spec.family, spec.head_modules), tokenizer=tok, max_length=spec.max_length)


def build_hf_vision(spec: ModelSpec, num_labels: int) -> Built:
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    _quiet_transformers()
    if spec.pretrained:
        net = _hf_load(AutoModelForImageClassification.from_pretrained, spec.source, spec.revision,
                       "model.source", num_labels=num_labels, ignore_mismatched_sizes=True)
        proc = _hf_load(AutoImageProcessor.from_pretrained, spec.source, spec.revision, "model.source")
        size = proc.size.get("height") or proc.size.get("shortest_edge") or net.config.image_size
        image = ImagePreprocess(size=int(size), mean=tuple(proc.image_mean), std=tuple(proc.image_std))
    else:
        kwargs = dict(spec.config)
        cfg = AutoConfig.for_model(kwargs.pop("model_type"), num_labels=num_labels, **kwargs)
        net = AutoModelForImageClassification.from_config(cfg)
        image = ImagePreprocess(size=int(cfg.image_size))
    image = _override_image(image, spec.image)
    return Built(Classifier(net, spec.family, spec.head_modules), image=image)


def build_timm(spec: ModelSpec, num_labels: int) -> Built:
    import timm
    from timm.data import resolve_data_config

    kwargs = dict(spec.config)
    arch = kwargs.pop("architecture", None) or spec.source
    if not arch:
        raise PlrError("timm model has no architecture; set model.source=<timm name, e.g. vit_base_patch16_224.augreg_in21k>")
    if not spec.pretrained:
        net = timm.create_model(arch, pretrained=False, num_classes=num_labels, **kwargs)
    elif looks_local(arch):
        # A local dir in Hugging Face hub layout (config.json + model.safetensors), as `hf download` writes.
        path = check_local_path(arch, what="model", key="model.source")
        meta = json.loads((path / "config.json").read_text())
        weights = next((path / f for f in ("model.safetensors", "pytorch_model.bin") if (path / f).exists()), None)
        if weights is None:
            raise PlrError(f"no model.safetensors in '{path}'; download the timm model with `hf download` into it")
        # timm's push_to_hub writes `model_args` for non-default shapes (timm >= 1.0 includes
        # num_classes there: the task decides that); the YAML's config wins.
        model_args = {k: v for k, v in meta.get("model_args", {}).items() if k != "num_classes"}
        net = timm.create_model(meta["architecture"], pretrained=True, num_classes=num_labels,
                                pretrained_cfg_overlay={"file": str(weights)}, **{**model_args, **kwargs})
    else:
        net = load_from_hub(lambda lfo: _timm_from_hub(arch, num_labels, lfo, kwargs), arch,
                            what="model", key="model.source")
    data_cfg = resolve_data_config({}, model=net)
    # pretrained_cfg keeps the default resolution even when img_size was overridden: trust the model.
    size = getattr(getattr(net, "patch_embed", None), "img_size", None)
    size = int(size[-1]) if size else int(data_cfg["input_size"][-1])
    image = ImagePreprocess(size=size, mean=tuple(data_cfg["mean"]),
                            std=tuple(data_cfg["std"]), interpolation=data_cfg.get("interpolation", "bilinear"),
                            crop_pct=float(data_cfg.get("crop_pct", 1.0)))
    image = _override_image(image, spec.image)
    return Built(Classifier(net, spec.family, spec.head_modules), image=image)


def _timm_from_hub(arch: str, num_labels: int, local_only: bool, kwargs: Mapping[str, Any]) -> nn.Module:
    import timm

    if not local_only:
        return timm.create_model(arch, pretrained=True, num_classes=num_labels, **kwargs)
    # Offline: use the weights in the Hugging Face cache if they are there.
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(arch)
    repo = cfg.hf_hub_id if cfg is not None else None
    cached = try_to_load_from_cache(repo, "model.safetensors") if repo else None
    if not isinstance(cached, str):
        raise FileNotFoundError(f"{arch} not cached")
    return timm.create_model(arch, pretrained=True, num_classes=num_labels,
                             pretrained_cfg_overlay={"file": cached}, **kwargs)


def _override_image(image: ImagePreprocess, over: Mapping[str, Any] | None) -> ImagePreprocess:
    if not over:
        return image
    from dataclasses import replace

    fixed = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in over.items()}
    return replace(image, **fixed)


MODELS: dict[str, Callable[[ModelSpec, int], Built]] = {
    "hf-text": build_hf_text,
    "hf-vision": build_hf_vision,
    "timm": build_timm,
}


def build_model(spec: ModelSpec, num_labels: int) -> Built:
    """Build the model of `spec` with a fresh `num_labels`-way head."""
    if spec.family not in MODELS:
        raise PlrError(f"unknown model family '{spec.family}'; set model.family to one of: {', '.join(MODELS)}")
    if num_labels < 1:
        raise PlrError(f"a classifier needs at least one label, got {num_labels}; check task.label_column")
    built = MODELS[spec.family](spec, num_labels)
    for name in spec.head_modules:
        try:
            built.model.net.get_submodule(name)
        except AttributeError:
            raise PlrError(f"head module '{name}' is not in model '{spec.name}'; fix model.head_modules") from None
    return built

