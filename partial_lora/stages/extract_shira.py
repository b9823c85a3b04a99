"""extract, for a SHiRA whose mask plr draws (`adapter.shira.mask`, `adapter=shira_random|shira_snip`),
which runs instead of probe and allocate: the parameter target of `adapter.match` split over the
modules at one density (`peft_baselines.shira_counts`), and each module's random entries (PEFT's
draw, seeded per module from the run's seed) or top entries by SNIP importance, saved to
`masks.safetensors` as `{module}.entries`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from partial_lora import artifacts
from partial_lora.adapter import peft_baselines
from partial_lora.adapter.inject import WHOLE, dims, find_targets, params_per_rank
from partial_lora.errors import PlrError
from partial_lora.spec import RunSpec
from partial_lora.training.runtime import set_seed
from partial_lora.working_set.build import setup
from partial_lora.working_set.measure import snip_scores


def run(spec: RunSpec, run_dir: Path) -> dict[str, Any]:
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
    target = int(spec.match.target(params_per_rank(net, found)) or 0)  # validate refuses SHiRA without a match
    counts, info, scores = peft_baselines.shira_counts(target, shapes), {}, None
    if method == "snip":
        scores, info["snip"] = snip_scores(spec, s, {name: (name, 0, shapes[name][0]) for name in found})
    entries = peft_baselines.shira_entries(shapes, counts, spec.seed, scores)
    artifacts.write_masks(run_dir, {f"{name}.entries": e.long().contiguous() for name, e in entries.items()},
                  {"model": spec.model.name, "method": method, "granularity": "shira"},
                  peft_baselines.shira_layers(shapes, counts),
                  target=target, seed=spec.seed, **info)
    total = sum(counts.values())
    return {"method": method, "granularity": "shira", "params": total, "target": target,
            "gap_pct": 100.0 * (total - target) / target,
            "density": total / sum(d_out * d_in for d_out, d_in in shapes.values())}
