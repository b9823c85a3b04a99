"""Running a run: its config validated once, its run dir checked once, then its stages in order.

One stage = one function `run(spec, run_dir, tracker) -> metrics` (`partial_lora.stages`), where `spec`
is the run's `RunSpec`. A stage reads its inputs from files in the run dir and writes its outputs to
`run_dir/<stage>/`; the pipeline writes the stage's `metrics.json` and `done` marker when it returns,
and skips stages already done. Each stage records its settings' fingerprint when it starts, with the
identity of the task's data (a content digest per data file, `data.identity`); a run dir made with
other settings, or from data that has changed since, is refused (`partial_lora.rundir`). The pipeline
loads the task once, before any stage, to learn that identity, and the stages reuse that load
(`working_set.data.data_loaded_once`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from partial_lora import artifacts, config, distributed, rundir
from partial_lora.errors import Interrupted, disk_full_is_one_line
from partial_lora.pipeline.plan import plan
from partial_lora.pipeline.results import collect_results
from partial_lora.pipeline.reuse import reuse_from_run
from partial_lora.spec import RunSpec
from partial_lora.stages import allocate, evaluate, extract, probe, retrain
from partial_lora.tracking import Tracker
from partial_lora.training import checkpoint
from partial_lora.training.runtime import resolve_device
from partial_lora.working_set.data import data_identity, data_loaded_once

log = logging.getLogger("plr")

StageFn = Callable[[RunSpec, Path, "Tracker | None"], dict[str, Any]]

# Under a multi-process launch the retrain stage trains data parallel; rank 0 runs the others alone
# (with trainer.strategy=fsdp every process runs every stage: none holds the whole model).
DATA_PARALLEL = frozenset({artifacts.RETRAIN})

REGISTRY: dict[str, StageFn] = {
    probe.NAME: probe.run,
    allocate.NAME: allocate.run,
    extract.NAME: extract.run,
    retrain.NAME: retrain.run,
    evaluate.NAME: evaluate.run,
}


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
    spec = config.validate(cfg, members)
    with data_loaded_once():
        stages = plan(spec)
        distributed.init(resolve_device(spec.train.device))  # under torchrun: join the group before any barrier
        distributed.use(spec.train.strategy)  # fsdp: every process runs every stage on its shard of the model
        data = data_identity(spec)  # loads the task (once: the stages reuse it), before anything is written
        if distributed.is_main():
            if rerun_from:
                rundir.rerun_from(run_dir, rerun_from)
            rundir.check(run_dir, spec.settings, data)  # a run dir made with other settings, or other data, is refused
        if on_checked is not None:
            tracker = on_checked(spec)
        try:
            if distributed.is_main() and spec.from_run:
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
            already = artifacts.is_done(run_dir, name)
            distributed.barrier()  # every process sees the same finished stages
            if already:
                echo(f"[plr] {name}: done already, skipped ({artifacts.stage_dir(run_dir, name)})")
                done[name] = artifacts.read_json(artifacts.stage_dir(run_dir, name) / artifacts.METRICS)
                continue
            if name not in DATA_PARALLEL and not distributed.is_main() and not distributed.sharded():
                distributed.barrier()  # rank 0 runs the stage alone; this rank reads what it wrote
                done[name] = artifacts.read_json(artifacts.stage_dir(run_dir, name) / artifacts.METRICS)
                continue
            echo(f"[plr] {name} ...")
            if distributed.is_main():
                rundir.record(run_dir, name, spec.settings, data)
            t0 = time.perf_counter()
            try:
                alone = name not in DATA_PARALLEL and not distributed.sharded()
                with distributed.alone() if alone else contextlib.nullcontext():
                    metrics = REGISTRY[name](spec, run_dir, tracker)
            except Interrupted:
                raise
            except KeyboardInterrupt:  # outside a training loop (loading, the allocation search...)
                raise Interrupted(name) from None
            metrics["wall_s"] = time.perf_counter() - t0
            artifacts.mark_done(run_dir, name, metrics)
            if distributed.is_main():
                (artifacts.stage_dir(run_dir, name)
                 / checkpoint.FILE).unlink(missing_ok=True)  # the stage's results supersede it
            distributed.barrier()
            done[name] = metrics
            echo(f"[plr] {name}: done in {metrics['wall_s']:.1f} s")
        results = collect_results(spec, run_dir, done)
        artifacts.write_json(run_dir / artifacts.RESULTS, results)
    # The run's log (and the console): a failed reading is never silent.
    for line in results["failed_reading"] if distributed.is_main() else []:
        log.warning(line)
    return results


