"""The whole Partial-LoRA pipeline's wall time against dense LoRA's, measured back to back.

    .venv/bin/python benchmarks/pipeline_cost.py [--rounds 2] [--threads 1] [overrides ...]
    .venv/bin/python benchmarks/pipeline_cost.py experiment=offline-minilm task=rt-polarity

Each round runs `plr train` twice in fresh run dirs, dense LoRA (`adapter=lora`) and Partial-LoRA
(the default `adapter.sparsity=auto`), alternating which goes first, with the same overrides
and thread count. It prints each run's per-stage wall times (from results.json) and the ratio
Partial-LoRA / dense of the whole pipeline and of the retrain alone, per round and as a median.
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


def run(arm: str, overrides: list[str], run_dir: Path, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "partial_lora.cli", "train", "trainer.progress=false", *overrides, *ARMS[arm],
           f"run_dir={run_dir}"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{arm} run failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    results = json.loads((run_dir / "results.json").read_text())
    return {"process_s": wall, "stages": {k: v for k, v in results["wall_s"].items() if v is not None},
            "params": results["params"]["adapter"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("overrides", nargs="*", default=["experiment=offline-minilm", "task=rt-polarity"])
    args = p.parse_args()
    ratios, retrain = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            order = ("dense", "partial") if i % 2 == 0 else ("partial", "dense")
            got = {arm: run(arm, args.overrides, Path(tmp) / f"{arm}{i}", args.threads) for arm in order}
            for arm in order:
                g = got[arm]
                stages = " · ".join(f"{k} {v:.1f} s" for k, v in g["stages"].items())
                print(f"round {i} {arm:<8} process {g['process_s']:.1f} s ({stages}); adapter {g['params']:,}")
            ratios.append(got["partial"]["process_s"] / got["dense"]["process_s"])
            retrain.append(got["partial"]["stages"]["retrain"] / got["dense"]["stages"]["retrain"])
            print(f"round {i}: partial / dense = {ratios[-1]:.2f}x whole pipeline, {retrain[-1]:.2f}x retrain")
    print(f"median over {args.rounds} rounds: {statistics.median(ratios):.2f}x whole pipeline, "
          f"{statistics.median(retrain):.2f}x retrain ({' '.join(args.overrides)}, {args.threads} thread(s))")


if __name__ == "__main__":
    main()
