"""The method table: one row per arm, pooled over a model's tasks, for a user choosing a method.

Per (model, arm), from the study's finished runs (at the tuned setting when the study has a tuning
grid: `study.choice.tuned_view`, so every arm, dense LoRA included, is at its own chosen rate):

- trainable adapter parameters (the head not counted), the mean over the tasks;
- the test main metric, the mean over the tasks of each task's mean over seeds;
- its paired difference against dense LoRA r=8 (the `lora` arm) in points, pooled over the tasks
  both ran (the claims' hierarchical paired bootstrap, `claims.pair_rows`), its 95% CI, and the
  verdict of "matches dense LoRA" (non-inferiority at -1 point);
- wall time per run (every stage, the reused probe and allocation included: what the run cost);
- peak training memory: the retrain's `peak_memory` in results.json (`runtime.peak_memory`: on the
  CPU the process's peak resident memory, which includes the model and the stages before the
  retrain; on CUDA the peak tensor memory allocated during the retrain).

`write` also writes the table alone to `method-table.md`, beside study.md, so the README can embed
the generated file rather than a typed copy.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from partial_lora import artifacts
from partial_lora.study.arms import ARMS
from partial_lora.study.claims import Claim, Run, Study, pair_rows
from partial_lora.study.plan import split_arm

DENSE = "lora"
FILE = "method-table.md"


@dataclass(frozen=True)
class MethodRow:
    model: str
    arm: str
    tasks: tuple[str, ...]
    rates: tuple[str, ...]            # the chosen value per task ("shared": no grid)
    params: float
    metrics: tuple[str, ...]          # the tasks' main metrics
    value: float                      # mean over the tasks of the mean test metric
    diff: float | None                # against dense LoRA r=8, points (None: the dense arm itself, or no pair)
    low: float | None
    high: float | None
    verdict: str | None               # of "matches dense LoRA"
    wall_min: float
    memory_mb: float | None
    memory_measure: str | None
    seeds: int                        # runs per task (the least)


def _per_dir(runs: Sequence[Run]) -> list[Run]:
    """One run per run dir (a multi-task run's members share one dir, one wall time, one memory)."""
    seen: dict[Path, Run] = {}
    for r in runs:
        seen.setdefault(r.dir, r)
    return list(seen.values())


def method_rows(study: Study, rates: Mapping[tuple[str, str, str], str] | None = None, n_boot: int = 2000,
                seed: int = 0) -> list[MethodRow]:
    """The method table's rows, per model in the arm registry's order (variants after).

    `rates`: (model, task, arm) -> the chosen value, for the rates column (the tuned view's arms).
    """
    by = study.by()
    order = {a: i for i, a in enumerate(ARMS)}
    out = []
    for model in sorted({r.model for r in study.runs}):
        arms = sorted({arm for m, _, arm in by if m == model},
                      key=lambda a: (split_arm(a)[1] or "", order.get(split_arm(a)[0], 99), a))
        for arm in arms:
            tasks = sorted(t for m, t, a in by if m == model and a == arm)
            runs = {t: by[model, t, arm] for t in tasks}
            means = [statistics.mean(r.value for r in runs[t].values()) for t in tasks]
            every = _per_dir([r for t in tasks for r in runs[t].values()])
            mem = [r.results["peak_memory"]["mb"] for r in every if (r.results.get("peak_memory") or {}).get("mb")]
            measures = sorted({r.results["peak_memory"].get("measure") or "" for r in every
                               if r.results.get("peak_memory")})
            diff = low = high = verdict = None
            if arm != DENSE:
                pairs = pair_rows(by, model, Claim("vs", f"{arm} against dense LoRA", arm, DENSE, "matches"),
                                  n_boot=n_boot, seed=seed)
                if pairs:
                    row = pairs[-1]  # the pooled row when there are several tasks, else the one task's
                    c = row.comparison
                    diff, low, high, verdict = c.mean, c.low, c.high, row.verdict
            out.append(MethodRow(
                model, arm, tuple(tasks),
                tuple((rates or {}).get((model, t.split("/")[0], arm), "shared") for t in tasks),
                statistics.mean(statistics.mean(r.params for r in runs[t].values()) for t in tasks),
                tuple(sorted({next(iter(runs[t].values())).metric for t in tasks})), statistics.mean(means),
                diff, low, high, verdict, statistics.mean(r.wall for r in every) / 60,
                statistics.mean(mem) if mem else None, ", ".join(m for m in measures if m) or None,
                min(len(runs[t]) for t in tasks)))
    return out


def _rates(rates: Sequence[str]) -> str:
    distinct = list(dict.fromkeys(rates))
    return distinct[0] if len(distinct) == 1 else " / ".join(rates)


def markdown(rows: Sequence[MethodRow], setting: str) -> str:
    """The method table, with a paragraph on what each column is. `setting` says at which rates the
    arms ran (e.g. `each arm at its tuned retrain.lr`)."""
    lines = [f"Generated by `plr study` from its finished runs ({setting}); one row per arm, pooled over the "
             "model's tasks. Parameters: trainable adapter entries (the head not counted), mean over the tasks. "
             "Test: the tasks' main metric, mean over the tasks of the mean over seeds. vs dense LoRA: the paired "
             "difference against dense LoRA r=8 (`lora`) in points, pooled over the tasks (hierarchical paired "
             "bootstrap, 95% CI); 'matches' = non-inferior at -1 point. Wall: minutes per run, every stage. "
             "Peak memory: the retrain's (on the CPU the process's peak resident memory, model included; on CUDA "
             "the peak tensor memory of the retrain). Rate: the chosen value per task, in the tasks' order.", "",
             "| model | arm | tasks | rate | adapter params | test | vs dense LoRA (pts) | 95% CI | matches dense "
             "LoRA | wall / run | peak memory |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        diff = "-" if r.diff is None else f"{r.diff:+.2f}"
        ci = "-" if r.low is None else f"[{r.low:+.2f}, {r.high:+.2f}]"
        mem = "-" if r.memory_mb is None else f"{r.memory_mb:,.0f} MB"
        lines.append(f"| {r.model} | {r.arm} | {len(r.tasks)} ({r.seeds}+ seeds) | {_rates(r.rates)} | "
                     f"{r.params:,.0f} | {r.value:.4f} ({', '.join(r.metrics)}) | {diff} | {ci} | "
                     f"{r.verdict or '-'} | {r.wall_min:.1f} min | {mem} |")
    return "\n".join(lines) + "\n"


def write(out: Path, rows: Sequence[MethodRow], setting: str) -> Path:
    """`<out>/method-table.md`: the method table alone."""
    path = out / FILE
    artifacts.write_text(path, "# Methods at a glance\n\n" + markdown(rows, f"{setting}; study folder {out}"))
    return path


def rates_of(choices: Sequence) -> dict[tuple[str, str, str], str]:
    """(model, task, arm) -> the chosen value, from `study.choice.choices`."""
    out: dict[tuple[str, str, str], str] = defaultdict(str)
    for c in choices:
        if c.value is not None:
            out[c.model, c.task, c.arm] = c.value
    return dict(out)
