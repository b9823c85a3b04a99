"""The stages and the pipeline that runs them: probe → allocate → extract → retrain → evaluate.

One stage = one function `run(spec, run_dir, tracker) -> metrics`, where `spec` is the run's
`RunSpec` (`config.validate` builds it from the composed config, once). A stage reads its inputs
from files in the run dir and writes its outputs to `run_dir/<stage>/`; the pipeline writes the
stage's `metrics.json` and `done` marker when it returns, and skips stages already done. Each stage
records its settings' fingerprint when it starts, with the identity of the task's data (a content
digest per data file, `data.identity`); a run dir made with other settings, or from data that has
changed since, is refused (`partial_lora.rundir`). The pipeline loads the task once, before any
stage, to learn that identity, and the stages reuse that load (`base.data_loaded_once`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from partial_lora import artifacts as A
from partial_lora.training import checkpoint as CK
from partial_lora import config as C
from partial_lora import distributed as D
from partial_lora.training import failed_reading as FR
from partial_lora import rundir as RD
from partial_lora.allocation.allocators import NEEDS_PROBE
from partial_lora.training.runtime import resolve_device
from partial_lora.spec import RunSpec
from partial_lora.errors import Interrupted, PlrError, disk_full_is_one_line
from partial_lora.stages import allocate, evaluate, extract, probe, retrain
from partial_lora.stages import base as B
from partial_lora.tracking import Tracker

log = logging.getLogger("plr")

StageFn = Callable[[RunSpec, Path, "Tracker | None"], dict[str, Any]]

# Under a multi-process launch the retrain stage trains data parallel; rank 0 runs the others alone
# (with trainer.strategy=fsdp every process runs every stage: none holds the whole model).
DATA_PARALLEL = frozenset({A.RETRAIN})

REGISTRY: dict[str, StageFn] = {
    probe.NAME: probe.run,
    allocate.NAME: allocate.run,
    extract.NAME: extract.run,
    retrain.NAME: retrain.run,
    evaluate.NAME: evaluate.run,
}


def plan(spec: RunSpec) -> list[str]:
    """The stages a run runs, in order (see `stages_for`); a SHiRA whose mask plr draws
    (`adapter.shira.mask`) runs extract (the mask), retrain and evaluate."""
    return stages_for(spec.sparsity, spec.mask.method, spec.allocation.allocator,
                      spec.peft.shira_mask if spec.peft is not None else None)


def stages_for(sp: float | str, mask_method: str, allocator: str, shira_mask: str | None = None) -> list[str]:
    """The stages of a run with this sparsity, mask method and allocator, in order.

    Dense LoRA (sparsity 0): retrain, evaluate. Uniform sparsity (a number): allocate, extract,
    retrain, evaluate, with no probe unless the masks need one (probe_magnitude).
    `sparsity=auto`: all five, the probe only when the allocator or masks read it. A SHiRA whose
    mask plr draws (`shira_mask`): extract (the mask), retrain, evaluate.
    """
    if shira_mask is not None:
        return [A.EXTRACT, A.RETRAIN, A.EVALUATE]
    if sp == 0:
        return [A.RETRAIN, A.EVALUATE]
    needs_probe = mask_method == "probe_magnitude" or (sp == "auto" and allocator in NEEDS_PROBE)
    return ([A.PROBE] if needs_probe else []) + [A.ALLOCATE, A.EXTRACT, A.RETRAIN, A.EVALUATE]


def reuse_from_run(spec: RunSpec, run_dir: Path, stages: list[str], echo: Callable[[str], None],
                   data: dict[str, str] | None = None) -> None:
    """Copy another run's probe (when its settings are this run's) and its allocation (when the
    allocation settings match too) into this run dir."""
    assert spec.from_run is not None
    settings = spec.settings
    src = Path(spec.from_run).expanduser()
    if not (src / A.HYDRA_CONFIG).exists() and not A.is_done(src, A.PROBE) and not A.is_done(src, A.ALLOCATE):
        raise PlrError(f"from_run={src} is not a plr run dir (no .hydra/config.yaml and no finished probe or "
                       "allocate stage); point from_run at a run dir")
    if src.resolve() == run_dir.resolve():
        return
    for name in (A.PROBE, A.ALLOCATE):
        if name not in stages or A.is_done(run_dir, name) or not A.is_done(src, name):
            continue
        if name == A.ALLOCATE:
            theirs = A.read_json(A.stage_dir(src, name) / A.ALLOCATION).get("settings")
            theirs = RD.resolved_allocation(theirs) if isinstance(theirs, dict) else theirs
            ours = RD.allocation_settings(spec)
            if theirs != ours or not A.is_done(run_dir, A.PROBE) and A.PROBE in stages:
                diff = sorted(k for k in set(ours) | set(theirs or {}) if (theirs or {}).get(k) != ours.get(k))
                echo(f"[plr] from_run: allocation settings differ ({', '.join(diff) or 'the probe'}); allocating again")
                continue
        if name == A.PROBE:
            keys = ("model.name", "task.name", "adapter.r", "adapter.targets", "seed")
            for key, value in (RD.saved_values(src, keys) or {}).items():
                if value != RD.lookup(settings, key):
                    raise PlrError(f"from_run={src} has {key}={value}, this run {RD.lookup(settings, key)}; its probe "
                                   f"does not apply (use a run with the same {key})")
            theirs = RD.made_with(src, name)
            diff = RD.changed(theirs, RD.fingerprint(settings, name, data)) if theirs is not None else {}
            if diff:  # e.g. other probe shots or learning rate, or other data: the probe is not this run's
                echo(f"[plr] from_run: probe settings differ ({', '.join(diff)}); probing again")
                continue
        shutil.copytree(A.stage_dir(src, name), A.stage_dir(run_dir, name), dirs_exist_ok=True)
        RD.record(run_dir, name, settings, data)  # valid for this run's settings
        echo(f"[plr] from_run: reusing {name} from {src}")


def run_pipeline(cfg: DictConfig, run_dir: Path, tracker: Tracker | None = None,
                 echo: Callable[[str], None] = print, *, members: list[DictConfig] | None = None,
                 rerun_from: str | None = None,
                 on_checked: Callable[[RunSpec], Tracker | None] | None = None) -> dict[str, Any]:
    """The one way into a run, for `plr train` and library callers alike: validate the composed config
    once into the run's `RunSpec` (`config.validate`), check the run dir once (its stages' fingerprints
    and the data's identity, `rundir.check`), then run the plan's stages that are not done yet; return
    the run's results (also in results.json).

    Args:
        members: a multi-task run's member task configs, composed at the CLI's edge (None: composed here).
        rerun_from: `--rerun-from STAGE`: that stage and every later one are deleted (before the check).
        on_checked: called once the run dir is checked and before any stage runs (the CLI writes
            `.hydra/`, git.json and env.json and opens its tracker there); the tracker it returns is
            used instead of `tracker`, and finished at the end.
    """
    spec = C.validate(cfg, members)
    with B.data_loaded_once():
        stages = plan(spec)
        D.init(resolve_device(spec.train.device))  # under torchrun: join the group before any barrier
        D.use(spec.train.strategy)  # fsdp: every process runs every stage on its shard of the model
        data = B.data_identity(spec)  # loads the task (once: the stages reuse it), before anything is written
        if D.is_main():
            if rerun_from:
                RD.rerun_from(run_dir, rerun_from)
            RD.check(run_dir, spec.settings, data)  # a run dir made with other settings, or other data, is refused
        if on_checked is not None:
            tracker = on_checked(spec)
        try:
            if D.is_main() and spec.from_run:
                reuse_from_run(spec, run_dir, stages, echo, data)
            return _run_stages(spec, run_dir, tracker, echo, stages, data)
        finally:
            if on_checked is not None and tracker is not None:
                tracker.finish()


def _run_stages(spec: RunSpec, run_dir: Path, tracker: Tracker | None, echo: Callable[[str], None],
                stages: list[str], data: dict[str, str]) -> dict[str, Any]:
    done: dict[str, dict[str, Any]] = {}
    with disk_full_is_one_line(run_dir):
        for name in stages:
            # Read before the barrier: past it, rank 0 may already be finishing the stage.
            already = A.is_done(run_dir, name)
            D.barrier()  # every process sees the same finished stages
            if already:
                echo(f"[plr] {name}: done already, skipped ({A.stage_dir(run_dir, name)})")
                done[name] = A.read_json(A.stage_dir(run_dir, name) / A.METRICS)
                continue
            if name not in DATA_PARALLEL and not D.is_main() and not D.sharded():
                D.barrier()  # rank 0 runs the stage alone; this rank reads what it wrote
                done[name] = A.read_json(A.stage_dir(run_dir, name) / A.METRICS)
                continue
            echo(f"[plr] {name} ...")
            if D.is_main():
                RD.record(run_dir, name, spec.settings, data)
            t0 = time.perf_counter()
            try:
                with contextlib.nullcontext() if name in DATA_PARALLEL or D.sharded() else D.alone():
                    metrics = REGISTRY[name](spec, run_dir, tracker)
            except Interrupted:
                raise
            except KeyboardInterrupt:  # outside a training loop (loading, the allocation search...)
                raise Interrupted(name) from None
            metrics["wall_s"] = time.perf_counter() - t0
            A.mark_done(run_dir, name, metrics)
            if D.is_main():
                (A.stage_dir(run_dir, name) / CK.FILE).unlink(missing_ok=True)  # the stage's results supersede it
            D.barrier()
            done[name] = metrics
            echo(f"[plr] {name}: done in {metrics['wall_s']:.1f} s")
        results = collect_results(spec, run_dir, done)
        A.write_json(run_dir / A.RESULTS, results)
    for line in results["failed_reading"] if D.is_main() else []:  # the run's log (and the console): never silent
        log.warning(line)
    return results


def collect_results(spec: RunSpec, run_dir: Path, stages: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Everything the report needs, from the stages' metrics."""
    ev = stages.get(A.EVALUATE, {})
    al = stages.get(A.ALLOCATE, {})
    metrics, main = list(spec.metrics), spec.main_metric
    adapter = copy.deepcopy(spec.settings["adapter"])  # the adapter's settings as recorded (results.json)
    if stages.get(A.RETRAIN, {}).get("rank") is not None:  # lora_matched chooses its rank at run time
        adapter["r"] = int(stages[A.RETRAIN]["rank"])
    dense, sparse = ev.get("dense_lora_params"), ev.get("adapter_params")
    rt = stages.get(A.RETRAIN, {})  # its peak memory: the training's (runtime.peak_memory)
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
        "probe_accuracy": stages.get(A.PROBE, {}).get("a_ref"),
        "allocation": {k: al.get(k) for k in ("allocator", "metric", "ratio_min", "ratio_median", "ratio_max", "a_ref", "a_0",
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
    al, ev, rt = stages.get(A.ALLOCATE), stages.get(A.EVALUATE, {}), stages.get(A.RETRAIN, {})
    path = A.stage_dir(run_dir, A.ALLOCATE) / A.ALLOCATION
    if al and path.exists():
        grid = A.read_json(path).get("grid") or []
        lines.append(FR.floor_line(al, grid, ev.get("adapter_params", al.get("params")), spec.allocation.relative_to))
    main = spec.main_metric
    lr, scale, key = ((spec.retrain.lr, None, "retrain.lr") if spec.retrain.lr is not None else
                      (spec.train.lr, rt.get("adapter_lr_scale"), "trainer.lr"))
    lines.append(FR.constant_line(main, ev.get(f"val_{main}"), ev.get("constant_level"), ev.get("constant_n"),
                                  lr, scale, spec.sparse, lr_key=key))
    return [line for line in lines if line]


def format_results(r: dict[str, Any]) -> str:
    """The short table printed at the end of `plr train`."""
    a = r["adapter"]
    names = [r["main_metric"], *[m for m in r["task_metrics"] if m != r["main_metric"]]]
    lines = [f"plr results  {r['task']} · {r['model']} · {a.get('name', a.get('method'))} (r={a.get('r')}) · seed {r['seed']}",
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
