"""Running a study plan: each job a `plr train` in its own process, finished runs reused."""

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


def plr_train(job: Job) -> int:
    """Run one job as `python -m partial_lora.cli train ...` (its own process: a clean slate per run)."""
    cmd = [sys.executable, "-m", "partial_lora.cli", "train", "trainer.progress=false", *job.overrides,
           f"run_dir={job.run_dir}"]
    return subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode


def execute(jobs: Sequence[Job], *, runner: Callable[[Job], int] = plr_train,
            echo: Callable[[str], None] = print) -> list[Job]:
    """Run every job that has not finished; return the jobs that failed.

    A job whose Partial-LoRA run failed is skipped (it would read a missing run). A failed job
    does not stop the others; its run dir keeps whatever it wrote (`plr train` records the reason
    in `error.txt` for sweeps, and resumes from its checkpoint when the study runs again).
    """
    failed: list[Job] = []
    bad: set[Path] = set()
    todo = [j for j in jobs if finished(j.run_dir) is None]
    for job in todo:
        if _complete_without_predictions(job.run_dir):
            # A run made before evaluate wrote predictions: redo only its evaluate stage.
            echo(f"[plr] study: {job.run_dir} has no {A.PREDICTIONS}; its evaluate stage runs again")
            A.clear_done(job.run_dir, "evaluate")
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
