"""Running a study plan: each job a `plr train` in its own process, finished runs reused.

A finished run is reused only while it was made with the settings its job would run now: a
default changed since (a new `adapter.allocation.tau`, another recipe) makes it stale, and its
first differing stage and every later one run again, as do the runs that read it
(`--keep-stale` reuses stale runs as they are, and says so).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from partial_lora import artifacts as A
from partial_lora import rundir as RD
from partial_lora.study.plan import Job


def _complete(run_dir: Path) -> dict[str, Any] | None:
    """The run's results.json if its status is complete, else None."""
    try:
        results = json.loads((run_dir / A.RESULTS).read_text())
    except (OSError, ValueError):
        return None
    return results if results.get("status") == "complete" else None


def _has_predictions(run_dir: Path) -> bool:
    return (A.stage_dir(run_dir, A.EVALUATE) / A.PREDICTIONS).exists()


def finished(run_dir: Path) -> dict[str, Any] | None:
    """The run's results if it completed (and wrote its predictions), else None."""
    results = _complete(run_dir)
    return results if results is not None and _has_predictions(run_dir) else None


def _complete_without_predictions(run_dir: Path) -> bool:
    return _complete(run_dir) is not None and not _has_predictions(run_dir)


def _settings(job: Job) -> dict[str, Any]:
    """The resolved config the job's `plr train` would run with now."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        cfg = compose("config", overrides=[*job.overrides, f"run_dir={job.run_dir}"])
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def stale(job: Job) -> dict[str, dict[str, tuple[Any, Any]]]:
    """Per stage of the job's run dir, the settings it was made with that differ from the job's now."""
    return RD.differences(job.run_dir, _settings(job))


def refresh_stale(jobs: Sequence[Job], *, keep: bool = False, echo: Callable[[str], None] = print) -> int:
    """Clear what a finished but stale run must redo (its first differing stage on), and all of a run
    that reads a cleared one; with `keep`, only say which runs are stale. Returns how many are."""
    flagged: set[Path] = set()
    count = 0
    for job in jobs:  # a plan lists each run after the run it reads
        if finished(job.run_dir) is None:
            continue
        diff = stale(job)
        upstream = job.after is not None and job.after in flagged
        if not diff and not upstream:
            continue
        count += 1
        flagged.add(job.run_dir)
        why = RD.describe(diff, limit=4) if diff else f"it reads {job.after}, which is stale"
        if keep:
            echo(f"[plr] study: reusing {job.run_dir} made with other settings ({why}; --keep-stale)")
            continue
        first = next(s for s in A.STAGES if s in diff) if diff else None
        echo(f"[plr] study: {job.run_dir} was made with other settings ({why}); it runs again from "
             f"{first or 'the start'}")
        RD.rerun_from(job.run_dir, first or A.STAGES[0], echo=lambda m: None)
    return count


def plr_train(job: Job) -> int:
    """Run one job as `python -m partial_lora.cli train ...` (its own process: a clean slate per run)."""
    cmd = [sys.executable, "-m", "partial_lora.cli", "train", "trainer.progress=false", *job.overrides,
           f"run_dir={job.run_dir}"]
    return subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode


def execute(jobs: Sequence[Job], *, runner: Callable[[Job], int] = plr_train,
            echo: Callable[[str], None] = print, keep_stale: bool = False) -> list[Job]:
    """Run every job that has not finished; return the jobs that failed.

    A job whose Partial-LoRA run failed is skipped (it would read a missing run). A failed job
    does not stop the others; its run dir keeps whatever it wrote (`plr train` records the reason
    in `error.txt` for sweeps, and resumes from its checkpoint when the study runs again).
    """
    failed: list[Job] = []
    bad: set[Path] = set()
    refresh_stale(jobs, keep=keep_stale, echo=echo)
    todo = [j for j in jobs if finished(j.run_dir) is None]
    for job in todo:
        if _complete_without_predictions(job.run_dir):
            # A run made before evaluate wrote predictions: redo only its evaluate stage.
            echo(f"[plr] study: {job.run_dir} has no {A.PREDICTIONS}; its evaluate stage runs again")
            A.clear_done(job.run_dir, A.EVALUATE)
    echo(f"[plr] study: {len(jobs)} runs, {len(jobs) - len(todo)} finished already, {len(todo)} to run")
    for i, job in enumerate(todo, 1):
        if job.after is not None and (job.after in bad or finished(job.after) is None):
            echo(f"[plr] study: skip {job.run_dir} (its Partial-LoRA run {job.after} did not finish)")
            failed.append(job)
            continue
        echo(f"[plr] study {i}/{len(todo)}: {' '.join(job.command())}")
        t0 = time.perf_counter()
        code = runner(job)
        if code != 0 or finished(job.run_dir) is None:
            echo(f"[plr] study: run failed (exit {code}): {job.run_dir}; the study goes on")
            failed.append(job)
            bad.add(job.run_dir)
        else:
            echo(f"[plr] study: done in {time.perf_counter() - t0:.0f} s")
    return failed
