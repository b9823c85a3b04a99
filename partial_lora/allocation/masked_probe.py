"""The masked probe: the trained probe adapter at per-layer keep ratios, scored on its few-shot
validation set. `MaskedProbe.score(ratios)` is the `evaluate` that the searching allocators call
(`search.threshold`, `search.proportional`); `MaskedProbe.search` runs the configured one.

- `threshold` (and `proportional`): a layer at ratio ρ keeps the top rows and columns of its
  ranking (`masks.Ranking.keep`); ΔW = s·diag(u_row)·B·A·diag(u_col) is the dense probe's B and A
  multiplied by the block's 0/1 multipliers (`masks.KeptBlock.multipliers`), which is exactly that.
- `truncation`: the adapter stays dense and W0 becomes its rank-k truncation, k = round(ρ·min(d_out,
  d_in)) of its top singular directions (rewritten in place, and put back after).

Consecutive evaluations differ in a few layers: the blocks before the first changed one are replayed
from the previous evaluation instead of computed (`replay.BlockReplay`: same results, less time).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from partial_lora import distributed
from partial_lora.adapter.lora import LoRABranch
from partial_lora.adapter.masks import KeptBlock, Ranking, count
from partial_lora.allocation.allocators import Allocation, AllocationConfig, Layer
from partial_lora.allocation.replay import BlockReplay
from partial_lora.allocation.search import proportional, threshold
from partial_lora.errors import PlrError
from partial_lora.training.metrics import compute_metrics
from partial_lora.training.predict import predict

# (the model as one task sees it, that task's few-shot batches, its main metric): one per part of the run
Scored = tuple[Any, list[Any], str]


class MaskedProbe:
    """The probe's dense factors, masked or W0-truncated at given ratios and scored (see the module).

    Args:
        net: the backbone holding `branches` (the blocks `BlockReplay` replays).
        branches: the probe's LoRA branches by layer id, trained and dense.
        weights: each layer's W0 (the truncation allocator rewrites these in place).
        rankings: each layer's row and column ranking (the threshold search's masks).
        scored: what is scored, per part; the score is the mean over parts.
        sides / truncating / by_loss / replay_mb: the masks' sides, the truncation allocator, the
            few-shot loss instead of the main metric, the replay's memory budget.
    """

    def __init__(self, net: nn.Module, branches: Mapping[str, LoRABranch], weights: Mapping[str, Tensor],
                 rankings: Mapping[str, Ranking], scored: Sequence[Scored], device: torch.device,
                 dtype: torch.dtype | None, *, sides: str, truncating: bool, by_loss: bool,
                 replay_mb: float | None) -> None:
        if truncating and distributed.sharded():
            raise PlrError("adapter.allocation.allocator=truncation rewrites W0 in place, and trainer.strategy=fsdp "
                           "shards it; use trainer.strategy=ddp for it (or another allocator)")
        self.branches, self.weights, self.rankings, self.scored = branches, weights, rankings, scored
        self.device, self.dtype, self.sides, self.truncating, self.by_loss = device, dtype, sides, truncating, by_loss
        self.n_batches = sum(len(b) for _, b, _ in scored)
        self.dense = {lid: (distributed.full(b.lora_B.detach()).clone(), distributed.full(b.lora_A.detach()).clone())
                      for lid, b in branches.items()}
        self.multipliers: dict[tuple[str, float], tuple[Tensor, Tensor]] = {}
        self.svd = {lid: torch.linalg.svd(weights[lid].to(device).double(), full_matrices=False)
                    for lid in branches} if truncating else {}
        self.original = {lid: weights[lid].clone() for lid in branches} if truncating else {}
        self.replay = BlockReplay(net, branches, budget_mb=replay_mb)

    def masks(self, lid: str, rho: float) -> tuple[Tensor, Tensor]:
        """A layer's row and column multipliers at ratio ρ (made once per layer and ratio)."""
        if (lid, rho) not in self.multipliers:
            rows, cols = self.rankings[lid].keep(rho, self.sides)
            b, a = self.dense[lid]
            self.multipliers[lid, rho] = KeptBlock(rows, cols, b.shape[0], a.shape[1]).multipliers(b.device)
        return self.multipliers[lid, rho]

    @torch.no_grad()
    def set_ratios(self, ratios: Mapping[str, float], zero: bool = False) -> None:
        """Every layer at its ratio (1 when not given); `zero`: every adapter removed."""
        for lid, branch in self.branches.items():
            b, a = self.dense[lid]
            rho = ratios.get(lid, 1.0)
            if self.truncating:  # the adapter stays dense; W0 becomes its rank-k truncation (k from ρ)
                distributed.assign(branch.lora_B, torch.zeros_like(b) if zero else b)
                distributed.assign(branch.lora_A, a)
                w = self.weights[lid]
                if rho >= 1 or zero:
                    w.copy_(self.original[lid])
                else:
                    u, sv, vh = self.svd[lid]
                    k = count(rho, len(sv))
                    w.copy_(((u[:, :k] * sv[:k]) @ vh[:k]).to(w.dtype).to(w.device))
            elif zero:
                branch.lora_B.zero_()
            elif rho >= 1:
                distributed.assign(branch.lora_B, b)
                distributed.assign(branch.lora_A, a)
            else:
                rm, cm = self.masks(lid, rho)
                distributed.assign(branch.lora_B, b * rm)
                distributed.assign(branch.lora_A, a * cm)

    def score(self, ratios: Mapping[str, float], zero: bool = False) -> float:
        """The few-shot main metric (the mean over parts), or the few-shot loss (metric=loss)."""
        self.set_ratios(ratios, zero)
        self.replay.begin({lid: "removed" for lid in self.branches} if zero else ratios)
        values = []
        for view, batches, metric in self.scored:
            logits, labels, loss = predict(view, batches, self.device, self.dtype)
            values.append(loss if self.by_loss else compute_metrics(logits, labels, [metric])[metric])
        self.replay.end(self.n_batches)
        return sum(values) / len(values)

    def search(self, layers: list[Layer], r: int, acfg: AllocationConfig, budget: float | None,
               what: str) -> Allocation:
        """The configured searching allocator on this probe (a_ref: the probe as trained, a_0: no
        adapter); the probe is left as trained."""
        with self.replay:
            a_ref = self.score({})
            a_0 = self.score({}, zero=True)
            print(f"[plr] allocate: few-shot {what}: probe a_ref={a_ref:.3f}, no adapter a_0={a_0:.3f}, "
                  f"tau={acfg.tau}, relative_to={acfg.relative_to}, {len(layers)} layers, grid {list(acfg.grid)}")
            if acfg.allocator == "proportional":
                assert budget is not None
                alloc = proportional(layers, r, acfg, budget, evaluate=self.score, a_ref=a_ref, a_0=a_0,
                                     sides=self.sides)
            else:
                alloc = threshold(layers, r, acfg, evaluate=self.score, a_ref=a_ref, a_0=a_0,
                                  sides=self.sides, allocator=acfg.allocator)
        alloc.replayed_share = self.replay.saved_share
        self.set_ratios({})
        return alloc
