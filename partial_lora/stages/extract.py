"""extract: the kept rows R and columns C of every layer, at the allocated ratios.

Ranks rows/columns with `adapter.mask.method` (subspace of W0 by default; random; or the
probe's update magnitudes) and keeps the top round(ρ·d) of each side. `granularity=element`
instead keeps random entries of A and B at the same parameter count (ablation only). Writes
the masks through `artifacts.write_masks` (its docstring has the format); `artifacts.read_masks`
reads them back for retrain, evaluate and export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from partial_lora import artifacts as A
from partial_lora.errors import PlrError
from partial_lora.inject import base_weights, load_adapter_state_dict
from partial_lora.masks import LayerInfo, element_masks, rank_layer
from partial_lora.runtime import set_seed
from partial_lora.spec import RunSpec
from partial_lora.stages.base import setup
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
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    for lid, b in s.branches.items():
        # W0 goes to the run's device for the SVD (the model itself stays where setup put it).
        info = LayerInfo(lid, weights[lid].to(s.device), b.delta_weight() if probe_adapter.exists() else None)
        rho = ratios[lid]
        if mcfg.granularity == "element":
            rows, cols = torch.arange(b.d_out), torch.arange(b.d_in)
            mask_b, mask_a = element_masks(b.d_out, b.d_in, b.r, rho, seed, lid)
            tensors[f"{lid}.mask_B"], tensors[f"{lid}.mask_A"] = mask_b.to(torch.uint8), mask_a.to(torch.uint8)
            params = int(mask_b.sum() + mask_a.sum())
        else:
            rows, cols = rank_layer(mcfg.method, info, seed, mcfg.energy).keep(rho, mcfg.sides)
            params = b.r * (len(rows) + len(cols))
        tensors[f"{lid}.rows"], tensors[f"{lid}.cols"] = rows.long(), cols.long()
        layers[lid] = {"ratio": rho, "d_out": b.d_out, "d_in": b.d_in, "rows": len(rows), "cols": len(cols),
                       "params": params}
    meta = {"model": spec.model.name, "method": mcfg.method, "granularity": mcfg.granularity}
    A.write_masks(run_dir, tensors, meta, layers, r=spec.lora.r, seed=seed)
    total = sum(la["params"] for la in layers.values())
    dense = sum(b.dense_num_parameters() for b in s.branches.values())
    return {"method": mcfg.method, "granularity": mcfg.granularity, "params": total, "dense_params": dense,
            "reduction_pct": 100.0 * (1 - total / dense)}

