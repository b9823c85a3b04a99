"""The whole Partial-LoRA pipeline's wall time against dense LoRA's, measured back to back.

    .venv/bin/python benchmarks/pipeline_cost.py [--rounds 2] [--threads 1] [overrides ...]
    .venv/bin/python benchmarks/pipeline_cost.py experiment=offline-minilm task=rt-polarity
    .venv/bin/python benchmarks/pipeline_cost.py --rounds 1 --threads 2 --variant adapter.probe.epochs=5

Each round runs `plr train` twice in fresh run dirs, dense LoRA (`adapter=lora`) and Partial-LoRA
(the default `adapter.sparsity=auto`), alternating which goes first, with the same overrides
and thread count. `--variant KEY=VALUE` (repeatable) adds a third run per round: Partial-LoRA
with those overrides too (settings that change its cost, e.g. the probe's epochs). It prints each
run's per-stage wall times (from results.json) and the ratio of each Partial-LoRA run to dense
LoRA, of the whole pipeline and of the retrain alone, per round and as a median.
A benchmark, not a test: the ratio is only as good as the machine is quiet, so say what else ran.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARMS = {"dense": ["adapter=lora"], "partial": []}


def run(arm: str, arm_overrides: list[str], overrides: list[str], run_dir: Path, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "partial_lora.cli", "train", "trainer.progress=false", *overrides, *arm_overrides,
           f"run_dir={run_dir}"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{arm} run failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    results = json.loads((run_dir / "results.json").read_text())
    return {"process_s": wall, "stages": {k: v for k, v in results["wall_s"].items() if v is not None},
            "params": results["params"]["adapter"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE",
                   help="also time Partial-LoRA with this override (repeat for several)")
    p.add_argument("overrides", nargs="*", default=["experiment=offline-minilm", "task=rt-polarity"])
    args = p.parse_args(argv)
    arms = dict(ARMS)
    if args.variant:
        arms["variant"] = list(args.variant)
    ratios: dict[str, list[float]] = {a: [] for a in arms if a != "dense"}
    retrain: dict[str, list[float]] = {a: [] for a in ratios}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            order = list(arms) if i % 2 == 0 else list(reversed(arms))
            got = {arm: run(arm, arms[arm], args.overrides, Path(tmp) / f"{arm}{i}", args.threads) for arm in order}
            for arm in order:
                g = got[arm]
                stages = " · ".join(f"{k} {v:.1f} s" for k, v in g["stages"].items())
                print(f"round {i} {arm:<8} process {g['process_s']:.1f} s ({stages}); adapter {g['params']:,}")
            for arm in ratios:
                ratios[arm].append(got[arm]["process_s"] / got["dense"]["process_s"])
                retrain[arm].append(got[arm]["stages"]["retrain"] / got["dense"]["stages"]["retrain"])
                print(f"round {i}: {arm} / dense = {ratios[arm][-1]:.2f}x whole pipeline, {retrain[arm][-1]:.2f}x "
                      "retrain")
    for arm in ratios:
        what = f"{arm} ({' '.join(arms[arm])})" if arms[arm] else arm
        print(f"median over {args.rounds} rounds: {what} / dense = {statistics.median(ratios[arm]):.2f}x whole "
              f"pipeline, {statistics.median(retrain[arm]):.2f}x retrain ({' '.join(args.overrides)}, "
              f"{args.threads} thread(s))")


if __name__ == "__main__":
    main()
