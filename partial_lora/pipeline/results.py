"""A run's results: `results.json` (everything the report needs, from the stages' metrics), the
failed-reading lines, and the short table `plr train` prints."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from partial_lora import artifacts
from partial_lora.pipeline.plan import plan
from partial_lora.spec import RunSpec
from partial_lora.training.failed_reading import constant_line, floor_line


def collect_results(spec: RunSpec, run_dir: Path, stages: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Everything the report needs, from the stages' metrics."""
    ev = stages.get(artifacts.EVALUATE, {})
    al = stages.get(artifacts.ALLOCATE, {})
    metrics, main = list(spec.metrics), spec.main_metric
    adapter = copy.deepcopy(spec.settings["adapter"])  # the adapter's settings as recorded (results.json)
    if stages.get(artifacts.RETRAIN, {}).get("rank") is not None:  # lora_matched chooses its rank at run time
        adapter["r"] = int(stages[artifacts.RETRAIN]["rank"])
    dense, sparse = ev.get("dense_lora_params"), ev.get("adapter_params")
    rt = stages.get(artifacts.RETRAIN, {})  # its peak memory: the training's (runtime.peak_memory)
    return {
        "status": "complete" if all(s in stages for s in plan(spec)) else "incomplete",
        "run_dir": str(run_dir), "name": spec.name, "label": spec.label,
        "seed": spec.seed,
        "model": spec.model.name, "task": spec.task, "adapter": adapter,
        "main_metric": main, "task_metrics": metrics,
        "eval_sets": [] if "members" in ev else
        [k[5:-9] for k in ev if k.startswith("test_") and k.endswith("_examples") and k != "test_examples"],
        **({"members": ev["members"], "member_metrics": ev["member_metrics"]} if "members" in ev else {}),
        "metrics": {k: v for k, v in ev.items() if k.startswith(("val_", "test_"))},
        "params": {"adapter": sparse, "dense_lora_same_rank": dense, "head": ev.get("head_params"),
                   "reduction_pct": 100.0 * (1 - sparse / dense) if dense and sparse is not None else None},
        "probe_accuracy": stages.get(artifacts.PROBE, {}).get("a_ref"),
        "allocation": {k: al.get(k)
                       for k in ("allocator", "metric", "ratio_min", "ratio_median", "ratio_max", "a_ref", "a_0",
                                             "target", "joint_accuracy", "floor_share", "evaluations")} if al else None,
        "wall_s": {s: m.get("wall_s") for s, m in stages.items()},
        "peak_memory": None if rt.get("peak_memory_mb") is None else
        {"mb": rt["peak_memory_mb"], "measure": rt.get("peak_memory_measure")},
        "stages": {s: {k: v for k, v in m.items() if k != "history"} for s, m in stages.items()},
        "failed_reading": failed_reading(spec, run_dir, stages),
    }


def failed_reading(spec: RunSpec, run_dir: Path, stages: dict[str, dict[str, Any]]) -> list[str]:
    """One line per sign that the run's reading failed (`partial_lora.training.failed_reading`): an allocation
    with every layer at the grid's floor, a validation score near the constant-prediction level."""
    lines = []
    al, ev, rt = stages.get(artifacts.ALLOCATE), stages.get(artifacts.EVALUATE, {}), stages.get(artifacts.RETRAIN, {})
    path = artifacts.stage_dir(run_dir, artifacts.ALLOCATE) / artifacts.ALLOCATION
    if al and path.exists():
        grid = artifacts.read_json(path).get("grid") or []
        lines.append(floor_line(al, grid, ev.get("adapter_params", al.get("params")), spec.allocation.relative_to))
    main = spec.main_metric
    lr, scale, key = ((spec.retrain.lr, None, "retrain.lr") if spec.retrain.lr is not None else
                      (spec.train.lr, rt.get("adapter_lr_scale"), "trainer.lr"))
    lines.append(constant_line(main, ev.get(f"val_{main}"), ev.get("constant_level"), ev.get("constant_n"),
                               lr, scale, spec.sparse, lr_key=key))
    return [line for line in lines if line]


def format_results(r: dict[str, Any]) -> str:
    """The short table printed at the end of `plr train`."""
    a = r["adapter"]
    names = [r["main_metric"], *[m for m in r["task_metrics"] if m != r["main_metric"]]]
    lines = [f"plr results  {r['task']} · {r['model']} · {a.get('name', a.get('method'))} (r={a.get('r')}) · seed "
             f"{r['seed']}",
             f"  {'metric':<14}{'val':>9}{'test':>9}"]
    for m in names:
        val, test = r["metrics"].get(f"val_{m}"), r["metrics"].get(f"test_{m}")
        lines.append(f"  {m:<14}{_num(val):>9}{_num(test):>9}")
    for extra in r.get("eval_sets", []):
        for m in names:
            lines.append(f"  {m + ' (' + extra + ')':<23}{_num(r['metrics'].get(f'test_{extra}_{m}')):>9}")
    for member, mm in (r.get("member_metrics") or {}).items():  # multi-task: each member's metrics
        for m in mm["metrics"]:
            key = f"{member} {m}"
            lines.append(f"  {key:<14}{_num(r['metrics'].get(f'val_{member}_{m}')):>9}"
                         f"{_num(r['metrics'].get(f'test_{member}_{m}')):>9}")
    p = r["params"]
    lines.append(f"  trainable parameters: adapter {p['adapter']:,} · head {p['head']:,} · "
                 f"dense LoRA at r={a.get('r')}: {p['dense_lora_same_rank']:,}")
    if p.get("reduction_pct"):
        lines.append(f"  reduction vs dense LoRA: {p['reduction_pct']:.1f}%")
    al = r.get("allocation")
    if al:
        lines.append(f"  keep ratio per layer ({al['allocator']}): min {al['ratio_min']:g} · median "
                     f"{al['ratio_median']:g} · max {al['ratio_max']:g}")
        if al.get("a_ref") is not None:
            what = "loss" if al.get("metric") == "loss" else r["main_metric"]
            target = "" if al.get("target") is None else f" · target {al['target']:.4f}"  # none: proportional
            lines.append(f"  probe few-shot {what}: a_ref {al['a_ref']:.4f} · no adapter a_0 {al['a_0']:.4f}"
                         f"{target} · allocation {al['joint_accuracy']:.4f}")
    for line in r.get("failed_reading") or []:
        lines.append(f"  ! {line}")
    walls = " · ".join(f"{s} {w:.1f} s" for s, w in r["wall_s"].items() if w is not None)
    total = sum(w for w in r["wall_s"].values() if w is not None)
    lines.append(f"  wall time: {walls} · total {total:.1f} s")
    lines.append(f"  run dir: {r['run_dir']}")
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"
