"""The variants of one backbone: the no-adapter floor, PEFT LoRA, dense LoRA (ours) and Partial-LoRA
(per-layer random columns, or with a shared input: nested random columns per input group).

Each is a deep copy that shares the backbone's frozen weights (`_copy`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from partial_lora.adapter.inject import (
    LoRAConfig,
    count_adapter_parameters,
    find_targets,
    freeze_for_adapter,
    inject_lora,
    layer_id,
)
from partial_lora.adapter.input_groups import attach, trace
from partial_lora.models.classifier import Classifier

from .sizes import Size, make_batch


@dataclass
class Variant:
    label: str
    kind: str  # "floor" | "peft" | "ours"
    model: nn.Module  # called as model(batch) -> logits
    adapter_params: int
    layers: int = 0
    density: float | None = None  # ours only
    shared: bool = False  # ours only: adapter.mask.shared_input (one gather per input group)


def _is_head(name: str, size: Size) -> bool:
    return any(name == h or name.startswith(h + ".") for h in size.head_modules)


def _set_head_trainable(net: nn.Module, size: Size) -> None:
    for name in size.head_modules:
        for p in net.get_submodule(name).parameters():
            p.requires_grad_(True)


def _copy(backbone: nn.Module, size: Size) -> nn.Module:
    """A deep copy that shares the frozen backbone weights (the head and buffers are copied).

    Every variant freezes those weights, so sharing them changes no result; it keeps memory at
    one backbone however many variants are alive at once (they are timed interleaved).
    """
    shared = {id(p): p for n, p in backbone.named_parameters() if not _is_head(n, size)}
    for p in shared.values():
        p.requires_grad_(False)
    return copy.deepcopy(backbone, memo=shared)


def make_floor(backbone: nn.Module, size: Size) -> Variant:
    """No adapter weights; the head trains and the outputs of the adapted layers require grad.

    With every weight frozen, autograd would stop at the head. An adapter on a layer needs the
    gradient w.r.t. that layer's output, in every adapted layer, down to the first. A forward
    hook on every target module (the same modules the adapters wrap) that calls
    `output.requires_grad_(True)` forces exactly that backward pass: the input gradients from
    the head down to the first adapted layer's output, and nothing below it, with no
    weight-gradient anywhere in the backbone and nothing saved for backward that an adapter
    variant does not save too. It is the same graph as every adapter variant minus the adapter
    branches. (Hugging Face's `enable_input_require_grads` hooks the embedding output instead;
    that floor also runs the input-gradient GEMMs of the first layer and the embedding
    LayerNorm's backward, which no adapter needs, and would flatter the ratios to the floor.)
    """
    net = _copy(backbone, size)
    for p in net.parameters():
        p.requires_grad_(False)
    _set_head_trainable(net, size)

    def require_grad(_module: nn.Module, _inputs: object, output: Tensor) -> Tensor:
        return output if output.requires_grad else output.requires_grad_(True)

    cfg = LoRAConfig(targets=size.targets, exclude=size.head_modules)
    for name in find_targets(net, cfg):
        net.get_submodule(name).register_forward_hook(require_grad)
    return Variant("floor (frozen, no adapter)", "floor", Classifier(net, size.family, size.head_modules), 0)


def make_peft(backbone: nn.Module, size: Size, r: int, alpha: float) -> Variant:
    import peft

    net = _copy(backbone, size)
    # No task_type: PEFT would otherwise wrap the head in modules_to_save (a trainable copy).
    # get_peft_model freezes everything but lora_*; the head is unfrozen by hand below, on the
    # same module objects (injection is in place, so `net.classifier` is still the head).
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(size.targets), lora_dropout=0.0)
    pm = peft.get_peft_model(net, cfg)
    _set_head_trainable(net, size)
    lora = [(n, p) for n, p in pm.named_parameters() if "lora_" in n and p.requires_grad]
    layers = sum(1 for n, _ in lora if "lora_A" in n)
    return Variant("PEFT LoRA", "peft", Classifier(pm, size.family, []), sum(p.numel() for _, p in lora), layers)


def random_keep(net: nn.Module, cfg: LoRAConfig, density: float, seed: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
    """ρ·d_out random rows and ρ·d_in random columns (at least one each) in every adapted layer."""
    g = torch.Generator().manual_seed(seed)
    keep = {}
    for name, slices in find_targets(net, cfg).items():
        d_in = net.get_submodule(name).in_features
        for key, (_, d_out) in slices.items():
            rows = torch.randperm(d_out, generator=g)[: max(1, round(density * d_out))]
            cols = torch.randperm(d_in, generator=g)[: max(1, round(density * d_in))]
            keep[layer_id(name, key)] = (rows.sort().values, cols.sort().values)
    return keep


def input_groups(backbone: nn.Module, size: Size, cfg: LoRAConfig) -> list[list[str]]:
    """The backbone's input groups (`partial_lora.adapter.input_groups.trace`): one forward pass of one example
    through a copy with dense LoRA injected."""
    net = _copy(backbone, size)
    inject_lora(net, cfg)
    device = next(backbone.parameters()).device
    batch = make_batch(size, backbone, 1, 8, device)
    model = Classifier(net, size.family, size.head_modules)
    return trace(net, lambda: model(batch))


def shared_keep(keep: dict[str, tuple[Tensor, Tensor]], groups: list[list[str]], density: float,
                d_in: dict[str, int], seed: int = 1) -> dict[str, tuple[Tensor, Tensor]]:
    """`keep` with the columns of every input group drawn from one random permutation of the group
    (nested sets, here equal ones: one ρ everywhere); rows stay per layer."""
    g = torch.Generator().manual_seed(seed)
    out = dict(keep)
    for group in groups:
        n = d_in[group[0]]
        cols = torch.randperm(n, generator=g)[: max(1, round(density * n))].sort().values
        for lid in group:
            out[lid] = (keep[lid][0], cols)
    return out


def make_ours(backbone: nn.Module, size: Size, r: int, alpha: float, density: float,
              shared: bool = False) -> Variant:
    """plr's adapter at keep ratio ρ = `density` (1: dense LoRA); `shared`: the columns of the layers
    that read one input are nested per group and the input is gathered once per group
    (`adapter.mask.shared_input`)."""
    net = _copy(backbone, size)
    cfg = LoRAConfig(r=r, alpha=alpha, dropout=0.0, targets=size.targets, exclude=size.head_modules)
    keep = None if density >= 1 else random_keep(net, cfg, density)
    groups = input_groups(backbone, size, cfg) if shared and keep is not None else []
    if groups:
        d_in = {layer_id(name, key): net.get_submodule(name).in_features
                for name, slices in find_targets(net, cfg).items() for key in slices}
        keep = shared_keep(keep, groups, density, d_in)  # type: ignore[arg-type]
    branches = inject_lora(net, cfg, keep)
    attach(branches, groups)
    freeze_for_adapter(net, size.head_modules)
    counts = count_adapter_parameters(net)
    label = "dense LoRA (ours)" if density >= 1 else f"Partial-LoRA ρ={density:g}"
    if groups:
        label += ", shared input"
    return Variant(label, "ours", Classifier(net, size.family, size.head_modules), counts["adapter"],
                   counts["layers"], density=min(density, 1.0), shared=bool(groups))
