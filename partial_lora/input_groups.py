"""Input groups: the adapted layers that read the same input tensor [ours, `adapter.mask.shared_input`].

Query and value of one attention block read one tensor; dense LoRA's branches save that x once
for backward, two sparse branches save their own gathered x[:, C_q] and x[:, C_v]. With
`adapter.mask.shared_input` the extract stage finds such groups (`trace`), draws the members'
column sets from one ranking of the group (`masks.rank_group`, so the sets nest) and records the
groups with the masks; retrain, evaluate and export `attach` them, and the forward gathers the
input once per group (`lora.InputGroup`).

Groups are found by running the model, not from module names: `trace` hooks every plr
`LoRALinear`, runs one forward pass, and groups the layers that received the identical tensor
object. The branches of one fused layer (timm's `qkv` with a q and a v branch) read one input by
construction and fall in one group. `LoRAConv` layers are left out: their branches gather input
channels on their own (`LoRAConv.branch_update`), never through a group.

Under data parallel and FSDP nothing changes: every process traces the same batch (FSDP: every
process runs extract), and `stages.base.setup` attaches the groups before FSDP shards the model.
Checked by hand with 2 CPU processes (gloo), DDP and FSDP: the masks and groups equal one
process's, and the retrained adapter matches it to 6e-7.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from partial_lora.errors import PlrError
from partial_lora.inject import layer_id
from partial_lora.lora import InputGroup, LoRABranch, LoRAConv, LoRALinear


def trace(net: nn.Module, forward: Callable[[], Any]) -> list[list[str]]:
    """The input groups of a model: branches whose layers read the identical input tensor.

    Args:
        net: the model with plr's LoRA layers injected (module names as in its layer ids).
        forward: runs one forward pass of the model (any batch; run under `torch.no_grad`).

    Returns:
        Groups of two or more layer ids, each in module order, the groups ordered by their first
        member. Layers that shared an input in any call of the pass are in one group.
    """
    layers = {name: m for name, m in net.named_modules() if isinstance(m, LoRALinear) and not isinstance(m, LoRAConv)}
    seen: list[tuple[Tensor, str]] = []  # holding the inputs keeps their ids unique during the pass

    def hook(name: str) -> Callable[..., None]:
        def record(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(x, Tensor):
                seen.append((x, name))
        return record

    handles = [m.register_forward_pre_hook(hook(name), with_kwargs=True) for name, m in layers.items()]
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in handles:
            h.remove()
    parent = {name: name for name in layers}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    first: dict[int, str] = {}
    for x, name in seen:
        other = first.setdefault(id(x), name)
        parent[root(name)] = root(other)
    seen.clear()
    members: dict[str, list[str]] = {}
    for name, m in layers.items():  # module order
        members.setdefault(root(name), []).extend(layer_id(name, key) for key in m.branches)
    return [g for g in members.values() if len(g) >= 2]


def attach(branches: Mapping[str, LoRABranch], groups: Sequence[Sequence[str]]) -> list[InputGroup]:
    """Make each group's branches gather their input once (`lora.InputGroup`).

    A member that keeps every column reads x itself, as without a group, and is left out; a
    group with fewer than two other members is not made.

    Raises:
        PlrError: a group names a layer the model does not adapt (masks of another model or target
            set), or its members cannot share an input (see `InputGroup`).
    """
    made = []
    for group in groups:
        missing = [lid for lid in group if lid not in branches]
        if missing:
            raise PlrError(f"the masks' input groups name layers this model does not adapt ({missing[:2]}); "
                           "rerun extract (the masks come from another model or target set)")
        sparse = [branches[lid] for lid in group if not branches[lid].all_cols]
        if len(sparse) >= 2:
            made.append(InputGroup(sparse))
    return made
