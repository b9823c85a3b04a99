"""Per-layer keep ratios: how much of each layer's rows and columns the sparse adapter keeps.

The paper's point is that *how much* sparsity each layer gets matters more than which entries
are kept. Allocators behind one interface (`ALLOCATORS`):

- `threshold` (the paper's Algorithm 1, our reading; `adapter.sparsity=auto`): mask the trained
  probe adapter at keep ratios from a grid and keep, per layer, the smallest ratio at which the
  few-shot validation accuracy stays at or above a target. `target = τ·a_ref`
  (`relative_to=probe`, the paper's words) or `a_0 + τ·(a_ref − a_0)` (`relative_to=gain`, ours),
  where a_ref is the probe's accuracy and a_0 the accuracy with every adapter removed.
  `mode=joint` (default, ours) visits layers from the least to the most sensitive and tests each
  ratio with every other layer at its current ratio; `mode=independent` (the literal reading)
  tests each layer alone with all others dense.
- `truncation` (ours, another reading of "relating the top subspaces of the pretrained block"):
  the same search as `threshold`, but what a ratio ρ does to a layer is to replace W0 by its
  rank-k truncation, k = round(ρ·min(d_out, d_in)) of its top singular directions, in the
  probed model (the probe's adapter dense). A layer's keep ratio is the smallest share whose
  truncation still reaches the target.
- `proportional` (ours): split a target parameter budget (`adapter.allocation.budget` or
  `adapter.match.*`) over layers in proportion to each layer's measured sensitivity.
- `spectrum` (ours): ratio = share of W0's singular values holding `energy` of its energy.
- `uniform`: one ratio everywhere (the control; `adapter.sparsity=0.8` keeps 20%).
- `rescale_to_budget`: scale any allocation so the total hits a parameter budget.

The allocators that measure the probe (`threshold`, `truncation`, `proportional`) are in
`partial_lora.allocation.search`. Nothing here or there touches a model: the threshold allocator calls an
`evaluate(ratios) -> accuracy` function that the allocate stage provides.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from partial_lora.adapter.masks import kept, lora_parameters, subspace_k
from partial_lora.errors import PlrError

DEFAULT_GRID = (1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125)


@dataclass(frozen=True)
class AllocationConfig:
    """The `adapter.allocation` config node.

    Attributes:
        allocator: `threshold`, `spectrum` or `uniform`.
        tau: accuracy threshold τ in (0, 1].
        metric: what the threshold search measures on the few-shot validation set: `task` (the
            task's main metric, e.g. accuracy; the paper's Algorithm 1) or `loss` [ours], for
            tasks without an accuracy (generative fine-tuning): a ratio passes while the loss
            keeps at least τ of the probe's improvement over no adapter,
            `L ≤ L_0 − τ·(L_0 − L_ref)` (the `gain` form; `probe` has no meaning for a loss).
        grid: keep ratios to try, each in (0, 1].
        mode: `joint` or `independent` (threshold allocator).
        relative_to: `probe` or `gain` (threshold allocator); None: `probe` for metric=task,
            `gain` for metric=loss.
        ratio: the keep ratio of the uniform allocator.
        energy: spectral energy share of the spectrum allocator.
        budget: rescale the result to this many adapter parameters (> 1) or this share of
            dense LoRA's parameters (in (0, 1]); None keeps the allocation as found.
        floor_warning: warn when at least this share of layers ends at the grid's smallest ratio.
        search_masks: how the threshold search picks rows/columns when masking the probe
            (None: the same as `adapter.mask.method`). Setting it apart lets a run keep an
            allocation found with subspace masks but retrain with random ones.
        replay_mb: memory budget (MiB) for replaying unchanged blocks' outputs between the
            search's evaluations (`partial_lora.allocation.replay`); 0 computes every evaluation in full.
            Results are identical either way; only the time differs.
    """

    allocator: str = "threshold"
    tau: float = 0.9
    metric: str = "task"
    grid: Sequence[float] = DEFAULT_GRID
    mode: str = "joint"
    relative_to: str | None = None
    ratio: float | None = None
    energy: float = 0.9
    budget: float | None = None
    floor_warning: float = 0.5
    search_masks: str | None = None
    replay_mb: float = 2048.0

    def __post_init__(self) -> None:
        if self.allocator not in ALLOCATORS:
            raise PlrError(f"unknown adapter.allocation.allocator '{self.allocator}'; use one of: "
                           f"{', '.join(ALLOCATORS)}")
        if not 0 < self.tau <= 1:
            raise PlrError(f"adapter.allocation.tau must be in (0, 1], got {self.tau}; the paper uses 0.9")
        if not self.grid:
            raise PlrError("adapter.allocation.grid is empty; give keep ratios such as [1,0.5,0.25,0.125]")
        if any(not 0 < g <= 1 for g in self.grid):
            raise PlrError(f"adapter.allocation.grid ratios must be in (0, 1], got {list(self.grid)}")
        if self.mode not in ("joint", "independent"):
            raise PlrError(f"adapter.allocation.mode must be joint or independent, got '{self.mode}'")
        if self.metric not in ("task", "loss"):
            raise PlrError(f"adapter.allocation.metric must be task or loss, got '{self.metric}'")
        if self.relative_to is None:
            object.__setattr__(self, "relative_to", "gain" if self.metric == "loss" else "probe")
        if self.relative_to not in ("probe", "gain"):
            raise PlrError(f"adapter.allocation.relative_to must be probe or gain, got '{self.relative_to}'")
        if self.metric == "loss" and self.relative_to == "probe":
            raise PlrError("adapter.allocation.metric=loss measures the loss improvement over no adapter; "
                           "set adapter.allocation.relative_to=gain (or null)")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise PlrError(f"adapter.allocation.ratio must be in (0, 1], got {self.ratio}")
        if not 0 < self.energy <= 1:
            raise PlrError(f"adapter.allocation.energy must be in (0, 1], got {self.energy}")
        if self.replay_mb < 0:
            raise PlrError(f"adapter.allocation.replay_mb must be >= 0 (0 turns replay off), got {self.replay_mb}")
        if self.budget is not None and self.budget <= 0:
            raise PlrError("adapter.allocation.budget must be positive (parameters, or a share <= 1), got "
                           f"{self.budget}")


@dataclass(frozen=True)
class Layer:
    """An adapted layer's shape (a branch of the adapter)."""

    name: str
    d_out: int
    d_in: int


@dataclass
class LayerAllocation:
    name: str
    d_out: int
    d_in: int
    ratio: float
    rows: int
    cols: int
    tried: dict[str, float] = field(default_factory=dict)  # keep ratio -> few-shot accuracy
    sensitivity: float | None = None                        # accuracy with only this layer at the floor


@dataclass
class Allocation:
    """Per-layer ratios and how they were found (written to allocation.json)."""

    allocator: str
    layers: list[LayerAllocation]
    r: int
    sides: str = "both"         # which sides the ratio masks (adapter.mask.sides): both | rows | cols
    tau: float | None = None
    metric: str | None = None   # task (a_ref, a_0, target are the task's metric) or loss (they are losses)
    a_ref: float | None = None
    a_0: float | None = None
    target: float | None = None
    mode: str | None = None
    relative_to: str | None = None
    grid: list[float] | None = None
    joint_accuracy: float | None = None
    evaluations: int = 0
    replayed_share: float | None = None  # share of block forward passes replayed, not computed
    budget: float | None = None
    warnings: list[str] = field(default_factory=list)

    def ratios(self) -> dict[str, float]:
        return {layer.name: layer.ratio for layer in self.layers}

    def params(self) -> int:
        return sum(lora_parameters(self.r, la.rows, la.cols) for la in self.layers)

    def dense_params(self) -> int:
        return sum(lora_parameters(self.r, la.d_out, la.d_in) for la in self.layers)

    def summary(self) -> dict[str, Any]:
        """What the allocate stage reports (its metrics.json): the allocator, the parameter counts, the
        ratios' spread, and what a search measured."""
        ratios = [la.ratio for la in self.layers]
        return {"allocator": self.allocator, "params": self.params(), "dense_params": self.dense_params(),
                "reduction_pct": 100.0 * (1 - self.params() / self.dense_params()),
                "ratio_min": min(ratios), "ratio_median": statistics.median(ratios), "ratio_max": max(ratios),
                "metric": self.metric, "a_ref": self.a_ref, "a_0": self.a_0, "target": self.target,
                "joint_accuracy": self.joint_accuracy, "evaluations": self.evaluations,
                "replayed_share": self.replayed_share, "floor_share": self.floor_share()}

    def floor_share(self) -> float:
        if not self.grid:
            return 0.0
        floor = min(self.grid)
        return sum(la.ratio <= floor for la in self.layers) / max(1, len(self.layers))

    def to_json(self) -> dict:
        out = asdict(self)
        out.update(params=self.params(), dense_params=self.dense_params(),
                   reduction_pct=100.0 * (1 - self.params() / max(1, self.dense_params())),
                   floor_share=self.floor_share())
        return out

    @classmethod
    def from_json(cls, d: Mapping) -> Allocation:
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in d.items() if k in known}
        values["layers"] = [LayerAllocation(**la) for la in d["layers"]]
        return cls(**values)


def layer_allocation(layer: Layer, ratio: float, sides: str = "both") -> LayerAllocation:
    rows, cols = kept(ratio, layer.d_out, layer.d_in, sides)
    return LayerAllocation(layer.name, layer.d_out, layer.d_in, ratio, rows, cols)


def uniform(layers: Sequence[Layer], r: int, ratio: float, sides: str = "both") -> Allocation:
    return Allocation("uniform", [layer_allocation(la, ratio, sides) for la in layers], r, sides=sides)


def spectrum(layers: Sequence[Layer], r: int, ks: Mapping[str, int], sides: str = "both") -> Allocation:
    """Ratio = k / min(d_out, d_in), with k the singular values holding the energy share (see masks)."""
    return Allocation("spectrum", [layer_allocation(la, min(1.0, ks[la.name] / min(la.d_out, la.d_in)), sides)
                                   for la in layers], r, sides=sides)


def without_probe(sparsity: float | str, cfg: AllocationConfig, layers: Sequence[Layer], r: int, sides: str,
                  budget: float | None, weights: Callable[[], Mapping[str, Tensor]],
                  device: torch.device) -> Allocation | None:
    """The allocation of the allocators that read no probe: uniform (`adapter.sparsity=<s>` keeps 1 − s
    everywhere, or `allocator=uniform` at `ratio`) and spectrum (each layer's W0 from `weights`); None
    for the allocators that search the probe (`NEEDS_PROBE`), once `proportional` has its budget."""
    if sparsity != "auto":
        return uniform(layers, r, 1.0 - float(sparsity), sides)
    if cfg.allocator == "uniform":
        if cfg.ratio is None:
            raise PlrError("adapter.allocation.allocator=uniform needs adapter.allocation.ratio=<keep ratio> "
                           "(or use adapter.sparsity=<s>)")
        return uniform(layers, r, cfg.ratio, sides)
    if cfg.allocator == "spectrum":
        w = weights()
        ks = {la.name: subspace_k(torch.linalg.svdvals(w[la.name].to(device).double()), cfg.energy) for la in layers}
        return spectrum(layers, r, ks, sides)
    if cfg.allocator == "proportional" and budget is None:
        raise PlrError("adapter.allocation.allocator=proportional splits a budget: set adapter.allocation.budget="
                       "<parameters, or a share of dense LoRA <= 1> or adapter.match.run/budget/rank")
    return None


def _params_at(layers: Sequence[LayerAllocation], r: int, scale: float, sides: str = "both") -> int:
    return sum(lora_parameters(r, *kept(min(1.0, la.ratio * scale), la.d_out, la.d_in, sides)) for la in layers)


def rescale_to_budget(alloc: Allocation, budget: float) -> Allocation:
    """Scale every ratio by one factor so the adapter's parameters land on `budget`.

    `budget` > 1 is a number of parameters; in (0, 1] a share of dense LoRA's parameters.
    Ratios stay in (0, 1]; the result is within about one row or column per layer of the target
    (the closest the rounding allows).
    """
    target = budget * alloc.dense_params() if budget <= 1 else budget
    lo_bound = _params_at(alloc.layers, alloc.r, 0.0, alloc.sides)
    if target < lo_bound or target > alloc.dense_params():
        raise PlrError(f"adapter.allocation.budget={budget:g} is outside what the adapter can hold "
                       f"({lo_bound} to {alloc.dense_params()} parameters at r={alloc.r})")
    lo, hi = 0.0, 1.0 / max(1e-12, min(la.ratio for la in alloc.layers))
    for _ in range(60):  # bisection on the common factor; params(scale) is monotone
        mid = (lo + hi) / 2
        if _params_at(alloc.layers, alloc.r, mid, alloc.sides) < target:
            lo = mid
        else:
            hi = mid
    scale = min((lo, hi), key=lambda s: abs(_params_at(alloc.layers, alloc.r, s, alloc.sides) - target))
    layers = []
    for la in alloc.layers:
        new = layer_allocation(Layer(la.name, la.d_out, la.d_in), min(1.0, la.ratio * scale), alloc.sides)
        new.tried, new.sensitivity = la.tried, la.sensitivity
        layers.append(new)
    out = Allocation(**{**{k: getattr(alloc, k) for k in alloc.__dataclass_fields__}, "layers": layers})
    out.budget = float(target)
    return out


ALLOCATORS = ("threshold", "truncation", "proportional", "spectrum", "uniform")
NEEDS_PROBE = ("threshold", "truncation", "proportional")  # allocators that read the trained probe
