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

Modules: `runs` (finding run dirs and reading each one), `groups` (grouping complete runs and their
mean ± std), `tables` (report.md, report.csv, runs.csv) and `plot` (report.png); this one builds
the report (`build`) and writes its files (`write`).
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

from partial_lora import artifacts
from partial_lora.errors import PlrError
from partial_lora.report.groups import (
    DIGITS,
    Group,
    Report,
    Stat,
    group_runs,
    natural_key,
    repeated_seed_notes,
    summary_metrics,
    task_metrics,
)
from partial_lora.report.plot import plot
from partial_lora.report.runs import (
    HYDRA_CONFIG,
    NOT_METRICS,
    Run,
    expected_stages,
    find_run_dirs,
    is_run_dir,
    read_run,
    reportable_metrics,
    with_members,
)
from partial_lora.report.tables import group_rows, markdown, run_rows, summary_rows, write_csv

__all__ = ["DIGITS", "HYDRA_CONFIG", "NOT_METRICS", "REPORT_CSV", "REPORT_MD", "REPORT_PNG", "RUNS_CSV", "Group",
           "Report", "Run", "Stat", "build", "expected_stages", "find_run_dirs", "group_rows", "group_runs",
           "is_run_dir", "markdown", "natural_key", "plot", "read_run", "repeated_seed_notes", "reportable_metrics",
           "run_rows", "summary_metrics", "summary_rows", "task_metrics", "with_members", "write", "write_csv"]

REPORT_MD, REPORT_CSV, RUNS_CSV, REPORT_PNG = "report.md", "report.csv", "runs.csv", "report.png"


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
        raise PlrError(f"no run dirs found in {shown} (a run dir holds {HYDRA_CONFIG} or {artifacts.RESULTS}); "
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


# ----------------------------------------------------------------------------------- outputs


def write(rep: Report, out: Path) -> list[Path]:
    """Write report.md, report.csv, runs.csv and (with complete runs) report.png into `out`.

    Returns:
        The files written. A stale report.png from an earlier report is removed when there is
        nothing to plot, so the folder never mixes reports.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        artifacts.write_text(out / REPORT_MD, markdown(rep))
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
