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
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from partial_lora import artifacts as A
from partial_lora.errors import PlrError
from partial_lora.inject import base_weights, load_adapter_state_dict
from partial_lora import input_groups as IG
from partial_lora.masks import LayerInfo, Ranking, element_masks, rank_group, rank_layer
from partial_lora.predict import predict
from partial_lora.runtime import autocast_dtype, set_seed
from partial_lora.spec import RunSpec
from partial_lora.stages.base import Setup, loader, setup
from partial_lora.tracking import Tracker

NAME = A.EXTRACT


def run(spec: RunSpec, run_dir: Path, tracker: Tracker | None = None) -> dict[str, Any]:
    alloc = A.read_allocation(run_dir)
    mcfg = spec.mask
    seed = spec.seed if mcfg.seed is None else mcfg.seed
    set_seed(spec.seed)
    s = setup(spec)
    net = s.built.model.net
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
        return LayerInfo(lid, weights[lid].to(s.device), b.delta_weight() if probe_adapter.exists() else None)

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

