"""extract: the kept rows R and columns C of every layer at its allocated ratio (`masks.build_masks`:
ranked by `adapter.mask.method`, nested per input group with `adapter.mask.shared_input`, or random
entries with `granularity=element`), written by `artifacts.write_masks` for retrain, evaluate and
export. SNIP importance is measured before the probe's adapter is loaded (no adapter update). A SHiRA
whose mask plr draws runs `extract_shira` instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from partial_lora import artifacts
from partial_lora.adapter.inject import base_weights, load_adapter_state_dict
from partial_lora.adapter.masks import LayerInfo, build_masks
from partial_lora.errors import PlrError
from partial_lora.spec import RunSpec
from partial_lora.stages import extract_shira
from partial_lora.tracking import Tracker
from partial_lora.training.runtime import set_seed
from partial_lora.working_set.build import setup
from partial_lora.working_set.measure import input_groups, snip_of_branches

NAME = artifacts.EXTRACT


def run(spec: RunSpec, run_dir: Path, tracker: Tracker | None = None) -> dict[str, Any]:
    if spec.peft is not None:  # plan() runs extract for no other PEFT baseline
        return extract_shira.run(spec, run_dir)
    alloc, mcfg = artifacts.read_allocation(run_dir), spec.mask
    set_seed(spec.seed)
    s = setup(spec)
    snip, snip_record = snip_of_branches(spec, s) if mcfg.method == "snip" else ({}, None)
    probe = artifacts.stage_dir(run_dir, artifacts.PROBE) / artifacts.ADAPTER
    if probe.exists():
        load_adapter_state_dict(s.built.model.net, artifacts.load_tensors(probe), source=str(probe))
    if set(alloc.ratios()) != set(s.branches):
        raise PlrError(f"{artifacts.stage_dir(run_dir, artifacts.ALLOCATE) / artifacts.ALLOCATION} names other layers "
                       "than this model adapts (another model or target set); rerun the allocate stage")
    weights = base_weights(s.built.model.net)

    def info(lid: str) -> LayerInfo:  # W0 on the run's device for the SVD (the model stays where setup put it)
        delta = s.branches[lid].delta_weight() if probe.exists() else None
        return LayerInfo(lid, weights[lid].to(s.device), delta, snip.get(lid))

    groups = input_groups(spec, s) if mcfg.shared_input else []
    shapes = {lid: (b.d_out, b.d_in, b.r) for lid, b in s.branches.items()}
    tensors, layers = build_masks(shapes, alloc.ratios(), info, groups, mcfg, spec.mask_seed)
    extra = {"input_groups": groups} if mcfg.shared_input else {}  # only with the option: masks stay as they were
    extra.update({"snip": snip_record} if snip_record is not None else {})
    meta = {"model": spec.model.name, "method": mcfg.method, "granularity": mcfg.granularity}
    artifacts.write_masks(run_dir, tensors, meta, layers, r=spec.lora.r, seed=spec.mask_seed, **extra)
    total = sum(la["params"] for la in layers.values())
    dense = sum(b.dense_num_parameters() for b in s.branches.values())
    if mcfg.shared_input:
        print(f"[plr] extract: {len(groups)} input groups share their kept columns "
              f"({sum(map(len, groups))} of {len(s.branches)} layers)")
    return {"method": mcfg.method, "granularity": mcfg.granularity, "params": total, "dense_params": dense,
            "reduction_pct": 100.0 * (1 - total / dense),
            **({"input_groups": len(groups)} if mcfg.shared_input else {})}
