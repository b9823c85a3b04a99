"""Tables: `report.md` (markdown) and `report.csv` / `runs.csv`."""

from __future__ import annotations

import csv
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from partial_lora import artifacts
from partial_lora.report.groups import DIGITS, Report, Stat
from partial_lora.report.runs import Run, display_path

# ----------------------------------------------------------------------------------- markdown


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
        rows = [[display_path(r.run_dir), r.task or "?", r.label or "?", "?" if r.seed is None else r.seed, r.status,
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
    rows = [[display_path(r.run_dir), r.status, r.task or "", r.label or "", r.model or "", _num(r.r), _num(r.seed),
             " ".join(r.missing), r.reason, *(_num(r.metrics.get(m)) for m in metrics),
             _num(r.adapter_params), _num(r.head_params), _num(r.reduction_pct)] for r in rep.runs]
    return header, rows


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A csv file, written atomically."""
    with artifacts.atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
