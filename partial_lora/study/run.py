"""Running a study plan: each job a `plr train` in its own process, finished runs reused, several at
once (`study.schedule`).

A finished run is reused only while it was made with the settings its job would run now: a
default changed since (a new `adapter.allocation.tau`, another recipe) makes it stale, and its
first differing stage and every later one run again, as do the runs that read it
(`--keep-stale` reuses stale runs as they are, and says so).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from partial_lora import artifacts as A
from partial_lora import rundir as RD
from partial_lora.errors import PlrError, first_line
from partial_lora.study import schedule as S
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
    for job in jobs:  # a plan lists each run after the runs it reads
        if finished(job.run_dir) is None:
            continue
        diff = stale(job)
        upstream = next((d for d in job.after if d in flagged), None)
        if not diff and upstream is None:
            continue
        count += 1
        flagged.add(job.run_dir)
        why = RD.describe(diff, limit=4) if diff else f"it reads {upstream}, which is stale"
        if keep:
            echo(f"[plr] study: reusing {job.run_dir} made with other settings ({why}; --keep-stale)")
            continue
        first = next(s for s in A.STAGES if s in diff) if diff else None
        echo(f"[plr] study: {job.run_dir} was made with other settings ({why}); it runs again from "
             f"{first or 'the start'}")
        RD.rerun_from(job.run_dir, first or A.STAGES[0], echo=lambda m: None)
    return count


def check(jobs: Sequence[Job]) -> None:
    """Compose and check the settings of one run per task and one per arm before anything runs, so a task
    or arm whose overrides do not compose (a misspelt key, a missing task.path) is one line, not a study
    of failed runs. Runs that read another run (its budget or allocation) are composed but not checked:
    the run they read does not exist yet.

    Raises:
        PlrError: the first task or arm whose overrides do not compose or do not check.
    """
    from hydra import compose, initialize_config_module

    from partial_lora import config as C

    picked: dict[tuple[str, str], Job] = {}
    for job in jobs:
        picked.setdefault(("task", f"{job.model}/{job.task}"), job)
        picked.setdefault(("arm", job.arm), job)
    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        for (kind, name), job in picked.items():
            what = f"task '{job.task}'" if kind == "task" else f"arm '{job.arm}' (on task '{job.task}')"
            try:
                cfg = compose("config", overrides=[*job.overrides, f"run_dir={job.run_dir}"])
                if not job.after:
                    C.validate(cfg)
            except PlrError as e:
                raise PlrError(f"{what} of the study: {e}") from None
            except Exception as e:  # noqa: BLE001 - Hydra reports a bad override in many exception types
                why = first_line(e) or type(e).__name__
                hint = (" (a key this arm's config lacks: set it for the arms that have it, in the suite's "
                        "arm_overrides, or add it with ++key=value)" if why.startswith("Could not override") else "")
                raise PlrError(f"{what} of the study does not compose ({why.rstrip('.')}){hint}; fix its overrides in "
                               "the suite, or the overrides after --") from None


def execute(jobs: Sequence[Job], *, runner: Callable[[Job], int] | None = None, launcher: S.Launcher | None = None,
            slots: Sequence[S.Slot] | None = None, echo: Callable[[str], None] = print,
            keep_stale: bool = False) -> list[S.Failure]:
    """Run every job that has not finished; return the ones that failed or were skipped.

    Up to one job per slot runs at once (default: one slot, all the cores), each after the runs it
    reads; a job whose run failed is skipped. A failed job does not stop the others; its run dir keeps
    whatever it wrote (`plr train` resumes it from its checkpoint when the study runs again).
    `runner` runs each job in this process instead (tests).
    """
    refresh_stale(jobs, keep=keep_stale, echo=echo)
    todo = [j for j in jobs if finished(j.run_dir) is None]
    for job in todo:
        if _complete_without_predictions(job.run_dir):
            # A run made before evaluate wrote predictions: redo only its evaluate stage.
            echo(f"[plr] study: {job.run_dir} has no {A.PREDICTIONS}; its evaluate stage runs again")
            A.clear_done(job.run_dir, A.EVALUATE)
    echo(f"[plr] study: {len(jobs)} runs, {len(jobs) - len(todo)} finished already, {len(todo)} to run")
    chosen = launcher if launcher is not None else S.Inline(runner) if runner is not None else S.Processes()
    return S.run(todo, chosen, slots or S.cpu_slots(1), ok=lambda j: finished(j.run_dir) is not None,
                 ready=lambda d: finished(d) is not None, echo=echo)
