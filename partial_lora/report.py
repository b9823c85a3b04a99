"""`plr report`: one table over many run dirs (methods × tasks, mean ± std over seeds).

The report reads only what `plr train` leaves in a run dir: `results.json`, `.hydra/config.yaml`
and the stages' `done` markers. Nothing is recomputed and no tensors are loaded.

- A run is `complete` when its `results.json` says so and its `evaluate` stage is done. Otherwise
  it is `incomplete` (stages without a `done` marker are listed) or `failed` (a file the report
  needs is unreadable). Every run dir found is listed; none is dropped silently.
- A multi-task run (`task=multi`, `task=commonsense`) counts once under its own task name, with
  the `mean` over its members, and once per member task, under the label `<label> [<multi-task
  name>]` so that it sits next to single-task runs of the same method.
- Complete runs are grouped by (task, label). `label` is the method's name (`label=...` at train
  time; older runs fall back to `adapter.name`). A group's test metrics are given as mean ± sample
  std (ddof=1) over its runs.
- Outputs (each written atomically): `report.md`, `report.csv` (one row per task and method),
  `runs.csv` (one row per run) and `report.png` (main metric against adapter parameters).
"""

from __future__ import annotations

import csv
import glob
import re
import json
import os
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from partial_lora import artifacts as A
from partial_lora.errors import PlrError

HYDRA_CONFIG = A.HYDRA_CONFIG
REPORT_MD, REPORT_CSV, RUNS_CSV, REPORT_PNG = "report.md", "report.csv", "runs.csv", "report.png"
NOT_METRICS = ("_loss", "_examples")  # endings of test_* keys that are not a reportable metric
DIGITS = 4


# ----------------------------------------------------------------------------------- records


@dataclass
class Run:
    """One run dir as the report sees it.

    Attributes:
        run_dir: the run dir (resolved).
        status: `complete`, `incomplete` or `failed`.
        task / label / model / r / seed: the run's identity (None when unknown).
        main_metric: the task's main metric name, without the `test_` prefix.
        metrics: reportable test metrics, keyed `test_<name>`.
        adapter_params / head_params: trainable parameters of the adapter and the head.
        reduction_pct: adapter parameters saved against dense LoRA at the same rank (0 for dense).
        missing: expected stages that have no `done` marker, in pipeline order.
        reason: why a run is not complete (empty when it is).
    """

    run_dir: Path
    status: str
    task: str | None = None
    label: str | None = None
    model: str | None = None
    r: int | None = None
    seed: int | None = None
    main_metric: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    adapter_params: int | None = None
    head_params: int | None = None
    reduction_pct: float | None = None
    missing: list[str] = field(default_factory=list)
    reason: str = ""
    members: dict[str, str] = field(default_factory=dict)  # multi-task: member task -> its main metric


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


# ----------------------------------------------------------------------------------- discovery


def is_run_dir(path: Path) -> bool:
    """A run dir holds `.hydra/config.yaml` (written first) or `results.json` (written last)."""
    return (path / HYDRA_CONFIG).is_file() or (path / A.RESULTS).is_file()


def find_run_dirs(patterns: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Run dirs named by paths or globs, or found below them at any depth.

    Args:
        patterns: run dirs, directories that contain run dirs (e.g. a Hydra multirun root),
            `results.json` / `.hydra/config.yaml` files, or globs of any of these (`**` recurses).

    Returns:
        (the run dirs, resolved, deduplicated and sorted; the patterns that matched no run dir).
    """
    found: set[Path] = set()
    unmatched: list[str] = []
    for pattern in patterns:
        dirs = [d for hit in _expand(pattern) for d in _run_dirs_at(hit)]
        if not dirs:
            unmatched.append(pattern)
        found.update(d.resolve() for d in dirs)
    return sorted(found), unmatched


def _expand(pattern: str) -> list[Path]:
    """An existing path as itself (even with `[` in its name), anything else as a glob."""
    path = Path(pattern).expanduser()
    if path.exists():
        return [path]
    return [Path(p) for p in sorted(glob.glob(os.path.expanduser(pattern), recursive=True))]


def _run_dirs_at(path: Path) -> list[Path]:
    """The run dir a file belongs to, or the run dirs at or below a directory."""
    if path.is_file():
        if path.name == A.RESULTS:
            return [path.parent]
        if path.name == HYDRA_CONFIG.name and path.parent.name == HYDRA_CONFIG.parent.name:
            return [path.parent.parent]
        return []
    out = []
    for root, dirnames, _ in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # skip .hydra, .git, ...
        if is_run_dir(Path(root)):
            out.append(Path(root))
    return out


# ----------------------------------------------------------------------------------- reading


class _Unreadable(Exception):
    """A file in a run dir exists but cannot be parsed."""


def _load_results(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / A.RESULTS
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise _Unreadable(A.RESULTS) from None
    if not isinstance(data, dict):
        raise _Unreadable(A.RESULTS)
    return data


def _load_config(run_dir: Path) -> DictConfig | None:
    path = run_dir / HYDRA_CONFIG
    if not path.is_file():
        return None
    try:
        cfg = OmegaConf.load(path)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, OmegaConfBaseException):
        raise _Unreadable(str(HYDRA_CONFIG)) from None
    if not isinstance(cfg, DictConfig):
        raise _Unreadable(str(HYDRA_CONFIG))
    return cfg


def _select(cfg: DictConfig | None, key: str) -> Any:
    """A config value with interpolations resolved; None when absent or unresolvable.

    Hydra's `.hydra/config.yaml` keeps interpolations such as `label: ${adapter.name}`; some
    (`${now:...}`) need Hydra's resolvers, which are not registered here.
    """
    if cfg is None:
        return None
    try:
        value = OmegaConf.select(cfg, key, default=None)
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    except OmegaConfBaseException:
        return None


def _int(x: Any) -> int | None:
    try:
        return None if x is None or isinstance(x, bool) else int(x)
    except (TypeError, ValueError):
        return None


def _number(x: Any) -> float | None:
    """A JSON number as a float; None for anything else (null, strings, booleans)."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return float(x)


def expected_stages(results: dict[str, Any] | None, cfg: DictConfig | None, run_dir: Path) -> list[str]:
    """The stages this kind of run runs, in pipeline order.

    From `results.json` when present (its `stages` keys), else `stages.plan` of the run's
    config; with neither (or a config `plan` rejects), the stage dirs that exist.
    """
    if results is not None and isinstance(results.get("stages"), dict) and results["stages"]:
        return [s for s in A.STAGES if s in results["stages"]]
    if cfg is not None:
        from partial_lora.stages import plan

        try:
            return plan(cfg)
        except (PlrError, OmegaConfBaseException):
            pass
    return [s for s in A.STAGES if A.stage_dir(run_dir, s).is_dir()]


def _identity(results: dict[str, Any] | None, cfg: DictConfig | None) -> dict[str, Any]:
    """task, label, model, r, seed, main_metric: from results.json, else from the config.

    `label` falls back to the adapter's name (results.json written before `label` existed).
    """
    if results is not None:
        adapter = results.get("adapter") if isinstance(results.get("adapter"), dict) else {}
        ident = {"task": results.get("task"), "model": results.get("model"), "r": adapter.get("r"),
                 "seed": results.get("seed"), "main_metric": results.get("main_metric"),
                 "label": results.get("label") or adapter.get("name") or adapter.get("method")}
    else:
        ident = {"task": _select(cfg, "task.name"), "model": _select(cfg, "model.name"), "r": _select(cfg, "adapter.r"),
                 "seed": _select(cfg, "seed"), "main_metric": _select(cfg, "task.metric"),
                 "label": _select(cfg, "label") or _select(cfg, "adapter.name")}
    return {k: _int(v) if k in ("r", "seed") else (None if v is None else str(v)) for k, v in ident.items()}


def reportable_metrics(metrics: Any) -> dict[str, float]:
    """The reportable `test_*` numbers of a results.json `metrics` dict.

    Further evaluation sets are keyed `test_<set>_<metric>` (MNLI: `test_mismatched_accuracy`);
    their losses and example counts (`test_loss`, `test_mismatched_examples`, ...) are not metrics.
    """
    if not isinstance(metrics, dict):
        return {}
    return {k: float(v) for k, v in metrics.items()
            if k.startswith("test_") and not k.endswith(NOT_METRICS) and _number(v) is not None}


def read_run(run_dir: Path) -> Run:
    """A run dir's status, identity and numbers; never raises for a broken run dir."""
    unreadable = []
    try:
        results = _load_results(run_dir)
    except _Unreadable as e:
        results, unreadable = None, [*unreadable, str(e)]
    try:
        cfg = _load_config(run_dir)
    except _Unreadable as e:
        cfg, unreadable = None, [*unreadable, str(e)]
    run = Run(run_dir, "incomplete", **_identity(results, cfg),
              missing=[s for s in expected_stages(results, cfg, run_dir) if not A.is_done(run_dir, s)])
    if results is not None:
        params = results.get("params") if isinstance(results.get("params"), dict) else {}
        run.metrics = reportable_metrics(results.get("metrics"))
        run.adapter_params, run.head_params = _int(params.get("adapter")), _int(params.get("head"))
        run.reduction_pct = _number(params.get("reduction_pct")) or 0.0  # None: dense LoRA
        members = results.get("member_metrics")
        if isinstance(members, dict):
            run.members = {str(k): str(v.get("main")) for k, v in members.items() if isinstance(v, dict)}
    if unreadable:
        run.status, run.reason = "failed", "unreadable " + ", ".join(unreadable)
    elif (run_dir / A.ERROR).is_file():
        lines = (run_dir / A.ERROR).read_text(errors="replace").strip().splitlines()
        run.status, run.reason = "failed", (lines[0][:300] if lines else A.ERROR)
    elif results is None:
        run.reason = f"no {A.RESULTS}"
    elif results.get("status") != "complete":
        run.reason = f"{A.RESULTS} status {results.get('status')!r}"
    elif run.missing:
        run.reason = f"{A.RESULTS} complete but stages not done"
    elif not run.task or not run.label:
        run.status, run.reason = "failed", f"{A.RESULTS} has no task or label"
    else:
        run.status = "complete"
    return run


# ----------------------------------------------------------------------------------- building


def build(patterns: Sequence[str], metric: str | None = None) -> Report:
    """Find the run dirs, read them and group the complete ones.

    Args:
        patterns: run dirs, directories above run dirs, or globs (see `find_run_dirs`).
        metric: the summary table's metric (`f1` or `test_f1`); None uses each task's main metric.

    Raises:
        PlrError: nothing matched, or `metric` is reported by no task.
    """
    run_dirs, unmatched = find_run_dirs(patterns)
    if not run_dirs:
        missing = [p for p in patterns if not glob.has_magic(p) and not Path(p).exists()]
        if missing:
            raise PlrError(f"'{missing[0]}' does not exist; pass a run dir written by `plr train`, a dir above "
                           "run dirs, or a quoted glob like 'outputs/**'")
        shown = ", ".join(repr(p) for p in patterns)
        raise PlrError(f"no run dirs found in {shown} (a run dir holds {HYDRA_CONFIG} or {A.RESULTS}); "
                       "pass a dir written by `plr train`, a dir above it, or a quoted glob like 'outputs/**'")
    runs = [read_run(d) for d in run_dirs]
    if len({r.model for r in runs if r.status == "complete"}) > 1:
        # One method on several backbones: keep them apart (e.g. `partial · vit-b`, `partial · vit-b-timm`).
        for r in runs:
            r.label = f"{r.label} · {r.model}" if r.label else r.label
    expanded = [member for r in runs for member in with_members(r)]  # multi-task runs: + one per member
    groups = group_runs(expanded)
    tasks = sorted({g.task for g in groups})
    metrics = {t: task_metrics(t, [r for g in groups if g.task == t for r in g.runs]) for t in tasks}
    summary = summary_metrics(metrics, [r for r in expanded if r.status == "complete"], metric)
    notes = [f"{p!r} matched no run dir" for p in unmatched] + repeated_seed_notes(groups)
    return Report(runs, groups, tasks, metrics, summary, notes)


def with_members(run: Run) -> list[Run]:
    """A run, followed (for a complete multi-task run) by one run per member task.

    A member's run has the member's task name, the label `<label> [<multi-task name>]` and the
    member's `test_<metric>` numbers (read from the run's `test_<member>_<metric>`).
    """
    if run.status != "complete" or not run.members:
        return [run]
    out = [run]
    for name, main in run.members.items():
        prefix = f"test_{name}_"
        metrics = {f"test_{k[len(prefix):]}": v for k, v in run.metrics.items() if k.startswith(prefix)}
        out.append(Run(run.run_dir, run.status, task=name, label=f"{run.label} [{run.task}]", model=run.model, r=run.r,
                       seed=run.seed, main_metric=main, metrics=metrics, adapter_params=run.adapter_params,
                       head_params=run.head_params, reduction_pct=run.reduction_pct))
    run.metrics = {k: v for k, v in run.metrics.items()
                   if not any(k.startswith(f"test_{name}_") for name in run.members)}
    return out


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
            dirs = ", ".join(_display(r.run_dir) for r in g.runs[:3]) + (", ..." if len(g.runs) > 3 else "")
            notes.append(f"{g.task} / {g.label}: {len(g.runs)} runs but seed(s) {', '.join(map(str, repeated))} "
                         f"repeat, so the mean mixes different settings ({dirs}); give each setting its own label "
                         "(`plr train label=<name>`, or a \"label\" key in older runs' results.json)")
    return notes


# ----------------------------------------------------------------------------------- markdown


def _display(path: Path) -> str:
    """A path relative to the cwd when it is below it, else absolute."""
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], right: Sequence[bool] | None = None) -> list[str]:
    align = ["---:" if a else "---" for a in (right or [False] * len(header))]
    return ["| " + " | ".join(map(_cell, header)) + " |", "|" + "|".join(align) + "|",
            *("| " + " | ".join(map(_cell, row)) + " |" for row in rows)]


def _stat_text(s: Stat | None) -> str:
    return "-" if s is None else s.text()


def _params_text(s: Stat | None) -> str:
    return "-" if s is None else f"{round(s.mean):,}"


def _joined(xs: Iterable[Any], sep: str = ", ") -> str:
    return sep.join(map(str, xs)) or "-"


def summary_rows(rep: Report) -> list[list[str]]:
    """Summary table rows: per label, each task's summary metric, the mean over tasks, params."""
    tasks = [t for t in rep.tasks if rep.summary[t]]
    rows = []
    for label in rep.labels:
        cells, means, params = [], [], []
        for task in tasks:
            g = rep.group(task, label)
            s = g.stat(str(rep.summary[task])) if g else None
            cells.append(_stat_text(s))
            if s is not None:
                means.append(s.mean)
        for task in rep.tasks:
            g = rep.group(task, label)
            p = g.params() if g else None
            if p is not None:
                params.append(p.mean)
        over = "-" if not means else f"{statistics.fmean(means):.{DIGITS}f}"
        if means and len(means) < len(tasks):
            over += f" ({len(means)}/{len(tasks)} tasks)"
        rows.append([label, *cells, over, "-" if not params else f"{round(statistics.fmean(params)):,}"])
    return rows


def markdown(rep: Report) -> str:
    """The report as markdown: summary, per-task table, unfinished runs, notes."""
    n_done = len(rep.complete)
    lines = ["# plr report", "",
             f"{len(rep.runs)} runs: {n_done} complete, {len(rep.unfinished)} incomplete or failed. "
             f"Metrics on each task's evaluation split (`test_*`: the test set; for GLUE the dev set) as "
             f"mean ± sample std (ddof=1) over a method's runs (one per seed), {DIGITS} decimals; a single run "
             f"shows its value alone.", ""]
    tasks = [t for t in rep.tasks if rep.summary[t]]
    if tasks:
        used = sorted({str(rep.summary[t]) for t in tasks})
        which = used[0] if len(used) == 1 else "; ".join(f"{t}: {rep.summary[t]}" for t in tasks)
        skipped = [t for t in rep.tasks if not rep.summary[t]]
        which += f" (not reported by {', '.join(skipped)})" if skipped else ""
        lines += ["## Summary", "", f"Metric: {which}.",
                  "Mean over tasks counts only the tasks a method has; adapter params are the mean over its tasks.", ""]
        header = ["method", *tasks, "mean over tasks", "adapter params"]
        lines += _table(header, summary_rows(rep), [False] + [True] * (len(header) - 1)) + [""]
    if rep.groups:
        lines += ["## Per task", ""] + _per_task_table(rep) + [""]
    if not rep.complete:
        lines += ["No complete runs yet.", ""]
    if rep.unfinished:
        lines += ["## Incomplete or failed runs", ""]
        rows = [[_display(r.run_dir), r.task or "?", r.label or "?", "?" if r.seed is None else r.seed, r.status,
                 _unfinished_text(r)] for r in rep.unfinished]
        lines += _table(["run dir", "task", "label", "seed", "status", "missing stages / reason"], rows) + [""]
    if rep.notes:
        lines += ["## Notes", "", *(f"- {n}" for n in rep.notes), ""]
    return "\n".join(lines).rstrip() + "\n"


def _unfinished_text(run: Run) -> str:
    missing = f"missing: {', '.join(run.missing)}" if run.missing else ""
    return "; ".join(x for x in (missing, run.reason) if x) or "-"


def _per_task_table(rep: Report) -> list[str]:
    metrics = rep.all_metrics
    header = ["task", "method", "model", "r", "n", "seeds", *(m.removeprefix("test_") for m in metrics),
              "adapter params", "reduction vs dense LoRA"]
    rows = []
    for g in rep.groups:
        red = g.reduction()
        rows.append([g.task, g.label, _joined(g.models), _joined(g.ranks), len(g.runs), _joined(g.seeds),
                     *(_stat_text(g.stat(m)) if m in rep.metrics[g.task] else "-" for m in metrics),
                     _params_text(g.params()), "-" if red is None else f"{red.mean:.1f}%"])
    return _table(header, rows, [False, False, False, True, True, False] + [True] * (len(metrics) + 2))


# ----------------------------------------------------------------------------------- csv


def _num(x: float | None) -> float | int | str:
    """A csv cell: blank for None, an int when whole, else rounded to 10 decimals."""
    if x is None:
        return ""
    return int(x) if float(x).is_integer() else round(float(x), 10)


def group_rows(rep: Report) -> tuple[list[str], list[list[Any]]]:
    """report.csv: one row per (task, label)."""
    metrics = rep.all_metrics
    header = ["task", "label", "model", "r", "n_seeds", "seeds"]
    for m in metrics:
        header += [f"{m.removeprefix('test_')}_mean", f"{m.removeprefix('test_')}_std"]
    header += ["adapter_params_mean", "reduction_pct_mean", "head_params_mean"]
    rows = []
    for g in rep.groups:
        row: list[Any] = [g.task, g.label, _joined(g.models, " "), _joined(g.ranks, " "), len(g.runs),
                          _joined(g.seeds, " ")]
        for m in metrics:
            s = g.stat(m)
            row += ["", ""] if s is None else [_num(s.mean), _num(s.std)]
        row += [_num(s.mean if s else None) for s in (g.params(), g.reduction(), g.head())]
        rows.append(row)
    return header, rows


def run_rows(rep: Report) -> tuple[list[str], list[list[Any]]]:
    """runs.csv: one row per run dir, complete or not."""
    metrics = list(dict.fromkeys(m for r in rep.runs for m in r.metrics))
    header = ["run_dir", "status", "task", "label", "model", "r", "seed", "missing_stages", "reason",
              *(m.removeprefix("test_") for m in metrics), "adapter_params", "head_params", "reduction_pct"]
    rows = [[_display(r.run_dir), r.status, r.task or "", r.label or "", r.model or "", _num(r.r), _num(r.seed),
             " ".join(r.missing), r.reason, *(_num(r.metrics.get(m)) for m in metrics),
             _num(r.adapter_params), _num(r.head_params), _num(r.reduction_pct)] for r in rep.runs]
    return header, rows


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A csv file, written atomically."""
    with A.atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


# ----------------------------------------------------------------------------------- plot


def plot(rep: Report, path: Path) -> bool:
    """report.png: per task, the summary metric against adapter parameters (log x), one marker
    per method with std error bars. Returns False (and writes nothing) without complete runs."""
    tasks = [t for t in rep.tasks if rep.summary[t]]
    if not tasks:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(tasks))
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 3.8 * rows), squeeze=False)
    colors = {label: plt.get_cmap("tab10")(i % 10) for i, label in enumerate(rep.labels)}
    for ax, task in zip(axes.flat, tasks, strict=False):
        _plot_task(ax, rep, task, colors)
    for ax in list(axes.flat)[len(tasks):]:
        ax.set_visible(False)
    fig.tight_layout()
    with A.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return True


def _plot_task(ax: Any, rep: Report, task: str, colors: dict[str, Any]) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    metric = str(rep.summary[task])
    xs = []
    for g in (g for g in rep.groups if g.task == task):
        s, p = g.stat(metric), g.params()
        if s is None or p is None or p.mean <= 0:
            continue
        xs.append(p.mean)
        ax.errorbar(p.mean, s.mean, yerr=s.std or 0.0, fmt="o", capsize=3, color=colors[g.label])
        ax.annotate(g.label, (p.mean, s.mean), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xscale("log")
    if xs:
        ax.set_xlim(min(xs) / 2, max(xs) * 2)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("adapter trainable parameters")
    ax.set_ylabel(f"{metric} (mean ± std)")
    models = sorted({m for g in rep.groups if g.task == task for m in g.models})
    ax.set_title(f"{task} ({', '.join(models)})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)


# ----------------------------------------------------------------------------------- outputs


def write(rep: Report, out: Path) -> list[Path]:
    """Write report.md, report.csv, runs.csv and (with complete runs) report.png into `out`.

    Returns:
        The files written. A stale report.png from an earlier report is removed when there is
        nothing to plot, so the folder never mixes reports.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        A.write_text(out / REPORT_MD, markdown(rep))
        write_csv(out / REPORT_CSV, *group_rows(rep))
        write_csv(out / RUNS_CSV, *run_rows(rep))
        written = [out / REPORT_MD, out / REPORT_CSV, out / RUNS_CSV]
        if plot(rep, out / REPORT_PNG):
            written.append(out / REPORT_PNG)
        else:
            (out / REPORT_PNG).unlink(missing_ok=True)
    except OSError as e:
        raise PlrError(f"cannot write the report to {out} ({e.strerror or e}); pass a writable --out DIR") from None
    return written
