"""The allocators that measure the trained probe: the threshold search and the proportional split.

`threshold` is the paper's Algorithm 1 (our reading; `mode=joint` or `independent`), and
`truncation` runs the same search with another `evaluate`; `proportional` splits a parameter
budget by each layer's measured sensitivity (`sensitivities`). See `partial_lora.allocation.allocators`
for what each allocator does and for the result they return (`Allocation`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from partial_lora.adapter.masks import lora_parameters
from partial_lora.allocation.allocators import Allocation, AllocationConfig, Layer, layer_allocation, rescale_to_budget

log = logging.getLogger("plr")


def target_accuracy(a_ref: float, a_0: float, tau: float, relative_to: str) -> float:
    if relative_to == "gain":
        return a_0 + tau * (a_ref - a_0)
    return tau * a_ref


def threshold(layers: Sequence[Layer], r: int, cfg: AllocationConfig, *,
              evaluate: Callable[[Mapping[str, float]], float], a_ref: float, a_0: float,
              progress: Callable[[str], None] = lambda s: None, sides: str = "both",
              allocator: str = "threshold") -> Allocation:
    """The threshold allocator (see the module docstring of `partial_lora.allocation.allocators`).

    Args:
        layers: the adapted layers.
        r: LoRA rank (for parameter counts).
        cfg: τ, grid, mode, relative_to.
        evaluate: few-shot validation accuracy (or loss, with `cfg.metric=loss`) of the probe
            with each layer masked at its ratio (layers missing from the mapping are dense).
        a_ref: the probe's few-shot validation accuracy (all dense).
        a_0: the accuracy with every adapter removed.
        sides: which sides a ratio masks (`adapter.mask.sides`), for the row/column counts.
        allocator: the name recorded (`truncation` runs this search with another `evaluate`).
    """
    target = target_accuracy(a_ref, a_0, cfg.tau, str(cfg.relative_to))
    sign = -1.0 if cfg.metric == "loss" else 1.0  # a loss passes at or below the target

    def passes(a: float) -> bool:
        return sign * a >= sign * target
    ascending = sorted({float(g) for g in cfg.grid if g < 1})
    floor = ascending[0] if ascending else 1.0
    cache: dict[tuple, float] = {}

    def acc(ratios: Mapping[str, float]) -> float:
        key = tuple(sorted((k, v) for k, v in ratios.items() if v < 1))
        if key not in cache:
            cache[key] = evaluate({k: v for k, v in key})
        return cache[key]

    tried: dict[str, dict[str, float]] = {la.name: {} for la in layers}
    sensitivity: dict[str, float | None] = {la.name: None for la in layers}
    final: dict[str, float] = {}
    if not ascending:  # a grid of only 1.0: nothing to search
        final = {la.name: 1.0 for la in layers}
    elif cfg.mode == "independent":
        for i, la in enumerate(layers):
            final[la.name] = 1.0
            for rho in ascending:
                a = tried[la.name][str(rho)] = acc({la.name: rho})
                if passes(a):
                    final[la.name] = rho
                    break
            progress(f"layer {i + 1}/{len(layers)} {la.name}: keep {final[la.name]:g}")
    else:  # joint
        for la in layers:
            sensitivity[la.name] = tried[la.name][str(floor)] = acc({la.name: floor})
        order = sorted(layers, key=lambda la: -sign * sensitivity[la.name])  # least sensitive first
        current = {la.name: 1.0 for la in layers}
        for i, la in enumerate(order):
            for rho in ascending:
                a = tried[la.name][str(rho)] = acc({**current, la.name: rho})
                if passes(a):
                    current[la.name] = rho
                    break
            progress(f"layer {i + 1}/{len(layers)} {la.name}: keep {current[la.name]:g}")
        final = current
    alloc = Allocation(allocator, [], r, sides=sides, tau=cfg.tau, metric=cfg.metric, a_ref=a_ref, a_0=a_0,
                       target=target, mode=cfg.mode, relative_to=cfg.relative_to, grid=[float(g) for g in cfg.grid])
    for la in layers:
        la_alloc = layer_allocation(la, final[la.name], sides)
        la_alloc.tried, la_alloc.sensitivity = tried[la.name], sensitivity[la.name]
        alloc.layers.append(la_alloc)
    alloc.joint_accuracy = acc(final)
    alloc.evaluations = len(cache)
    if alloc.floor_share() >= cfg.floor_warning and len(ascending) > 0:
        msg = (f"{alloc.floor_share():.0%} of layers ended at the grid's smallest ratio {floor:g}: the grid may be "
               f"too coarse or the few-shot set too easy (joint {'loss' if cfg.metric == 'loss' else 'accuracy'} of "
               f"the allocation {alloc.joint_accuracy:.3f} "
               f"vs target {target:.3f}); try a finer grid, more shots"
               f"{', relative_to=gain' if cfg.relative_to == 'probe' else ''} or a higher tau")
        alloc.warnings.append(msg)
        log.warning(msg)
    return alloc


def sensitivities(layers: Sequence[Layer], cfg: AllocationConfig, *,
                  evaluate: Callable[[Mapping[str, float]], float], a_ref: float) -> dict[str, float]:
    """Each layer's measured sensitivity: how much the few-shot metric drops (or the loss rises)
    with only that layer at the grid's smallest ratio, at least 0."""
    floor = min(float(g) for g in cfg.grid)
    sign = -1.0 if cfg.metric == "loss" else 1.0
    return {la.name: max(0.0, sign * (a_ref - evaluate({la.name: floor}))) for la in layers}


def proportional(layers: Sequence[Layer], r: int, cfg: AllocationConfig, budget: float, *,
                 evaluate: Callable[[Mapping[str, float]], float], a_ref: float, a_0: float,
                 sides: str = "both", share_floor: float = 0.05) -> Allocation:
    """The budget-proportional allocator [ours]: split a parameter budget over layers in proportion to
    each layer's measured sensitivity (see `sensitivities`), then rescale to land on the budget.

    A layer's weight is its sensitivity plus `share_floor` × the mean sensitivity, so a layer
    whose masking changed nothing still keeps a little; when no layer is sensitive at all the
    split is even. `budget` is in parameters (> 1) or a share of dense LoRA (<= 1).
    """
    sens = sensitivities(layers, cfg, evaluate=evaluate, a_ref=a_ref)
    mean = sum(sens.values()) / max(1, len(sens))
    weights = {k: v + share_floor * mean for k, v in sens.items()} if mean > 0 else {k: 1.0 for k in sens}
    dense = sum(lora_parameters(r, la.d_out, la.d_in) for la in layers)
    target = budget * dense if budget <= 1 else budget
    total = sum(weights.values())
    out = []
    for la in layers:
        ratio = min(1.0, max(1e-6, target * weights[la.name] / total / lora_parameters(r, la.d_out, la.d_in)))
        alloc_la = layer_allocation(la, ratio, sides)
        alloc_la.sensitivity = sens[la.name]
        out.append(alloc_la)
    alloc = Allocation("proportional", out, r, sides=sides, tau=cfg.tau, metric=cfg.metric, a_ref=a_ref, a_0=a_0,
                       grid=[float(g) for g in cfg.grid], evaluations=len(layers))
    alloc = rescale_to_budget(alloc, budget)
    alloc.joint_accuracy = evaluate(alloc.ratios())
    return alloc
