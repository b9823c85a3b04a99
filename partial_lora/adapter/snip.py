"""SNIP importance of the pretrained weights: S = Σ_batches |W0 ⊙ ∂L/∂W0| on the task loss.

Two sparse adapters choose what they train from it, before any training:

- `adapter.mask.method=snip` (TASO-style, reconstructed [ours]): plr's compact row/column adapter
  keeps the rows with the largest row sums Σ_j S[i, j] and the columns with the largest column
  sums Σ_i S[i, j] (`masks.rank_snip`), instead of W0's top singular subspaces.
- `adapter=shira_snip` (SHiRA's SNIP mask): PEFT's SHiRA trains the entries with the largest
  S[i, j] of each layer (`top_entries`).

How S is measured [ours where the peers are silent]: the loss is the task's training loss
(`model.loss`) of the model as plr builds it, with its fresh head and no adapter update (a
freshly injected LoRA has B = 0), in eval mode (no dropout), with W0's gradient enabled for this
pass only (`torch.autograd.grad`: no `.grad` is left behind). The batches are `SnipConfig.batches`
batches of `batch_size` training examples drawn without replacement by a permutation seeded with
the run's seed (`examples`), so the same seed reads the same examples. |W0 ⊙ g| is taken per batch and
summed (the absolute value inside the sum, so opposite gradients of two batches do not cancel).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from partial_lora.errors import PlrError

B = TypeVar("B")


@dataclass(frozen=True)
class SnipConfig:
    """`adapter.snip`: the batches SNIP importance is measured on.

    Attributes:
        batches: how many training batches (at least 1).
        batch_size: examples per batch; None: the trainer's batch size.
    """

    batches: int = 4
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.batches < 1:
            raise PlrError(f"adapter.snip.batches must be >= 1 batch, got {self.batches}; e.g. adapter.snip.batches=4")
        if self.batch_size is not None and self.batch_size < 1:
            raise PlrError(f"adapter.snip.batch_size must be >= 1 (or null for trainer.batch_size), got "
                           f"{self.batch_size}; e.g. adapter.snip.batch_size=32")


def examples(n_train: int, batches: int, batch_size: int, seed: int) -> list[int]:
    """The training examples SNIP reads (indices into the training split), in batch order: the first
    batches·batch_size of a permutation of range(n_train) seeded with `seed` (all when there are fewer)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_train, generator=g)[: batches * batch_size].tolist()


def importance(loss: Callable[[B], Tensor], weights: Mapping[str, Tensor], batches: Iterable[B]) -> dict[str, Tensor]:
    """S[name] = Σ_b |W ⊙ ∂loss(b)/∂W| for each weight (float32, W's shape and device).

    Args:
        loss: the scalar loss of one batch (a forward pass through the model that holds `weights`).
        weights: the weights to score, by name (leaf tensors; their `requires_grad` is set for the
            pass and restored after).
        batches: what `loss` takes, one per backward pass.

    Raises:
        PlrError: `batches` was empty.
    """
    params = list(weights.values())
    flags = [p.requires_grad for p in params]
    scores = {k: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for k, w in weights.items()}
    n = 0
    try:
        for p in params:
            p.requires_grad_(True)
        for batch in batches:
            grads = torch.autograd.grad(loss(batch), params, allow_unused=True)
            for (k, w), g in zip(weights.items(), grads, strict=True):
                if g is not None:  # a weight the loss does not reach scores 0
                    scores[k] += (w.detach().float() * g.float()).abs()
            n += 1
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    if n == 0:
        raise PlrError("SNIP importance read no batch (the training split is empty?); check task.max_train_samples")
    return scores


def row_scores(s: Tensor) -> Tensor:
    """A row's importance: the sum of its entries' scores (d_out)."""
    return s.double().sum(1)


def col_scores(s: Tensor) -> Tensor:
    """A column's importance: the sum of its entries' scores (d_in)."""
    return s.double().sum(0)


def top_entries(s: Tensor, k: int) -> Tensor:
    """The k entries of a d_out × d_in score matrix with the largest scores, as (2, k) int64
    (row, column) pairs in row-major order; ties go to the lower row-major index."""
    if not 0 < k <= s.numel():
        raise PlrError(f"cannot keep {k} entries of a {tuple(s.shape)} layer; the budget per layer must be in "
                       f"[1, {s.numel()}]")
    order = torch.sort(s.detach().flatten().double().cpu(), descending=True, stable=True).indices[:k]
    flat = order.sort().values
    return torch.stack([flat // s.shape[1], flat % s.shape[1]])
