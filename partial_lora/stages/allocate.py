"""allocate: a keep ratio per adapted layer (`partial_lora.allocation`). `adapter.sparsity=auto` runs the
configured allocator (threshold by default: the trained probe masked at grid ratios and scored on its
few-shot validation set, `masked_probe`); `adapter.sparsity=<s>` keeps 1 − s everywhere, no probe.
Writes `allocation.json` (per layer: ratio, rows, cols, every score tried; a_ref, a_0, τ, target) and
`allocation.png`. The search ranks each layer on its own, also with `adapter.mask.shared_input`, so
that option is not an allocation setting and `from_run` reuses an allocation across it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from partial_lora import artifacts, rundir
from partial_lora.adapter.inject import base_weights
from partial_lora.adapter.masks import LayerInfo, lora_parameters, rank_layer
from partial_lora.allocation import allocators
from partial_lora.allocation.masked_probe import MaskedProbe
from partial_lora.allocation.plot import plot
from partial_lora.spec import RunSpec
from partial_lora.tracking import Tracker
from partial_lora.training.runtime import autocast_dtype, set_seed
from partial_lora.working_set.build import Setup, setup
from partial_lora.working_set.loaders import few_shot_sets, loader
from partial_lora.working_set.measure import snip_of_branches
from partial_lora.working_set.trained import load_trained

NAME = artifacts.ALLOCATE


def run(spec: RunSpec, run_dir: Path, tracker: Tracker | None = None) -> dict[str, Any]:
    acfg, r, sides = spec.allocation, spec.lora.r, spec.mask.sides
    set_seed(spec.seed)
    s = setup(spec)
    layers = [allocators.Layer(lid, b.d_out, b.d_in) for lid, b in s.branches.items()]
    per_rank = sum(lora_parameters(1, la.d_out, la.d_in) for la in layers)
    budget = float(spec.match.target(per_rank)) if spec.match.active else acfg.budget
    t0 = time.perf_counter()
    alloc = allocators.without_probe(spec.sparsity, acfg, layers, r, sides, budget,
                                     lambda: base_weights(s.built.model.net),
                             s.device) or search(spec, run_dir, s, layers, budget)
    if budget is not None and alloc.allocator != "proportional":
        # matched budgets: another run's parameter count, N, or dense LoRA at rank k
        alloc = allocators.rescale_to_budget(alloc, budget)
    search_s = time.perf_counter() - t0
    out = artifacts.stage_dir(run_dir, NAME)
    record = {**alloc.to_json(), "settings": rundir.allocation_settings(spec), "search_wall_s": search_s}
    artifacts.write_json(out / artifacts.ALLOCATION, record)
    plot(alloc, out / artifacts.ALLOCATION_PNG, title=f"{spec.task} · {spec.model.name} · r={r}")
    return {**alloc.summary(), "search_wall_s": search_s}


def search(spec: RunSpec, run_dir: Path, s: Setup, layers: list[allocators.Layer], budget: float
           | None) -> allocators.Allocation:
    """The allocators that search the trained probe on its few-shot validation set (`masked_probe`)."""
    probe, acfg, method = artifacts.stage_dir(run_dir, artifacts.PROBE), spec.allocation, spec.search_masks
    snip = snip_of_branches(spec, s)[0] if method == "snip" else {}  # W0's gradient with no update: before the probe
    load_trained(s, probe)
    s.built.model.to(s.device).eval()
    # Each part (a multi-task run's member) on its own few-shot set, collated once for every evaluation.
    sets = few_shot_sets(s, artifacts.read_json(probe / artifacts.FEWSHOT)["val"])
    scored = [(p.view, list(loader(s, d, spec.train, train=False)), p.main)
              for p, d in zip(s.parts(), sets, strict=True)]
    weights = base_weights(s.built.model.net)
    rankings = {lid: rank_layer(method, LayerInfo(lid, weights[lid], b.delta_weight(), snip.get(lid)), spec.mask_seed,
                                spec.mask.energy) for lid, b in s.branches.items()}
    by_loss = acfg.metric == "loss"
    masked = MaskedProbe(s.built.model.net, s.branches, weights, rankings, scored, s.device,
                         autocast_dtype(spec.train, s.device), sides=spec.mask.sides,
                         truncating=acfg.allocator == "truncation", by_loss=by_loss, replay_mb=acfg.replay_mb)
    return masked.search(layers, spec.lora.r, acfg, budget, "loss" if by_loss else spec.main_metric)
