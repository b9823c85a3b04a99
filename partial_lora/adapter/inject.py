"""Injection: the adapter layer put into a model, and the helpers that see every branch at once.

`find_targets` resolves `LoRAConfig`'s patterns to the model's `nn.Linear` and pointwise
`nn.Conv2d` layers (and the slices of fused projections); `inject_lora` wraps each of them in
place in a `lora.LoRALinear` / `lora.LoRAConv`. Every branch has a *layer id* (`layer_id`) that
keys its tensors in artifacts: the module name, plus the slice name for fused layers. The rest
works on the whole model: its branches in module order, merge/unmerge, the adapter's tensors
out and in, freezing all but the adapter and head, parameter counts, the frozen weights.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from partial_lora import distributed
from partial_lora.adapter.lora import LoRABranch, LoRAConv, LoRALinear
from partial_lora.adapter.masks import lora_parameters
from partial_lora.errors import PlrError

WHOLE = "lora"  # branch key of an unsliced layer; never appears in layer ids


def dims(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of an adaptable layer: an `nn.Linear`, a pointwise `nn.Conv2d`, or their wrappers."""
    if isinstance(module, nn.Conv2d):
        return module.out_channels, module.in_channels
    return module.out_features, module.in_features


def _check_conv(name: str, conv: nn.Conv2d) -> None:
    """Only a pointwise convolution is a linear map over channels; refuse the others in one line."""
    if conv.groups != 1:
        kind = "depthwise" if conv.groups == conv.in_channels else f"grouped (groups={conv.groups})"
        raise PlrError(f"LoRA target '{name}' is a {kind} convolution; plr adapts only pointwise (1x1, groups=1) "
                       "convolutions and nn.Linear, so drop it from adapter.targets (or model.lora_targets)")
    if tuple(conv.kernel_size) != (1, 1):
        k = "x".join(map(str, conv.kernel_size))
        raise PlrError(f"LoRA target '{name}' is a {k} convolution; plr adapts only pointwise (1x1) convolutions "
                       "and nn.Linear, so drop it from adapter.targets (or model.lora_targets)")
    pad = conv.padding  # a tuple, or "valid"/"same" (no padding for a 1x1 kernel)
    if isinstance(pad, tuple) and any(pad):
        raise PlrError(f"LoRA target '{name}' is a 1x1 convolution with padding {conv.padding}; a padded 1x1 "
                       "convolution is not a per-pixel linear map, so drop it from adapter.targets")


@dataclass(frozen=True)
class LoRAConfig:
    """Where and how to attach LoRA.

    Attributes:
        r / alpha / dropout: rank, scale numerator (scale = alpha / r), branch input dropout.
        targets: module patterns. `query` matches modules whose name ends in `.query`;
            `re:<regex>` full-matches the module name; `qkv:q` is the `q` slice of a fused
            projection whose slices are declared in `fused`.
        fused: fused module suffix -> slice names in output order, equal sizes
            (timm: `{"qkv": ["q", "k", "v"]}`).
        exclude: module names (or suffixes) never adapted, e.g. the classification head.
        target_set: the model's target set the targets came from (`qv`, `all`), None for patterns.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Sequence[str] = ("query", "value")
    fused: Mapping[str, Sequence[str]] = field(default_factory=dict)
    exclude: Sequence[str] = ()
    target_set: str | None = None

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise PlrError(f"adapter.r must be a positive rank, got {self.r}; set adapter.r=8 (or any integer >= 1)")
        if self.alpha <= 0:
            raise PlrError(f"adapter.alpha must be positive, got {self.alpha:g}; set adapter.alpha=16 for example")
        if not 0 <= self.dropout < 1:
            raise PlrError(f"adapter.dropout must be in [0, 1), got {self.dropout:g}; fix that override")


def _suffix_match(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _under(name: str, module: str) -> bool:
    """Whether `module` (a dotted name or suffix) is `name` or contains it (`pooler` ∋ `pooler.dense`)."""
    return f".{module}." in f".{name}."


def _match(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.fullmatch(target[3:], name) is not None
    return _suffix_match(name, target.split(":", 1)[0])


def find_targets(model: nn.Module, cfg: LoRAConfig) -> dict[str, dict[str, tuple[int, int]]]:
    """Resolve the target patterns to `{module name: {branch key: (offset, d_out)}}`.

    Raises:
        PlrError: when nothing matches, or a fused slice is not declared.
    """
    found: dict[str, dict[str, tuple[int, int]]] = {}
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    for name, mod in linears:
        if any(_under(name, e) for e in cfg.exclude):
            continue
        for target in cfg.targets:
            if not _match(name, target):
                continue
            if isinstance(mod, nn.Conv2d):
                _check_conv(name, mod)
            d_out = dims(mod)[0]
            if ":" in target and not target.startswith("re:"):
                suffix, piece = target.split(":", 1)
                slices = list(cfg.fused.get(suffix, ()))
                if piece not in slices:
                    raise PlrError(f"target '{target}' names slice '{piece}' but model.fused declares "
                                   f"{suffix}: {slices or 'nothing'}; fix adapter targets or model.fused")
                if d_out % len(slices):
                    raise PlrError(f"fused module '{name}' has {d_out} outputs, not divisible into "
                                   f"{len(slices)} slices; fix model.fused")
                size = d_out // len(slices)
                found.setdefault(name, {})[piece] = (slices.index(piece) * size, size)
            else:
                found.setdefault(name, {})[WHOLE] = (0, d_out)
    if not found:
        sample = ", ".join(n for n, _ in linears[:6])
        raise PlrError(f"LoRA targets {list(cfg.targets)} match no nn.Linear or 1x1 nn.Conv2d of the model (its "
                       f"linear layers are named like: {sample}, ...); set adapter.targets or model.lora_targets")
    return found


def layer_id(module_name: str, branch_key: str) -> str:
    return module_name if branch_key == WHOLE else f"{module_name}.{branch_key}"


def inject_lora(model: nn.Module, cfg: LoRAConfig,
                keep: Mapping[str, tuple[Tensor | None, Tensor | None]] | None = None) -> dict[str, LoRABranch]:
    """Wrap every targeted linear layer of `model` in place.

    Args:
        model: the backbone (module names are relative to it).
        cfg: ranks and target patterns.
        keep: optional kept (rows, cols) per layer id; missing layers are dense.

    Returns:
        The branches by layer id, in module order.
    """
    keep = dict(keep or {})
    branches: dict[str, LoRABranch] = {}
    for name, slices in find_targets(model, cfg).items():
        base = model.get_submodule(name)
        if isinstance(base, LoRALinear):
            raise PlrError(f"module '{name}' already has LoRA; build a fresh model before injecting again")
        made = {}
        d_in = dims(base)[1]
        for key, (offset, d_out) in slices.items():
            lid = layer_id(name, key)
            rows, cols = keep.pop(lid, (None, None))
            made[key] = LoRABranch(d_in, d_out, cfg.r, cfg.alpha, cfg.dropout, rows, cols, offset)
            made[key].to(device=base.weight.device)
            branches[lid] = made[key]
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, (LoRAConv if isinstance(base, nn.Conv2d) else LoRALinear)(base, made))
    if keep:
        raise PlrError(f"masks name layers the model does not adapt ({sorted(keep)[:3]}...); "
                       "the masks come from another model or target set")
    return branches


def iter_branches(model: nn.Module) -> Iterator[tuple[str, LoRABranch]]:
    """(layer id, branch) for every branch in the model, in module order."""
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            for key, branch in mod.branches.items():
                yield layer_id(name, key), branch


def lora_layers(model: nn.Module) -> Iterator[LoRALinear]:
    return (m for m in model.modules() if isinstance(m, LoRALinear))


def merge_lora(model: nn.Module) -> None:
    for m in lora_layers(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_layers(model):
        m.unmerge()


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """`{layer_id}.lora_A` / `{layer_id}.lora_B` tensors (compact shapes), whole, detached on CPU."""
    out = {}
    for lid, b in iter_branches(model):
        out[f"{lid}.lora_A"] = distributed.full(b.lora_A.detach()).cpu().clone()  # FSDP: gathered from every process
        out[f"{lid}.lora_B"] = distributed.full(b.lora_B.detach()).cpu().clone()
    return out


def load_adapter_state_dict(model: nn.Module, state: Mapping[str, Tensor], source: str = "adapter") -> None:
    """Copy saved adapter tensors into the model's branches; every key and shape must match.

    Raises:
        PlrError: naming `source` when keys or shapes do not fit (a foreign or truncated file).
    """
    expected = {}
    for lid, b in iter_branches(model):
        expected[f"{lid}.lora_A"] = b.lora_A
        expected[f"{lid}.lora_B"] = b.lora_B
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise PlrError(f"{source} does not fit this model (missing {missing[:2]}, unexpected {unexpected[:2]}); "
                       "it was written for another model, target set or mask")
    with torch.no_grad():
        for k, p in expected.items():
            if tuple(state[k].shape) != tuple(p.shape):
                raise PlrError(f"{source}: '{k}' has shape {tuple(state[k].shape)}, the model expects "
                               f"{tuple(p.shape)}; it was written for another model or mask")
            distributed.assign(p, state[k])  # FSDP: this process's shard of it


def freeze_for_adapter(model: nn.Module, head_modules: Sequence[str] = ()) -> None:
    """Freeze everything except LoRA factors and the named head modules."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, b in iter_branches(model):
        b.lora_A.requires_grad_(True)
        b.lora_B.requires_grad_(True)
    for name in head_modules:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)


def params_per_rank(net: nn.Module, found: Mapping[str, Mapping[str, tuple[int, int]]]) -> int:
    """Parameters of a dense LoRA per unit of rank on the targeted layers (`find_targets`)."""
    return sum(lora_parameters(1, d_out, dims(net.get_submodule(name))[1])
               for name, slices in found.items() for _, d_out in slices.values())


def rewind(branches: Mapping[str, LoRABranch], init: Mapping[str, Tensor]) -> None:
    """Load dense initial factors (the probe's, `{layer_id}.lora_A/B`) restricted to each branch's
    kept block (`KeptBlock.select`): A[:, C] and B[R]. Under FSDP, this process's shard of each."""
    for lid, b in branches.items():
        lora_b, lora_a = b.kept.select(init[f"{lid}.lora_B"], init[f"{lid}.lora_A"])
        distributed.assign(b.lora_A, lora_a.to(b.lora_A.device))
        distributed.assign(b.lora_B, lora_b.to(b.lora_B.device))


def count_adapter_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable adapter parameters and those of a dense LoRA at the same rank on the same layers."""
    branches = [b for _, b in iter_branches(model)]
    return {"adapter": sum(b.num_parameters() for b in branches),
            "dense_lora": sum(b.dense_num_parameters() for b in branches),
            "layers": len(branches)}


def base_weights(model: nn.Module) -> dict[str, Tensor]:
    """The frozen weight slice (d_out × d_in) each branch adapts, by layer id."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            for key, b in mod.branches.items():
                w = distributed.full(mod.base_layer.weight.detach())  # FSDP: gathered (one layer at a time)
                out[layer_id(name, key)] = w.view(mod.out_features, mod.in_features)[b.offset:b.offset + b.d_out]
    return out
