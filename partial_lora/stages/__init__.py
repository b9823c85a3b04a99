"""The stages and the pipeline that runs them: probe → allocate → extract → retrain → evaluate.

One stage = one function `run(cfg, run_dir, tracker) -> metrics`. A stage reads its inputs
from files in the run dir and writes its outputs to `run_dir/<stage>/`; the pipeline writes the
stage's `metrics.json` and `done` marker when it returns, and skips stages already done.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from partial_lora import artifacts as A
from partial_lora import config as C
from partial_lora.errors import PlrError
from partial_lora.stages import evaluate, retrain
from partial_lora.tracking import Tracker

StageFn = Callable[[DictConfig, Path, "Tracker | None"], dict[str, Any]]

REGISTRY: dict[str, StageFn] = {
    retrain.NAME: retrain.run,
    evaluate.NAME: evaluate.run,
}


def plan(cfg: DictConfig) -> list[str]:
    """The stages a config runs, in order."""
    method = cfg.adapter.get("method", "lora")
    if method == "lora" and C.sparsity(cfg) == 0:
        return ["retrain", "evaluate"]
    stages = ["probe", "allocate", "extract", "retrain", "evaluate"]
    missing = [s for s in stages if s not in REGISTRY]
    if missing:
        raise PlrError(f"stages {missing} of adapter '{method}' are not available in this version; use adapter=lora")
    return stages


def run_pipeline(cfg: DictConfig, run_dir: Path, tracker: Tracker | None = None,
                 echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the plan's stages that are not done yet; return the run's results (also in results.json)."""
    stages = plan(cfg)
    done: dict[str, dict[str, Any]] = {}
    for name in stages:
        if A.is_done(run_dir, name):
            echo(f"[plr] {name}: done already, skipped ({A.stage_dir(run_dir, name)})")
            done[name] = A.read_json(A.stage_dir(run_dir, name) / A.METRICS)
            continue
        echo(f"[plr] {name} ...")
        t0 = time.perf_counter()
        metrics = REGISTRY[name](cfg, run_dir, tracker)
        metrics["wall_s"] = time.perf_counter() - t0
        A.mark_done(run_dir, name, metrics)
        done[name] = metrics
        echo(f"[plr] {name}: done in {metrics['wall_s']:.1f} s")
    results = collect_results(cfg, run_dir, done)
    A.write_json(run_dir / A.RESULTS, results)
    return results


def collect_results(cfg: DictConfig, run_dir: Path, stages: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Everything the report needs, from the stages' metrics."""
    ev = stages.get("evaluate", {})
    metrics, main = C.task_metrics(cfg)
    adapter = OmegaConf.to_container(cfg.adapter, resolve=True)
    dense, sparse = ev.get("dense_lora_params"), ev.get("adapter_params")
    return {
        "status": "complete" if all(s in stages for s in plan(cfg)) else "incomplete",
        "run_dir": str(run_dir), "name": str(cfg.name), "seed": int(cfg.seed),
        "model": str(cfg.model.name), "task": str(cfg.task.name), "adapter": adapter,
        "main_metric": main, "task_metrics": metrics, "metrics": {k: v for k, v in ev.items() if k.startswith(("val_", "test_"))},
        "params": {"adapter": sparse, "dense_lora_same_rank": dense, "head": ev.get("head_params"),
                   "reduction_pct": 100.0 * (1 - sparse / dense) if dense and sparse is not None else None},
        "wall_s": {s: m.get("wall_s") for s, m in stages.items()},
        "stages": {s: {k: v for k, v in m.items() if k != "history"} for s, m in stages.items()},
    }


def format_results(r: dict[str, Any]) -> str:
    """The short table printed at the end of `plr train`."""
    a = r["adapter"]
    names = [r["main_metric"], *[m for m in r["task_metrics"] if m != r["main_metric"]]]
    lines = [f"plr results  {r['task']} · {r['model']} · {a.get('name', a.get('method'))} (r={a.get('r')}) · seed {r['seed']}",
             f"  {'metric':<14}{'val':>9}{'test':>9}"]
    for m in names:
        val, test = r["metrics"].get(f"val_{m}"), r["metrics"].get(f"test_{m}")
        lines.append(f"  {m:<14}{_num(val):>9}{_num(test):>9}")
    p = r["params"]
    red = f" ({p['reduction_pct']:.1f}% fewer than dense LoRA r={a.get('r')})" if p.get("reduction_pct") else ""
    lines.append(f"  trainable parameters: adapter {p['adapter']:,}{red} · head {p['head']:,}")
    walls = " · ".join(f"{s} {w:.1f} s" for s, w in r["wall_s"].items() if w is not None)
    total = sum(w for w in r["wall_s"].values() if w is not None)
    lines.append(f"  wall time: {walls} · total {total:.1f} s")
    lines.append(f"  run dir: {r['run_dir']}")
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"
