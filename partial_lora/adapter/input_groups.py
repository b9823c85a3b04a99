"""Input groups: the adapted layers that read the same input tensor [ours, `adapter.mask.shared_input`].

Query and value of one attention block read one tensor; dense LoRA's branches save that x once
for backward, two sparse branches save their own gathered x[:, C_q] and x[:, C_v]. With
`adapter.mask.shared_input` the extract stage finds such groups (`trace`), draws the members'
column sets from one ranking of the group (`masks.rank_group`, so the sets nest) and records the
groups with the masks; retrain, evaluate and export `attach` them, and the forward gathers the
input once per group (`InputGroup`).

Groups are found by running the model, not from module names: `trace` hooks every plr
`LoRALinear`, runs one forward pass, and groups the layers that received the identical tensor
object. The branches of one fused layer (timm's `qkv` with a q and a v branch) read one input by
construction and fall in one group. `LoRAConv` layers are left out: their branches gather input
channels on their own (`LoRAConv.branch_update`), never through a group.

Under data parallel and FSDP nothing changes: every process traces the same batch (FSDP: every
process runs extract), and `working_set.build.setup` attaches the groups before FSDP shards the model.
Checked by hand with 2 CPU processes (gloo), DDP and FSDP: the masks and groups equal one
process's, and the retrained adapter matches it to 6e-7.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from partial_lora.adapter.inject import layer_id
from partial_lora.adapter.lora import LoRABranch, LoRAConv, LoRALinear
from partial_lora.errors import PlrError


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
    """Make each group's branches gather their input once (`InputGroup`).

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


class InputGroup:
    """Branches that read one input tensor and gather it once [ours, `adapter.mask.shared_input`].

    The first member called with an input x computes x_U = x[..., U] (U: the union of the members'
    kept columns, sorted; with nested column sets, the largest of them) and caches it; the other
    members called with the *same* tensor object (a weak reference, checked with its version
    counter and the grad mode) get the cached x_U, so autograd saves it once for all of them. A
    member multiplies x_U by its A scattered into U's positions (its A itself when its columns
    are U). The cache lets go of x_U once every member has been served for that x (autograd
    keeps what backward needs). A call with any other tensor gathers again, so a wrong group can
    only cost the saving, never give another result. Not for branches with input dropout (each
    would need its own dropout mask of x). `input_groups.attach` leaves out a member that keeps
    every column (it reads x itself, as without a group) and `input_groups.trace` the `LoRAConv`
    layers (their branches do not go through `hidden`).

    Args:
        members: two or more branches of the same input size, none with dropout, none already
            in a group.

    Raises:
        PlrError: fewer than two members, different input sizes, dropout, or a branch in two groups.
    """

    def __init__(self, members: Sequence[LoRABranch]) -> None:
        if len(members) < 2:
            raise PlrError("an input group needs two or more LoRA branches")
        if len({b.d_in for b in members}) != 1:
            raise PlrError("an input group's branches must read inputs of one size; the groups do not fit this "
                           "model (rerun extract)")
        if any(isinstance(b.dropout, nn.Dropout) for b in members):
            raise PlrError("adapter.mask.shared_input gathers one input for several layers, so they cannot draw "
                           "their own input dropout; set adapter.dropout=0 or adapter.mask.shared_input=false")
        if any(b.input_group is not None for b in members):
            raise PlrError("a LoRA branch is in two input groups; the groups of the masks file overlap (rerun extract)")
        union = torch.unique(torch.cat([b.cols.cpu() for b in members]))  # sorted
        self.size, self.n = len(union), len(members)
        self.full = self.size == members[0].d_in  # U is every column: x_U is x itself
        for b in members:
            device = b.cols.device
            b.group_cols = None if self.full else union.to(device)
            same = len(b.cols) == self.size
            b.group_pos = None if same else torch.searchsorted(union, b.cols.cpu()).to(device)
            b.input_group = self
        self._ref: weakref.ref[Tensor] | None = None
        self._state: tuple[int, bool] | None = None
        self._xu: Tensor | None = None
        self._served: set[int] = set()

    def gather(self, x: Tensor, branch: LoRABranch) -> Tensor:
        """x at the group's columns U: computed once per input tensor, shared by the members."""
        if self.full:
            return x
        if not torch.compiler.is_compiling() and x.is_inference():  # no version counter: gather, uncached
            return x.index_select(-1, branch.group_cols)
        state = (x._version, torch.is_grad_enabled())
        if self._xu is None or self._ref is None or self._ref() is not x or self._state != state:
            self._xu = x.index_select(-1, branch.group_cols)
            self._ref, self._state, self._served = weakref.ref(x), state, set()
        xu = self._xu
        self._served.add(id(branch))
        if len(self._served) >= self.n:  # every member has it: drop the cache's reference
            self.release()
        return xu

    def release(self) -> None:
        """Forget the cached x_U (the next call gathers again)."""
        self._xu = self._ref = self._state = None
        self._served = set()

    def code(self, branch: LoRABranch, x: Tensor) -> Tensor:
        """A member's rank-r code of x, (..., r): x_U times its A scattered into U's positions."""
        xu = self.gather(x, branch)
        a = branch.factors()[1].to(xu.dtype)
        if branch.group_pos is not None:
            a = a.new_zeros(branch.r, xu.shape[-1]).index_copy(1, branch.group_pos, a)
        return xu @ a.t()

    def __getstate__(self) -> dict:  # a weak reference does not pickle; the cache need not travel
        return {**self.__dict__, "_ref": None, "_state": None, "_xu": None, "_served": set()}
