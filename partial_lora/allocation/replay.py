"""Replay cached block outputs so a repeated evaluation only recomputes what changed.

The threshold allocator evaluates the same few-shot batches dozens of times, each time with
the probe adapter masked differently. When two consecutive configurations agree on every
layer in blocks 0..k-1 of the backbone's block list, those blocks compute exactly the same
outputs both times: `BlockReplay` records every block's output during an evaluation and, in
the next one, returns the recorded outputs of the blocks before the first changed block
instead of running them. The first recomputed block then receives the recorded input, so the
results are the ones a full forward pass gives (tested to equality).

It needs the adapted layers to live in one list of repeated blocks (`nn.ModuleList` or
`nn.Sequential`: BERT's `encoder.layer`, ViT's `blocks`, LLaMA's `layers`), or in lists that
are the items of one such list (EfficientNet's `blocks.<stage>.<block>`), that the model calls
once per forward pass, in order; otherwise, or when the recorded outputs exceed the
memory budget, it switches itself off and every evaluation runs in full.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

log = logging.getLogger("plr")

Config = Mapping[str, Any]


def _innermost(lid: str, lists: set[str]) -> tuple[str, int] | None:
    """(the innermost block list holding layer `lid`, its index in that list)."""
    parts = lid.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in lists and parts[i].isdigit():
            return prefix, int(parts[i])
    return None


def find_blocks(net: nn.Module, layer_ids: Iterable[str]) -> tuple[list[str], dict[str, int]] | None:
    """(the blocks' module names in call order, layer id -> block index) when the layers live in
    repeated blocks, else None.

    One list holds every layer (BERT's `encoder.layer`, ViT's `blocks`): its items are the blocks.
    The layers sit one level deeper, in lists that are items of one outer list (timm's EfficientNet:
    `blocks.<stage>.<block>`): the blocks are the inner lists' items, stage after stage, and an
    outer item without adapted layers is one block itself.
    """
    lists = {name for name, m in net.named_modules() if isinstance(m, nn.ModuleList | nn.Sequential) and len(m) > 1}
    found: dict[str, tuple[str, int]] = {}
    for lid in layer_ids:
        hit = _innermost(lid, lists)
        if hit is None:
            return None
        found[lid] = hit
    names = {p for p, _ in found.values()}
    if len(names) == 1:
        name = names.pop()
        return [f"{name}.{i}" for i in range(len(net.get_submodule(name)))], {lid: i for lid, (_, i) in found.items()}
    # Each inner list is an item of the parent list (a layer in a one-block stage has the parent itself).
    parents = {(o[0] if (o := _innermost(n, lists)) else n) for n in names}
    if len(parents) != 1:
        return None
    parent = parents.pop()
    if any(n != parent and not n.startswith(parent + ".") for n in names):
        return None
    blocks: list[str] = []
    index: dict[str, int] = {}
    for j in range(len(net.get_submodule(parent))):
        item = f"{parent}.{j}"
        for b in ([f"{item}.{k}" for k in range(len(net.get_submodule(item)))] if item in names else [item]):
            index[b] = len(blocks)
            blocks.append(b)
    return blocks, {lid: index[f"{p}.{i}"] for lid, (p, i) in found.items()}


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, tuple | list):
        return sum(_nbytes(v) for v in x)
    if isinstance(x, dict):
        return sum(_nbytes(v) for v in x.values())
    return 0


class BlockReplay:
    """Record block outputs per batch; replay the unchanged prefix in the next evaluation.

    Use as a context manager around a series of evaluations over the same batches, calling
    `begin(config)` before each one. `config` maps layer id -> anything comparable (the keep
    ratio, or a marker for "adapter removed"); layers missing from it count as unchanged
    defaults (`default`).

    Args:
        net: the backbone.
        layer_ids: the adapted layers' module names in `net`.
        budget_mb: the most memory the recorded outputs may take (they stay on the model's
            device); 0 switches replay off.
        default: the value a layer missing from a config has.
    """

    def __init__(self, net: nn.Module, layer_ids: Iterable[str], budget_mb: float = 2048.0,
                 default: Any = 1.0) -> None:
        self.default = default
        self.budget = budget_mb * 2**20
        found = find_blocks(net, list(layer_ids))
        self.enabled = budget_mb > 0 and found is not None
        self.blocks: list[nn.Module] = []
        self.block_of: dict[str, int] = {}
        if found is not None:
            names, self.block_of = found
            self.blocks = [net.get_submodule(n) for n in names]
        self.outputs: list[list[Any]] = [[] for _ in self.blocks]
        self.size = 0           # bytes held in `outputs`
        self.recorded: dict[str, Any] | None = None  # the config the outputs belong to
        self.start = 0          # first block computed in the current evaluation
        self.calls = [0] * len(self.blocks)
        self.saved_blocks = 0   # block forward passes skipped, over all evaluations
        self.total_blocks = 0
        self._patched = False

    # ---------------------------------------------------------------- context
    def __enter__(self) -> BlockReplay:
        if self.enabled:
            for k, block in enumerate(self.blocks):
                block.forward = types.MethodType(self._forward_of(k, block.forward), block)
            self._patched = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._patched:
            for block in self.blocks:
                del block.forward  # back to the class's forward
            self._patched = False
        self.outputs, self.size = [[] for _ in self.blocks], 0

    def _forward_of(self, k: int, forward: Callable[..., Any]) -> Callable[..., Any]:
        def replay_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if not self.enabled:
                return forward(*args, **kwargs)
            b = self.calls[k]
            self.calls[k] += 1
            self.total_blocks += 1
            if k < self.start:
                self.saved_blocks += 1
                return self.outputs[k][b]
            out = forward(*args, **kwargs)
            if b < len(self.outputs[k]):
                self.size -= _nbytes(self.outputs[k][b])
                self.outputs[k][b] = out
            else:
                self.outputs[k].append(out)
            self.size += _nbytes(out)
            if self.size > self.budget:  # checked as it records: an LLM's outputs could fill the GPU
                log.info("activation replay off: the recorded block outputs exceed the %.0f MiB budget "
                         "(adapter.allocation.replay_mb)", self.budget / 2**20)
                self._disable()
            return out

        return replay_forward

    # ---------------------------------------------------------------- per evaluation
    def begin(self, config: Config) -> None:
        """Prepare an evaluation of `config`: replay the blocks before the first changed one."""
        if not self.enabled:
            return
        config = dict(config)
        if self.recorded is None:
            self.start = 0
        else:
            changed = [lid for lid in self.block_of
                       if config.get(lid, self.default) != self.recorded.get(lid, self.default)]
            self.start = min((self.block_of[lid] for lid in changed), default=len(self.blocks))
        self.recorded = config
        self.calls = [0] * len(self.blocks)

    def end(self, batches: int) -> None:
        """Check the evaluation that just ran; switch replay off if it cannot be trusted."""
        if not self.enabled:
            return
        if any(c != batches for c in self.calls):
            log.warning("activation replay off: the model does not call each block once per batch (%s calls for "
                        "%d batches)", sorted(set(self.calls)), batches)
            self._disable()
            return

    def _disable(self) -> None:
        self.enabled = False
        self.start = 0
        self.recorded = None
        self.outputs = [[] for _ in self.blocks]
        self.size = 0

    @property
    def saved_share(self) -> float:
        """Share of block forward passes that were replayed instead of computed."""
        return self.saved_blocks / max(1, self.total_blocks)
