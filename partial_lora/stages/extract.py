"""extract: the kept rows R and columns C of every layer, at the allocated ratios.

Ranks rows/columns with `adapter.mask.method` (subspace of W0 by default; random; or the
probe's update magnitudes) and keeps the top round(ρ·d) of each side. `granularity=element`
instead keeps random entries of A and B at the same parameter count (ablation only). Writes
the masks through `artifacts.write_masks` (its docstring has the format); `artifacts.read_masks`
reads them back for retrain, evaluate and export.

`adapter.mask.shared_input` [ours]: one forward pass of two training examples finds the layers
that read the same input tensor (`input_groups.trace`); each group's columns are ranked once
(`masks.rank_group`) and every member keeps the top round(ρ·d_in) of that ranking, so the sets
nest and retraining gathers the input once per group. Rows are ranked per layer as without it.
The groups are recorded in `masks.json` (`input_groups`).

`adapter.mask.method=snip`: the SNIP importance of every layer's W0 (`partial_lora.adapter.snip`) is
measured on the model as `setup` builds it (fresh head, LoRA's B = 0, so no adapter update),
before the probe's adapter is loaded; the batches read are recorded in `masks.json` (`snip`).

A SHiRA whose mask plr draws (`adapter.shira.mask`, `adapter=shira_random|shira_snip`) runs this
stage instead of probe and allocate: the parameter target of `adapter.match` is split over the
layers at one density (`peft_baselines.shira_counts`), and each layer keeps that many random
entries (PEFT's draw, `peft_baselines.random_entries`, seeded per layer from the run's seed) or
its top entries by SNIP importance. They go to `masks.safetensors` as `{module}.entries`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from partial_lora import artifacts as A
from partial_lora import distributed as D
from partial_lora.adapter import peft_baselines as PB
from partial_lora.adapter import snip as SN
from partial_lora.errors import PlrError
from partial_lora.adapter.inject import WHOLE, base_weights, dims, find_targets, layer_id, load_adapter_state_dict
from partial_lora.adapter import input_groups as IG
from partial_lora.adapter.lora import LoRALinear
from partial_lora.adapter.masks import LayerInfo, Ranking, element_masks, layer_seed, rank_group, rank_layer
from partial_lora.training.predict import predict
from partial_lora.training.runtime import autocast_dtype, set_seed
from partial_lora.spec import RunSpec
from partial_lora.working_set.build import Setup, setup
from partial_lora.working_set.loaders import loader
from partial_lora.adapter.inject import params_per_rank
from partial_lora.tracking import Tracker

NAME = A.EXTRACT


def run(spec: RunSpec, run_dir: Path, tracker: Tracker | None = None) -> dict[str, Any]:
    if spec.peft is not None:  # plan() runs extract for no other PEFT baseline
        return shira_masks(spec, run_dir)
    alloc = A.read_allocation(run_dir)
    mcfg = spec.mask
    seed = spec.seed if mcfg.seed is None else mcfg.seed
    set_seed(spec.seed)
    s = setup(spec)
    net = s.built.model.net
    # SNIP reads W0's gradient with no adapter update: before the probe's adapter is loaded.
    snip, snip_record = snip_of_branches(spec, s) if mcfg.method == "snip" else ({}, None)
    probe_adapter = A.stage_dir(run_dir, A.PROBE) / A.ADAPTER
    if probe_adapter.exists():
        load_adapter_state_dict(net, A.load_tensors(probe_adapter), source=str(probe_adapter))
    ratios = alloc.ratios()
    if set(ratios) != set(s.branches):
        raise PlrError(f"{A.stage_dir(run_dir, A.ALLOCATE) / A.ALLOCATION} names other layers than this model "
                       "adapts (another model or target set); rerun the allocate stage")
    weights = base_weights(net)

    def layer_info(lid: str) -> LayerInfo:
        # W0 goes to the run's device for the SVD (the model itself stays where setup put it).
        b = s.branches[lid]
        return LayerInfo(lid, weights[lid].to(s.device), b.delta_weight() if probe_adapter.exists() else None,
                         snip.get(lid))

    shared = mcfg.shared_input  # row/column masks only (MaskConfig refuses it with element masks)
    groups = input_groups(spec, s) if shared else []
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}

    def keep(lid: str, info: LayerInfo, group_cols: torch.Tensor | None) -> None:
        b, rho = s.branches[lid], ratios[lid]
        if mcfg.granularity == "element":
            rows, cols = torch.arange(b.d_out), torch.arange(b.d_in)
            mask_b, mask_a = element_masks(b.d_out, b.d_in, b.r, rho, seed, lid)
            tensors[f"{lid}.mask_B"], tensors[f"{lid}.mask_A"] = mask_b.to(torch.uint8), mask_a.to(torch.uint8)
            params = int(mask_b.sum() + mask_a.sum())
        else:
            ranking = rank_layer(mcfg.method, info, seed, mcfg.energy)
            if group_cols is not None:  # a prefix of the group's ranking: the group's column sets nest
                ranking = Ranking(ranking.rows, group_cols)
            rows, cols = ranking.keep(rho, mcfg.sides)
            params = b.r * (len(rows) + len(cols))
        tensors[f"{lid}.rows"], tensors[f"{lid}.cols"] = rows.long(), cols.long()
        layers[lid] = {"ratio": rho, "d_out": b.d_out, "d_in": b.d_in, "rows": len(rows), "cols": len(cols),
                       "params": params}

    # A group's members are ranked together for their columns and then one by one for their rows, each
    # member's LayerInfo built once and let go with its group; every other layer on its own.
    grouped = {lid for group in groups for lid in group}
    for group in groups:
        infos = [layer_info(lid) for lid in group]
        cols = rank_group(mcfg.method, infos, seed, mcfg.energy)
        for lid, info in zip(group, infos, strict=True):
            keep(lid, info, cols)
    for lid in s.branches:
        if lid not in grouped:
            keep(lid, layer_info(lid), None)
    layers = {lid: layers[lid] for lid in s.branches}  # masks.json lists the layers in the model's order
    meta = {"model": spec.model.name, "method": mcfg.method, "granularity": mcfg.granularity}
    info_groups = {"input_groups": groups} if shared else {}  # recorded only with the option: masks stay as they were
    if snip_record is not None:
        info_groups["snip"] = snip_record
    A.write_masks(run_dir, tensors, meta, layers, r=spec.lora.r, seed=seed, **info_groups)
    total = sum(la["params"] for la in layers.values())
    dense = sum(b.dense_num_parameters() for b in s.branches.values())
    out = {"method": mcfg.method, "granularity": mcfg.granularity, "params": total, "dense_params": dense,
           "reduction_pct": 100.0 * (1 - total / dense)}
    if shared:
        out["input_groups"] = len(groups)
        print(f"[plr] extract: {len(groups)} input groups share their kept columns "
              f"({sum(map(len, groups))} of {len(s.branches)} layers)")
    return out


def input_groups(spec: RunSpec, s: Setup) -> list[list[str]]:
    """The model's input groups (`input_groups.trace`), from one forward pass of two training examples."""
    split = s.data.train.select(range(min(2, len(s.data.train))))
    batches = [next(iter(loader(s, split, spec.train, train=False)))]
    model = s.built.model.to(s.device)
    return IG.trace(s.built.model.net, lambda: predict(model, batches, s.device, autocast_dtype(spec.train, s.device)))


def snip_scores(spec: RunSpec, s: Setup, layers: Mapping[str, tuple[str, int, int]]) -> tuple[dict[str, torch.Tensor],
                                                                                              dict[str, Any]]:
    """SNIP importance (`partial_lora.adapter.snip.importance`) of the W0 slice of each layer, and what was read.

    Args:
        layers: layer id -> (module name, first output row of its slice, its rows).

    Returns:
        The scores by layer id (d_out × d_in, on the run's device), and the record for masks.json:
        the batches, their size, the seed and the training examples read (indices into the
        training split), in order.
    """
    if D.sharded():
        raise PlrError("SNIP importance needs each W0 whole on one process, and trainer.strategy=fsdp shards it; "
                       "use trainer.strategy=ddp with adapter.mask.method=snip or adapter=shira_snip")
    cfg, tc = spec.snip, spec.train
    size = cfg.batch_size or tc.batch_size
    examples = SN.examples(len(s.data.train), cfg.batches, size, spec.seed)
    batches = loader(s, s.data.train.select(examples), replace(tc, eval_batch_size=size), train=False)
    model = s.built.model.to(s.device)
    net = model.net
    weights = {m: net.get_submodule(m).weight for m, _, _ in layers.values()}
    dtype = autocast_dtype(tc, s.device)

    def loss(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v.to(s.device) for k, v in batch.items()}
        with torch.autocast(s.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            return model.loss(model(batch), batch)

    was_training = model.training
    model.eval()  # no dropout: the scores depend on the rows read and nothing else
    try:
        full = SN.importance(loss, weights, batches)
    finally:
        model.train(was_training)
    scores = {lid: full[m].reshape(full[m].shape[0], -1)[offset:offset + d_out]
              for lid, (m, offset, d_out) in layers.items()}
    n_batches = -(-len(examples) // size)
    print(f"[plr] snip: importance of {len(layers)} layers from {n_batches} training batches of {size} examples "
          f"(seed {spec.seed})")
    return scores, {"batches": n_batches, "batch_size": size, "seed": spec.seed, "examples": examples}


def snip_of_branches(spec: RunSpec, s: Setup) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`snip_scores` of every plr LoRA branch of the model (a fused projection's slices each get theirs)."""
    layers = {layer_id(name, key): (name, b.offset, b.d_out)
              for name, mod in s.built.model.net.named_modules() if isinstance(mod, LoRALinear)
              for key, b in mod.branches.items()}
    return snip_scores(spec, s, layers)


def shira_masks(spec: RunSpec, run_dir: Path) -> dict[str, Any]:
    """SHiRA's entries at the budget of `adapter.match` (see the module docstring)."""
    assert spec.peft is not None and spec.peft.shira_mask is not None
    method = spec.peft.shira_mask
    set_seed(spec.seed)
    s = setup(replace(spec, peft=None, method="head"))  # the model and its fresh head, no adapter
    net = s.built.model.net
    found = find_targets(net, spec.lora)
    if any(set(slices) != {WHOLE} for slices in found.values()):
        raise PlrError(f"adapter=shira_{method} adapts whole modules, not slices of a fused projection "
                       f"({list(spec.lora.targets)}); set adapter.targets=[qkv] (or another whole-module list)")
    shapes = {name: dims(net.get_submodule(name)) for name in found}
    target = spec.match.target(params_per_rank(net, found))
    assert target is not None  # config.validate refuses a SHiRA mask without adapter.match
    counts = PB.shira_counts(int(target), shapes)
    info: dict[str, Any] = {}
    if method == "snip":
        scores, info["snip"] = snip_scores(spec, s, {name: (name, 0, shapes[name][0]) for name in found})
        entries = {name: SN.top_entries(scores[name], counts[name]) for name in found}
    else:
        entries = {name: PB.random_entries(*shapes[name], counts[name], layer_seed(spec.seed, name)) for name in found}
    layers = {name: {"d_out": shapes[name][0], "d_in": shapes[name][1], "params": counts[name],
                     "density": counts[name] / (shapes[name][0] * shapes[name][1])} for name in found}
    A.write_masks(run_dir, {f"{name}.entries": e.long().contiguous() for name, e in entries.items()},
                  {"model": spec.model.name, "method": method, "granularity": "shira"}, layers,
                  target=int(target), seed=spec.seed, **info)
    total = sum(counts.values())
    return {"method": method, "granularity": "shira", "params": total, "target": int(target),
            "gap_pct": 100.0 * (total - target) / target,
            "density": total / sum(d_out * d_in for d_out, d_in in shapes.values())}
