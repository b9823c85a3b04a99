"""allocate: a keep ratio per adapted layer (see `partial_lora.allocation.allocators`).

`adapter.sparsity=auto` runs the configured allocator (threshold by default, which masks the
trained probe adapter at grid ratios and measures few-shot validation accuracy);
`adapter.sparsity=<s>` keeps a uniform 1 − s everywhere without a probe. Writes
`allocation.json` (ratio, rows, cols and every accuracy tried per layer; a_ref, a_0, τ, target)
and `allocation.png`.

The search ranks every layer's rows and columns on its own, also with `adapter.mask.shared_input`
(where extract draws the columns of layers that read one input from one ranking of their group):
the search's masks may already differ from the final ones, as with `allocation.search_masks`.
So the option is not an allocation setting, and `from_run` reuses an allocation across it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from partial_lora.allocation import allocators as AL
from partial_lora import artifacts as A
from partial_lora import distributed as D
from partial_lora import rundir as RD
from partial_lora.allocation import search as AS
from partial_lora.errors import PlrError
from partial_lora.adapter.inject import base_weights
from partial_lora.adapter.masks import LayerInfo, Ranking, count, rank_layer, subspace_k
from partial_lora.training.metrics import compute_metrics
from partial_lora.training.predict import predict
from partial_lora.allocation.replay import BlockReplay
from partial_lora.training.runtime import autocast_dtype, set_seed
from partial_lora.spec import RunSpec
from partial_lora.working_set.build import Setup, setup
from partial_lora.working_set.loaders import few_shot_sets, loader
from partial_lora.working_set.trained import load_trained
from partial_lora.stages.extract import snip_of_branches
from partial_lora.tracking import Tracker

NAME = A.ALLOCATE


def run(spec: RunSpec, run_dir: Path, tracker: Tracker | None = None) -> dict[str, Any]:
    out = A.stage_dir(run_dir, NAME)
    acfg, sp = spec.allocation, spec.sparsity
    sides = spec.mask.sides
    set_seed(spec.seed)
    s = setup(spec)
    r = spec.lora.r
    layers = [AL.Layer(lid, b.d_out, b.d_in) for lid, b in s.branches.items()]
    match = spec.match
    budget = float(match.target(sum(la.d_out + la.d_in for la in layers))) if match.active else acfg.budget
    t0 = time.perf_counter()
    if sp != "auto":
        alloc = AL.uniform(layers, r, 1.0 - float(sp), sides)
    elif acfg.allocator == "uniform":
        if acfg.ratio is None:
            raise PlrError("adapter.allocation.allocator=uniform needs adapter.allocation.ratio=<keep ratio> "
                           "(or use adapter.sparsity=<s>)")
        alloc = AL.uniform(layers, r, acfg.ratio, sides)
    elif acfg.allocator == "spectrum":
        w = base_weights(s.built.model.net)
        ks = {la.name: subspace_k(torch.linalg.svdvals(w[la.name].to(s.device).double()), acfg.energy)
              for la in layers}
        alloc = AL.spectrum(layers, r, ks, sides)
    else:
        if acfg.allocator == "proportional" and budget is None:
            raise PlrError("adapter.allocation.allocator=proportional splits a budget: set adapter.allocation.budget="
                           "<parameters, or a share of dense LoRA <= 1> or adapter.match.run/budget/rank")
        alloc = _search(spec, run_dir, s, layers, acfg, sides, budget)
    if budget is not None and alloc.allocator != "proportional":
        # matched-budget controls: another run's parameter count, N, or dense LoRA at rank k
        alloc = AL.rescale_to_budget(alloc, budget)
    search_s = time.perf_counter() - t0
    A.write_json(out / A.ALLOCATION, {**alloc.to_json(), "settings": RD.allocation_settings(spec),
                                      "search_wall_s": search_s})
    plot(alloc, out / A.ALLOCATION_PNG, title=f"{spec.task} · {spec.model.name} · r={r}")
    ratios = [la.ratio for la in alloc.layers]
    return {"allocator": alloc.allocator, "params": alloc.params(), "dense_params": alloc.dense_params(),
            "reduction_pct": 100.0 * (1 - alloc.params() / alloc.dense_params()),
            "ratio_min": min(ratios), "ratio_median": statistics.median(ratios), "ratio_max": max(ratios),
            "metric": alloc.metric, "a_ref": alloc.a_ref, "a_0": alloc.a_0, "target": alloc.target,
            "joint_accuracy": alloc.joint_accuracy, "evaluations": alloc.evaluations,
            "replayed_share": alloc.replayed_share, "floor_share": alloc.floor_share(), "search_wall_s": search_s}


def _search(spec: RunSpec, run_dir: Path, s: Setup, layers: list[AL.Layer], acfg: AL.AllocationConfig,
            sides: str, budget: float | None) -> AL.Allocation:
    """The allocators that evaluate the trained probe on its few-shot validation set: `threshold`
    (masking the probe's adapter at each ratio), `truncation` (replacing W0 by its rank-k
    truncation, the adapter dense) and `proportional` (sensitivities at the floor, then a budget split)."""
    probe = A.stage_dir(run_dir, A.PROBE)
    net, model = s.built.model.net, s.built.model
    method = spec.search_masks
    # SNIP reads W0's gradient with no adapter update and the fresh head: before the probe is loaded.
    snip = snip_of_branches(spec, s)[0] if method == "snip" else {}
    load_trained(s, probe)
    fewshot = A.read_json(probe / A.FEWSHOT)
    tc = spec.train
    model.to(s.device).eval()
    # The few-shot validation set is tiny: collate (tokenise / transform) it once for all evaluations.
    # Each part (a multi-task run's member) is scored on its own few-shot set through its own head.
    main = spec.main_metric
    scored = [(p.view, list(loader(s, d, tc, train=False)), p.main)
              for p, d in zip(s.parts(), few_shot_sets(s, fewshot["val"]), strict=True)]
    n_batches = sum(len(b) for _, b, _ in scored)
    dtype = autocast_dtype(tc, s.device)
    by_loss = acfg.metric == "loss"
    mcfg = spec.mask
    mask_seed = spec.seed if mcfg.seed is None else mcfg.seed
    weights = base_weights(net)
    dense = {lid: (D.full(b.lora_B.detach()).clone(), D.full(b.lora_A.detach()).clone())
             for lid, b in s.branches.items()}
    rankings: dict[str, Ranking] = {
        lid: rank_layer(method, LayerInfo(lid, weights[lid], b.delta_weight(), snip.get(lid)), mask_seed, mcfg.energy)
        for lid, b in s.branches.items()}
    cache: dict[tuple[str, float], tuple[torch.Tensor, torch.Tensor]] = {}

    def masks(lid: str, rho: float) -> tuple[torch.Tensor, torch.Tensor]:
        if (lid, rho) not in cache:
            rows, cols = rankings[lid].keep(rho, sides)
            b, a = dense[lid]
            rm = torch.zeros(b.shape[0], 1, device=b.device)
            rm[rows.to(b.device)] = 1
            cm = torch.zeros(1, a.shape[1], device=a.device)
            cm[:, cols.to(a.device)] = 1
            cache[lid, rho] = rm, cm
        return cache[lid, rho]

    truncating = acfg.allocator == "truncation"
    if truncating and D.sharded():
        raise PlrError("adapter.allocation.allocator=truncation rewrites W0 in place, and trainer.strategy=fsdp "
                       "shards it; use trainer.strategy=ddp for it (or another allocator)")
    svd = {lid: torch.linalg.svd(weights[lid].to(s.device).double(), full_matrices=False)
           for lid in s.branches} if truncating else {}
    original = {lid: weights[lid].clone() for lid in s.branches} if truncating else {}

    @torch.no_grad()
    def set_ratios(ratios: Mapping[str, float], zero: bool = False) -> None:
        # ΔW = s·diag(u_row)·B·A·diag(u_col): masking B's rows and A's columns is exactly that.
        for lid, branch in s.branches.items():
            b, a = dense[lid]
            rho = ratios.get(lid, 1.0)
            if truncating:  # the adapter stays dense; W0 becomes its rank-k truncation (k from ρ)
                D.assign(branch.lora_B, torch.zeros_like(b) if zero else b)
                D.assign(branch.lora_A, a)
                if rho >= 1 or zero:
                    weights[lid].copy_(original[lid])
                else:
                    u, sv, vh = svd[lid]
                    k = count(rho, len(sv))
                    weights[lid].copy_(((u[:, :k] * sv[:k]) @ vh[:k]).to(weights[lid].dtype).to(weights[lid].device))
            elif zero:
                branch.lora_B.zero_()
            elif rho >= 1:
                D.assign(branch.lora_B, b)
                D.assign(branch.lora_A, a)
            else:
                rm, cm = masks(lid, rho)
                D.assign(branch.lora_B, b * rm)
                D.assign(branch.lora_A, a * cm)

    # Consecutive evaluations differ in a few layers: the blocks before the first changed one
    # are replayed from the previous evaluation instead of computed (same results, less time).
    replay = BlockReplay(net, s.branches, budget_mb=acfg.replay_mb)

    def score(ratios: Mapping[str, float], zero: bool = False) -> float:
        """The few-shot main metric (the mean over members), or the few-shot loss (metric=loss)."""
        set_ratios(ratios, zero)
        replay.begin({lid: "removed" for lid in s.branches} if zero else ratios)
        values = []
        for view, batches, metric in scored:
            logits, labels, loss = predict(view, batches, s.device, dtype)
            values.append(loss if by_loss else compute_metrics(logits, labels, [metric])[metric])
        replay.end(n_batches)
        return sum(values) / len(values)

    what = "loss" if by_loss else main
    with replay:
        a_ref = score({})
        a_0 = score({}, zero=True)
        print(f"[plr] allocate: few-shot {what}: probe a_ref={a_ref:.3f}, no adapter a_0={a_0:.3f}, tau={acfg.tau}, "
              f"relative_to={acfg.relative_to}, {len(layers)} layers, grid {list(acfg.grid)}")
        if acfg.allocator == "proportional":
            assert budget is not None
            alloc = AS.proportional(layers, spec.lora.r, acfg, budget, evaluate=score, a_ref=a_ref, a_0=a_0,
                                    sides=sides)
        else:
            alloc = AS.threshold(layers, spec.lora.r, acfg, evaluate=score, a_ref=a_ref, a_0=a_0,
                                 sides=sides, allocator=acfg.allocator)
    alloc.replayed_share = replay.saved_share
    set_ratios({})
    return alloc


def plot(alloc: AL.Allocation, path: Path, title: str) -> None:
    """Bar chart of the keep ratio per layer (log2 axis), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [la.name for la in alloc.layers]
    ratios = [la.ratio for la in alloc.layers]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(names) + 2), 3.6))
    ax.bar(range(len(names)), ratios, color="#3b6ea5")
    ax.set_yscale("log", base=2)
    floor = min(min(ratios), min(alloc.grid or [1.0]))
    ax.set_ylim(floor / 1.5, 1.3)
    ax.set_ylabel("keep ratio ρ (rows and columns)")
    ax.set_xticks(range(len(names)), [_short(n) for n in names], rotation=90, fontsize=6)
    red = 100.0 * (1 - alloc.params() / max(1, alloc.dense_params()))
    ax.set_title(f"{title} · {alloc.allocator}: {alloc.params():,} params ({red:.1f}% fewer than dense)", fontsize=8)
    fig.tight_layout()
    with A.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _short(name: str) -> str:
    """`bert.encoder.layer.3.attention.self.query` -> `3.self.query` (tick labels)."""
    parts = name.split(".")
    nums = [p for p in parts if p.isdigit()]
    return ".".join(nums[:1] + parts[-2:])
