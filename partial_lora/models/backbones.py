"""Build a backbone with a new classification head from a hub name, a local dir or a config.

Four families behind one factory (`MODELS`):
- `hf-text`: Hugging Face `AutoModelForSequenceClassification` (BERT, RoBERTa, DeBERTa-v2/v3...)
- `hf-vision`: Hugging Face `AutoModelForImageClassification` (ViT...)
- `timm`: `timm.create_model(..., num_classes=n)` (ViT with fused `qkv`)
- `hf-causal`: Hugging Face `AutoModelForCausalLM` (LLaMA, Qwen, Mistral...), no new head: it
  answers multiple-choice tasks by the log-likelihood of each choice (`causal_lm.CausalLM`)

`pretrained: false` builds a random model from `config` (the `tiny-*` test models). A source
`package:<module>[/<subdir>]` points inside an installed Python package (the MiniLM fixture), and
`fetch:<source>` at an entry of the `plr fetch` cache (Gemma 3 270M): see `source`.
The backbone is wrapped in a `classifier.Classifier`.

Pretrained weights are read from safetensors only: a source that holds only a pickle checkpoint
(`pytorch_model.bin`, `*.pt`) is refused in one line that says how to convert it, since
unpickling can run code. Every weight of the backbone must come from the source: a checkpoint
that lacks some (a truncated or foreign `model.safetensors`) is refused, naming one, instead of
training on a partly random backbone; only the new head (`head_modules`) starts random.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from partial_lora.data.base import ImagePreprocess
from partial_lora.errors import PlrError
from partial_lora.fetch.hub import load_from_hub, looks_local
from partial_lora.models.causal_lm import CausalLM
from partial_lora.models.classifier import Classifier
from partial_lora.models.source import hf_load, load_local, refuse_pickle_only, resolve_source, short_cause


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
        default_targets: the set `adapter.targets` takes when not overridden (`qv`; a convolutional
            net has no q/v and names its own, e.g. `pw`).
        fused: fused projections and their slices (timm `qkv: [q, k, v]`).
        head_modules: modules trained with the head learning rate (new classifier, pooler).
        max_length: tokenizer truncation length.
        image: preprocessing overrides for image models (None: from the model's processor).
        dtype: dtype the pretrained weights are loaded in (`bfloat16` halves an LLM's memory;
            the adapter stays fp32); None keeps the checkpoint's default (fp32).
        gradient_checkpointing: recompute the blocks' activations in backward (LLMs: less
            memory, about a third more time).
        frozen_norm: batch norm layers of the frozen backbone keep their pretrained running
            statistics and use them in training too (eval mode), as the rest of the backbone
            stays frozen. With false, training normalises by batch statistics and moves the
            running ones (TF-ported EfficientNets by 1% a step), so a short fine-tune evaluates
            with statistics that match neither. Models without batch norm are unaffected.
        head_init: `model` keeps the architecture's own init of the new head; `zeros` starts it
            at zero (the first logits are uniform). timm's EfficientNet draws its classifier from
            U(±1/sqrt(classes)), which on 1,280 pretrained features gives a first loss near 9.
    """

    name: str
    family: str
    source: str | None = None
    pretrained: bool = True
    config: Mapping[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    revision: str | None = None
    lora_targets: Mapping[str, Sequence[str]] = field(default_factory=dict)
    default_targets: str = "qv"
    fused: Mapping[str, Sequence[str]] = field(default_factory=dict)
    head_modules: Sequence[str] = ("classifier",)
    max_length: int = 128
    image: Mapping[str, Any] | None = None
    dtype: str | None = None
    gradient_checkpointing: bool = False
    frozen_norm: bool = True
    head_init: str = "model"

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise PlrError(f"model.max_length must be >= 1 token, got {self.max_length}; set model.max_length=128 "
                           "(at most the model's position embeddings)")


@dataclass
class Built:
    """What the factory returns: the model and how to feed it."""

    model: Classifier
    tokenizer: Any | None = None
    image: ImagePreprocess | None = None
    max_length: int = 128


def _unused_source(spec: ModelSpec) -> None:
    """`pretrained: false` builds random weights from `config`: a source that nothing would read is refused."""
    if spec.pretrained or not spec.source:
        return
    used = ((spec.family in ("hf-text", "hf-causal") and not spec.tokenizer)
            or (spec.family == "timm" and not dict(spec.config).get("architecture")))
    if not used:
        raise PlrError(f"model.source={spec.source} would be ignored: model {spec.name} has pretrained=false "
                       "(random weights from model.config); add model.pretrained=true to load it")


def _check_vocab(net: nn.Module, tok: Any, spec: ModelSpec) -> None:
    """A tokenizer with more tokens than the model has embeddings would index past them on the first batch."""
    rows = net.get_input_embeddings().num_embeddings
    if len(tok) > rows:
        raise PlrError(f"the tokenizer ({spec.tokenizer or spec.source}) has {len(tok):,} tokens but model "
                       f"{spec.name}'s embeddings hold {rows:,}; set model.tokenizer to the model's own tokenizer")


def _is_head(key: str, head_modules: Sequence[str]) -> bool:
    return any(key == h or key.startswith(h + ".") for h in head_modules)


def check_complete(missing: Sequence[str], spec: ModelSpec) -> None:
    """Refuse a checkpoint that lacks weights of the backbone (those would start random).

    Raises:
        PlrError: names how many are missing and the first, and the fix.
    """
    absent = sorted(k for k in missing if not _is_head(k, spec.head_modules))
    if absent:
        raise PlrError(f"model.source={spec.source} lacks {len(absent)} of model {spec.name}'s pretrained weights "
                       f"({absent[0]}{', ...' if len(absent) > 1 else ''}), which would start random; point "
                       "model.source at a complete checkpoint of this architecture (or re-download it), or, if those "
                       "modules are meant to be new, list them in model.head_modules (they then train with the head)")


def _pretrained(fn: Callable[..., Any], spec: ModelSpec, **kw: Any) -> nn.Module:
    """A transformers model from `spec.source`, from safetensors only, with every backbone weight."""
    refuse_pickle_only(spec.source, "model.source")
    net, info = hf_load(fn, spec.source, spec.revision, "model.source", use_safetensors=True,
                         output_loading_info=True, **kw)
    check_complete(list(info.get("missing_keys", ())), spec)
    return net


def check_positions(net: nn.Module, spec: ModelSpec) -> None:
    """`model.max_length` must fit the model's absolute position embeddings (BERT, RoBERTa...)."""
    for name, module in net.named_modules():
        if name.endswith("position_embeddings") and isinstance(module, nn.Embedding):
            pad = module.padding_idx
            usable = module.num_embeddings - (pad + 1 if pad is not None else 0)  # RoBERTa counts from padding_idx + 1
            if spec.max_length > usable:
                raise PlrError(f"model.max_length={spec.max_length} is more than the {usable} positions model "
                               f"{spec.name} has; set model.max_length={usable} or less")
            return


def _quiet_transformers() -> None:
    # "Some weights were newly initialized" is expected (we add a head); keep the console clean.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # the per-tensor "Loading weights" bar


def build_hf_text(spec: ModelSpec, num_labels: int) -> Built:
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    _quiet_transformers()
    if spec.pretrained:
        net = _pretrained(AutoModelForSequenceClassification.from_pretrained, spec, num_labels=num_labels,
                          ignore_mismatched_sizes=True)
    else:
        kwargs = dict(spec.config)
        cfg = AutoConfig.for_model(kwargs.pop("model_type"), num_labels=num_labels, **kwargs)
        net = AutoModelForSequenceClassification.from_config(cfg)
    if num_labels == 1:
        net.config.problem_type = "regression"
    check_positions(net, spec)
    tok = hf_load(AutoTokenizer.from_pretrained, spec.tokenizer or spec.source, spec.revision, "model.tokenizer")
    _check_vocab(net, tok, spec)
    return Built(Classifier(net, spec.family, spec.head_modules), tokenizer=tok, max_length=spec.max_length)


def build_hf_vision(spec: ModelSpec, num_labels: int) -> Built:
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    _quiet_transformers()
    if spec.pretrained:
        net = _pretrained(AutoModelForImageClassification.from_pretrained, spec, num_labels=num_labels,
                          ignore_mismatched_sizes=True)
        proc = hf_load(AutoImageProcessor.from_pretrained, spec.source, spec.revision, "model.source")
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
    import logging

    import timm
    from timm.data import resolve_data_config

    logging.getLogger("timm").setLevel(logging.WARNING)  # "Loading pretrained weights from file" at every stage

    kwargs = dict(spec.config)
    arch = kwargs.pop("architecture", None) or spec.source
    if not arch:
        raise PlrError("timm model has no architecture; set model.source=<timm name, e.g. "
                       "vit_base_patch16_224.augreg_in21k>")
    if not spec.pretrained:
        net = timm.create_model(arch, pretrained=False, num_classes=num_labels, **kwargs)
    elif looks_local(arch) or arch.startswith("fetch:"):
        # A local dir in Hugging Face hub layout (config.json + model.safetensors), as `hf download`
        # writes, or a `plr fetch` entry in that layout (efficientnet-lite0).
        path = Path(resolve_source(arch)[0])
        try:
            meta = json.loads((path / "config.json").read_text())
            meta["architecture"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PlrError(f"model.source={arch}: '{path / 'config.json'}' is missing or not a timm config "
                           f"({short_cause(e)}); download the timm model with `hf download` into '{path}'") from None
        refuse_pickle_only(arch, "model.source", transformers=False)
        weights = path / "model.safetensors"
        if not weights.exists():
            raise PlrError(f"no model.safetensors in '{path}'; download the timm model with `hf download` into it")
        # timm's push_to_hub writes `model_args` for non-default shapes (timm >= 1.0 includes
        # num_classes there: the task decides that); the YAML's config wins.
        model_args = {k: v for k, v in meta.get("model_args", {}).items() if k != "num_classes"}
        net = load_local(lambda _: timm.create_model(meta["architecture"], pretrained=True, num_classes=num_labels,
                                                      pretrained_cfg_overlay={"file": str(weights)},
                                                      **{**model_args, **kwargs}),
                          str(path), arch, "model.source")
        _check_timm_complete(net, weights, spec)
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


def _check_timm_complete(net: nn.Module, weights: Path, spec: ModelSpec) -> None:
    """timm loads a checkpoint for another class count without strictness: check that every weight
    of the backbone was in the file."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        stored = set(f.keys())
    check_complete([k for k in net.state_dict() if k not in stored], spec)


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


def torch_dtype(spec: ModelSpec) -> Any:
    if spec.dtype is None:
        return None
    dtype = getattr(torch, str(spec.dtype), None)
    if not isinstance(dtype, torch.dtype):
        raise PlrError(f"model.dtype='{spec.dtype}' is not a torch dtype; use bfloat16, float16, float32 or null")
    return dtype


def build_hf_causal(spec: ModelSpec, num_labels: int) -> Built:
    """A causal LM (no new head): `num_labels` is the most answer choices a task has."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    dtype = torch_dtype(spec)
    if spec.pretrained:
        net = _pretrained(AutoModelForCausalLM.from_pretrained, spec, **({"dtype": dtype} if dtype is not None else {}))
    else:
        kwargs = dict(spec.config)
        net = AutoModelForCausalLM.from_config(AutoConfig.for_model(kwargs.pop("model_type"), **kwargs))
        if dtype is not None:
            net = net.to(dtype)
    if spec.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad (the embeddings are frozen).
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    net.config.use_cache = False  # training and scoring never reuse the KV cache
    tok = hf_load(AutoTokenizer.from_pretrained, spec.tokenizer or spec.source, spec.revision, "model.tokenizer")
    _check_vocab(net, tok, spec)
    return Built(CausalLM(net, num_labels), tokenizer=tok, max_length=spec.max_length)


MODELS: dict[str, Callable[[ModelSpec, int], Built]] = {
    "hf-text": build_hf_text,
    "hf-vision": build_hf_vision,
    "timm": build_timm,
    "hf-causal": build_hf_causal,
}


HEAD_INITS = ("model", "zeros")


def build_model(spec: ModelSpec, num_labels: int) -> Built:
    """Build the model of `spec` with a fresh `num_labels`-way head."""
    if spec.family not in MODELS:
        raise PlrError(f"unknown model family '{spec.family}'; set model.family to one of: {', '.join(MODELS)}")
    if num_labels < 1:
        raise PlrError(f"a classifier needs at least one label, got {num_labels}; check task.label_column")
    if spec.head_init not in HEAD_INITS:
        raise PlrError(f"model.head_init='{spec.head_init}' is not one of {', '.join(HEAD_INITS)}; fix that override")
    _unused_source(spec)
    built = MODELS[spec.family](spec, num_labels)
    if spec.head_init == "zeros":
        with torch.no_grad():
            for p in built.model.head_parameters():
                p.zero_()
    built.model.frozen_norm = bool(spec.frozen_norm)
    built.model.train(built.model.training)
    for name in spec.head_modules:
        try:
            built.model.net.get_submodule(name)
        except AttributeError:
            raise PlrError(f"head module '{name}' is not in model '{spec.name}'; fix model.head_modules") from None
    return built
