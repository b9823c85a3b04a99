"""Running a study plan: each job a `plr train` in its own process, finished runs reused, several at
once (`study.schedule`).

A finished run is reused only while it was made with the settings its job would run now: a
default changed since (a new `adapter.allocation.tau`, another recipe) makes it stale, and its
first differing stage and every later one run again, as do the runs that read it
(`--keep-stale` reuses stale runs as they are, and says so).

A run restored from the ledger (`experiments/ledger.py --restore`: results and predictions only,
marked `RESTORED`) serves the tables; when a run that has still to run reuses its probe and
allocation (`from_run`), it runs again in full first (`materialise`), so that run has them to read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from partial_lora import artifacts, rundir
from partial_lora.errors import PlrError, first_line
from partial_lora.study import grid, schedule
from partial_lora.study.plan import Job

RESTORED = "RESTORED"  # the mark `experiments/ledger.py --restore` leaves in a slim run dir


def _complete(run_dir: Path) -> dict[str, Any] | None:
    """The run's results.json if its status is complete, else None."""
    try:
        results = json.loads((run_dir / artifacts.RESULTS).read_text())
    except (OSError, ValueError):
        return None
    return results if results.get("status") == "complete" else None


def _has_predictions(run_dir: Path) -> bool:
    return (artifacts.stage_dir(run_dir, artifacts.EVALUATE) / artifacts.PREDICTIONS).exists()


def finished(run_dir: Path) -> dict[str, Any] | None:
    """The run's results if it completed (and wrote its predictions), else None."""
    results = _complete(run_dir)
    return results if results is not None and _has_predictions(run_dir) else None


def val_score(results: dict[str, Any] | None) -> float | None:
    """A finished run's validation main metric (`val_<main metric>`): the only score a grid's choice reads."""
    if results is None:
        return None
    value = (results.get("metrics") or {}).get(f"val_{results.get('main_metric')}")
    return None if value is None or not math.isfinite(float(value)) else float(value)


def grid_state(job: Job) -> list[tuple[str, bool, float | None]]:
    """(value, finished, validation score) of each run of a waiting job's grid (`Job.grid`)."""
    out = []
    for value, run_dir in job.grid:
        results = finished(run_dir)
        out.append((value, results is not None, val_score(results)))
    return out


def resolve(job: Job, *, complete: bool = False) -> Job | None:
    """A job waiting on a grid's choice as the run at the chosen value (`study.grid.choose`, over the
    grid's finished runs: a value whose run failed is left out). None when no grid run finished, or,
    with `complete`, while any has not."""
    state = grid_state(job)
    if complete and not all(done for _, done, _ in state):
        return None
    value = grid.choose({v: score for v, done, score in state if done})
    return None if value is None else job.at(value)


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
    return rundir.differences(job.run_dir, _settings(job))


def refresh_stale(jobs: Sequence[Job], *, keep: bool = False, echo: Callable[[str], None] = print,
                  flagged: set[Path] | None = None) -> int:
    """Clear what a finished but stale run must redo (its first differing stage on), and all of a run
    that reads a cleared one; with `keep`, only say which runs are stale. Returns how many are.
    `flagged` collects the stale runs (and is read: a run that reads one of them is stale too)."""
    flagged = set() if flagged is None else flagged
    count = 0
    for job in jobs:  # a plan lists each run after the runs it reads
        if job.waits or finished(job.run_dir) is None:
            continue
        diff = stale(job)
        upstream = next((d for d in job.after if d in flagged), None)
        if not diff and upstream is None:
            continue
        count += 1
        flagged.add(job.run_dir)
        why = rundir.describe(diff, limit=4) if diff else f"it reads {upstream}, which is stale"
        if keep:
            echo(f"[plr] study: reusing {job.run_dir} made with other settings ({why}; --keep-stale)")
            continue
        first = next(s for s in artifacts.STAGES if s in diff) if diff else None
        echo(f"[plr] study: {job.run_dir} was made with other settings ({why}); it runs again from "
             f"{first or 'the start'}")
        rundir.rerun_from(job.run_dir, first or artifacts.STAGES[0], echo=lambda m: None)
    return count


def stage_sources(job: Job) -> list[Path]:
    """The run dirs whose probe and allocation the job reuses (`from_run`)."""
    return [Path(o.split("=", 1)[1]) for o in job.overrides if o.startswith("from_run=")]


def restored_sources(jobs: Sequence[Job]) -> dict[Path, int]:
    """Planned runs restored from the ledger whose probe and allocation a run still to run reuses (it
    holds none): run dir -> how many runs read it."""
    planned = {j.run_dir for j in jobs}
    out: dict[Path, int] = {}
    for job in jobs:
        known = resolve(job, complete=True) if job.waits else job
        if known is not None and finished(known.run_dir) is not None:
            continue
        for src in stage_sources(job):
            if src in planned and (src / RESTORED).exists():
                out[src] = out.get(src, 0) + 1
    return out


def materialise(run_dir: Path) -> None:
    """Make a restored run dir a run to make again: its results, predictions and mark go (the ledger
    keeps them), so the study runs it in full, with the probe and allocation its readers reuse."""
    import shutil

    (run_dir / artifacts.RESULTS).unlink(missing_ok=True)
    shutil.rmtree(artifacts.stage_dir(run_dir, artifacts.EVALUATE), ignore_errors=True)
    (run_dir / RESTORED).unlink()


def check(jobs: Sequence[Job]) -> None:
    """Compose and check the settings of one run per task and one per arm before anything runs, so a task
    or arm whose overrides do not compose (a misspelt key, a missing task.path) is one line, not a study
    of failed runs. Runs that read another run (its budget or allocation) are composed but not checked:
    the run they read does not exist yet.

    Raises:
        PlrError: the first task or arm whose overrides do not compose or do not check.
    """
    from hydra import compose, initialize_config_module

    from partial_lora import config

    picked: dict[tuple[str, str], Job] = {}
    for job in (j for j in jobs if not j.waits):  # a waiting run is a grid run at another seed
        base, key, _ = grid.split(job.arm)
        picked.setdefault(("task", f"{job.model}/{job.task}"), job)
        picked.setdefault(("arm", base) if key is None else ("tuned", base), job)
    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        for (kind, name), job in picked.items():
            what = f"task '{job.task}'" if kind == "task" else f"arm '{job.arm}' (on task '{job.task}')"
            try:
                cfg = compose("config", overrides=[*job.overrides, f"run_dir={job.run_dir}"])
                if not job.after:
                    config.validate(cfg)
            except PlrError as e:
                raise PlrError(f"{what} of the study: {e}") from None
            except Exception as e:  # noqa: BLE001 - Hydra reports a bad override in many exception types
                why = first_line(e) or type(e).__name__
                if kind == "tuned":
                    _, key, value = grid.split(job.arm)
                    raise PlrError(f"--tune {key}: {key}={value} does not compose for arm '{name}' "
                                   f"({why.rstrip('.')}); give a key of plr train's config (plr train --help), e.g. "
                                   f"{grid.EXAMPLE_GRID}") from None
                hint = (" (a key this arm's config lacks: set it for the arms that have it, in the suite's "
                        "arm_overrides, or add it with ++key=value)" if why.startswith("Could not override") else "")
                raise PlrError(f"{what} of the study does not compose ({why.rstrip('.')}){hint}; fix its overrides in "
                               "the suite, or the overrides after --") from None


def execute(jobs: Sequence[Job], *, runner: Callable[[Job], int] | None = None, launcher: schedule.Launcher
            | None = None,
            slots: Sequence[schedule.Slot] | None = None, echo: Callable[[str], None] = print,
            keep_stale: bool = False, out: Path | None = None) -> list[schedule.Failure]:
    """Run every job that has not finished; return the ones that failed or were skipped.

    Up to one job per slot runs at once (default: one slot, all the cores), each after the runs it
    reads; a job whose run failed is skipped. A failed job does not stop the others; its run dir keeps
    whatever it wrote (`plr train` resumes it from its checkpoint when the study runs again).
    `runner` runs each job in this process instead (tests). With the study folder `out`, it first says how
    long the runs left will take, from the logs of finished runs like them (`study.estimate`).
    """
    for src, readers in restored_sources(jobs).items():
        echo(f"[plr] study: {src} was restored from the ledger (no probe or allocation); it runs again, for "
             f"the {readers} run(s) that reuse its probe and allocation")
        materialise(src)
    flagged: set[Path] = set()
    refresh_stale(jobs, keep=keep_stale, echo=echo, flagged=flagged)
    # The runs at a grid's choice whose grid finished before are known now: reused, or stale like any other.
    known = {id(j): resolve(j, complete=True) for j in jobs if j.waits}
    refresh_stale([k for k in known.values() if k is not None], keep=keep_stale, echo=echo, flagged=flagged)
    jobs = [known.get(id(j)) or j for j in jobs]
    todo = [j for j in jobs if j.waits or finished(j.run_dir) is None]
    for job in todo:
        if _complete_without_predictions(job.run_dir):
            # A run made before evaluate wrote predictions: redo only its evaluate stage.
            echo(f"[plr] study: {job.run_dir} has no {artifacts.PREDICTIONS}; its evaluate stage runs again")
            artifacts.clear_done(job.run_dir, artifacts.EVALUATE)
    echo(f"[plr] study: {len(jobs)} runs, {len(jobs) - len(todo)} finished already, {len(todo)} to run")
    if out is not None:
        from partial_lora.study.estimate import estimate

        echo(estimate(todo, out / "logs").line(len(slots or [None])))
    if launcher is None:
        launcher = schedule.Inline(runner) if runner is not None else schedule.Processes()
    return schedule.run(todo, launcher, slots or schedule.cpu_slots(1), ok=lambda j: finished(j.run_dir) is not None,
                 ready=lambda d: finished(d) is not None, echo=echo, resolve=resolve)
