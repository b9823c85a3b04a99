"""Grouping and statistics: complete runs by (task, label), mean ± std over seeds (`Report`)."""

from __future__ import annotations

import re
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from partial_lora.errors import PlrError
from partial_lora.report.runs import Run, display_path

DIGITS = 4


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (None for a single value) of n values."""

    mean: float
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Stat | None:
        """The statistic of the values that are not None (None when there are none)."""
        xs = [float(v) for v in values if v is not None]
        if not xs:
            return None
        return cls(statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None, len(xs))

    def text(self) -> str:
        """`0.9200 ± 0.0200`, or just `0.9500` for one value."""
        return f"{self.mean:.{DIGITS}f}" + ("" if self.std is None else f" ± {self.std:.{DIGITS}f}")


@dataclass
class Group:
    """The complete runs of one method on one task (normally one run per seed)."""

    task: str
    label: str
    runs: list[Run]

    @property
    def models(self) -> list[str]:
        return sorted({r.model for r in self.runs if r.model is not None})

    @property
    def ranks(self) -> list[int]:
        return sorted({r.r for r in self.runs if r.r is not None})

    @property
    def seeds(self) -> list[int]:
        return sorted(r.seed for r in self.runs if r.seed is not None)

    def stat(self, metric: str) -> Stat | None:
        """Mean ± std of one `test_*` metric over the group's runs."""
        return Stat.of(r.metrics.get(metric) for r in self.runs)

    def params(self) -> Stat | None:
        return Stat.of(r.adapter_params for r in self.runs)

    def head(self) -> Stat | None:
        return Stat.of(r.head_params for r in self.runs)

    def reduction(self) -> Stat | None:
        return Stat.of(r.reduction_pct for r in self.runs)


@dataclass
class Report:
    """Everything the outputs are made from.

    Attributes:
        runs: every run dir found, complete or not, in path order.
        groups: the complete runs by (task, label), sorted.
        tasks: the tasks with at least one complete run, sorted.
        metrics: per task, its reportable `test_*` metrics (main metric first).
        summary: per task, the metric the summary table uses (None if the task lacks it).
        notes: things a reader should know (repeated seeds, patterns that matched nothing).
    """

    runs: list[Run]
    groups: list[Group]
    tasks: list[str]
    metrics: dict[str, list[str]]
    summary: dict[str, str | None]
    notes: list[str] = field(default_factory=list)

    @property
    def complete(self) -> list[Run]:
        return [r for r in self.runs if r.status == "complete"]

    @property
    def unfinished(self) -> list[Run]:
        return [r for r in self.runs if r.status != "complete"]

    @property
    def labels(self) -> list[str]:
        return sorted({g.label for g in self.groups}, key=natural_key)

    def group(self, task: str, label: str) -> Group | None:
        return next((g for g in self.groups if g.task == task and g.label == label), None)

    @property
    def all_metrics(self) -> list[str]:
        """Every task's metrics, in first-seen order."""
        return list(dict.fromkeys(m for task in self.tasks for m in self.metrics[task]))


def group_runs(runs: Iterable[Run]) -> list[Group]:
    """Complete runs by (task, label), sorted by task then label."""
    by_key: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        if run.status == "complete":
            by_key.setdefault((str(run.task), str(run.label)), []).append(run)
    return [Group(task, label, rs) for (task, label), rs in
            sorted(by_key.items(), key=lambda kv: (kv[0][0], natural_key(kv[0][1])))]


def natural_key(label: str) -> list[Any]:
    """Sort `shots4` before `shots16` and `tau0.8` before `tau0.95`: numbers compare as numbers."""
    return [(0, float(part), "") if part[:1].isdigit() else (1, 0.0, part)
            for part in re.split(r"(\d+(?:\.\d+)?)", label) if part]


def task_metrics(task: str, runs: Sequence[Run]) -> list[str]:
    """A task's `test_*` metrics: the main one first (the runs' most common), then first-seen order."""
    mains = Counter(f"test_{r.main_metric}" for r in runs if r.main_metric)
    seen = list(dict.fromkeys(k for r in runs for k in r.metrics))
    main = [mains.most_common(1)[0][0]] if mains else []
    return list(dict.fromkeys([m for m in main if m in seen] + seen))


def summary_metrics(metrics: dict[str, list[str]], complete: Sequence[Run],
                    metric: str | None) -> dict[str, str | None]:
    """Per task, the `test_*` key the summary table shows."""
    if metric is None:
        return {task: (names[0] if names else None) for task, names in metrics.items()}
    key = "test_" + metric.removeprefix("test_")
    if complete and not any(key in names for names in metrics.values()):
        known = sorted({m.removeprefix("test_") for names in metrics.values() for m in names})
        raise PlrError(f"unknown metric '{metric}': no task reports {key}; choose one of: {', '.join(known)}")
    return {task: (key if key in names else None) for task, names in metrics.items()}


def repeated_seed_notes(groups: Iterable[Group]) -> list[str]:
    """Groups where a seed appears twice: runs that differ in a setting the label does not name."""
    notes = []
    for g in groups:
        repeated = sorted(s for s, n in Counter(g.seeds).items() if n > 1)
        if repeated:
            dirs = ", ".join(display_path(r.run_dir) for r in g.runs[:3]) + (", ..." if len(g.runs) > 3 else "")
            notes.append(f"{g.task} / {g.label}: {len(g.runs)} runs but seed(s) {', '.join(map(str, repeated))} "
                         f"repeat, so the mean mixes different settings ({dirs}); give each setting its own label "
                         "(`plr train label=<name>`, or a \"label\" key in older runs' results.json)")
    return notes
