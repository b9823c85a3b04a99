"""How long a study's runs still to run will take, from how long finished runs like them took.

`plr study --dry-run`, and a study as it starts, print one line:

    [plr] study: about 27.0 h of run time left for 389 runs (from the logs of 9 finished runs like them);
                 about 13.5 h at 2 at a time      (one line)

A run's time is read off its log in the study folder (`<out>/logs/<model>/<task>/<arm>/seed<n>.log`):
the sum of the attempts its start and end marks recorded (a stopped and resumed run adds up), for a
run whose last attempt ended with exit 0. A job is timed by the finished runs most like it that the
folder holds: the same model, task and arm, else the same model and arm on any task, else any arm
of the model. A tuned run (`<arm>+<key>+<value>`) is timed by tuned runs and an untuned one by
untuned runs, as a grid's runs reuse their probe and allocation. It is an estimate: runs timed with
another number of threads, on another machine or beside other work took other times, and runs that
wait for another (an arm that reads Partial-LoRA, a grid's choice) can leave a slot idle, so the time at
N at a time is a lower bound. A job with no finished run of its model to go by is counted, not timed.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from partial_lora.study import grid
from partial_lora.study.plan import Job
from partial_lora.study.schedule import duration, marks

_END = re.compile(r"end exit (-?\d+) after ([0-9.]+) s")


def run_time(log: Path) -> float | None:
    """The seconds a finished run's log recorded over all its attempts; None when its last attempt did not end
    with exit 0 (or the log has no end mark, or cannot be read)."""
    try:
        ends = [_END.match(what) for _, what in marks(log)]
    except OSError:
        return None
    ends = [m for m in ends if m is not None]
    if not ends or ends[-1].group(1) != "0":
        return None
    return sum(float(m.group(2)) for m in ends)


def _kind(arm: str) -> tuple[str, bool]:
    """(the untuned arm dir, whether the run is on a tuning grid)."""
    base, key, _ = grid.split(arm)
    return base, key is not None


def times(logs: Path) -> dict[tuple[str, str, str, bool], list[float]]:
    """Every finished run's time under a study's logs folder, keyed by (model, task, untuned arm, tuned)."""
    out: dict[tuple[str, str, str, bool], list[float]] = defaultdict(list)
    for log in sorted(logs.glob("*/**/seed*.log")):
        parts = log.relative_to(logs).parts
        if len(parts) < 4:
            continue
        seconds = run_time(log)
        if seconds is not None:
            base, tuned = _kind(parts[-2])
            out[parts[0], "/".join(parts[1:-2]), base, tuned].append(seconds)
    return out


@dataclass(frozen=True)
class Estimate:
    runs: int          # jobs still to run
    timed: int         # of those, the ones a finished run like them timed
    seconds: float     # their summed estimate
    evidence: int      # finished runs the estimate read

    def line(self, slots: int) -> str:
        if self.runs == 0:
            return "[plr] study: nothing left to run"
        if self.timed == 0:
            return (f"[plr] study: {self.runs} runs to run; no finished run of their model(s) in this study folder "
                    "to time them by (the first runs' logs will)")
        untimed = (f"; {self.runs - self.timed} with no finished run like them, not counted"
                   if self.timed < self.runs else "")
        at = f"; about {duration(self.seconds / slots)} at {slots} at a time" if slots > 1 else ""
        return (f"[plr] study: about {duration(self.seconds)} of run time left for {_n(self.timed, 'run')} (from the "
                f"logs of {_n(self.evidence, 'finished run')} like them{untimed}){at}")


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def estimate(todo: Iterable[Job], logs: Path) -> Estimate:
    """The time `todo` will take, from the finished runs under `logs` (`<out>/logs`)."""
    known = times(logs)
    # each level groups the (model, task, arm, tuned) keys of `known` it pools: the closest match first
    levels: list[dict[tuple, list[tuple]]] = [defaultdict(list) for _ in range(3)]
    for fine in known:
        model, task, base, tuned = fine
        for level, key in zip(levels, (fine, (model, base, tuned), (model, tuned))):
            level[key].append(fine)
    jobs: Sequence[Job] = list(todo)
    total, timed, used = 0.0, 0, set()
    for job in jobs:
        base, tuned = _kind(job.arm)
        for level, key in zip(levels, ((job.model, job.task, base, tuned), (job.model, base, tuned),
                                       (job.model, tuned))):
            if key in level:
                seconds = [t for fine in level[key] for t in known[fine]]
                total += sum(seconds) / len(seconds)
                timed += 1
                used.update(level[key])
                break
    return Estimate(len(jobs), timed, total, sum(len(known[fine]) for fine in used))
