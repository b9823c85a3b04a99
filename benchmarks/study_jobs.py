"""Two runs at once against one at a time: the same MiniLM claims study with `--jobs 2` and `--jobs 1`.

    .venv/bin/python benchmarks/study_jobs.py [--cores 2] [--rounds 1] [--tasks bbc-news] [--seeds 0,1]
        [--arms lora,partial,uniform,lora-matched] [-- overrides of every run]
    .venv/bin/python benchmarks/study_jobs.py -- experiment=smoke model=tiny-bert trainer.max_steps=2   (a check)

Each pass runs one `plr study --suite minilm` (by default bbc-news x 2 seeds x 4 arms = 8 runs, with
Partial-LoRA's matched controls waiting for its run, as in a real study) into a fresh study folder,
with `--cores` cores: `--jobs 1` runs one run at a time with all of them, `--jobs 2` two at once with
cores // 2 threads each (the study splits the cores through OMP_NUM_THREADS). The passes run back to
back, `--jobs 2` first in odd rounds (so the first pass pays any one-off cost: dataset caches, page
cache), `--jobs 1` first in even ones. It prints each pass's wall time, the ratio --jobs 2 / --jobs 1
per round and their median against the target (at most 0.65), and the load average before and after
each pass: the ratio is only as good as the machine is quiet, so say what else ran.
A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET = 0.65


def one_pass(jobs: int, cores: int, args: argparse.Namespace, extra: list[str], out: Path) -> float:
    cmd = [sys.executable, "-m", "partial_lora.cli", "study", "--suite", "minilm", "--tasks", args.tasks, "--seeds",
           args.seeds, "--arms", args.arms, "--jobs", str(jobs), "--bootstrap", "200", "--out", str(out), "--", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(cores), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "disabled"}
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"the --jobs {jobs} study failed (exit {done.returncode}): "
                         f"{(done.stderr.strip().splitlines() or ['?'])[-1]}; its logs are in {out / 'logs'}")
    n = sum(1 for _ in (out / "runs").glob("*/*/*/seed*"))
    print(f"  --jobs {jobs}: {n} runs in {wall:7.1f} s   (load average {load:.2f} before, {os.getloadavg()[0]:.2f} "
          "after)", flush=True)
    return wall


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cores", type=int, default=2, help="the cores both passes use (default 2)")
    p.add_argument("--rounds", type=int, default=1, help="pairs of passes (default 1)")
    p.add_argument("--tasks", default="bbc-news", help="the MiniLM suite's tasks (default bbc-news: no fetch needed)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--arms", default="lora,partial,uniform,lora-matched")
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.cores < 2 or args.rounds < 1:
        p.error("--cores must be >= 2 (two runs at once need a core each) and --rounds >= 1")
    print(f"study_jobs: plr study --suite minilm --tasks {args.tasks} --seeds {args.seeds} --arms {args.arms} "
          f"{'-- ' + ' '.join(extra) if extra else ''}  on {args.cores} cores ({os.cpu_count()} on the machine)")
    ratios = []
    with tempfile.TemporaryDirectory(prefix="study-jobs-") as tmp:
        for i in range(args.rounds):
            print(f"round {i + 1}:")
            walls = {}
            for jobs in ((2, 1) if i % 2 == 0 else (1, 2)):
                walls[jobs] = one_pass(jobs, args.cores, args, extra, Path(tmp) / f"r{i}-j{jobs}")
            ratios.append(walls[2] / walls[1])
            print(f"  --jobs 2 / --jobs 1 = {ratios[-1]:.3f}")
    ratio = statistics.median(ratios)
    print(f"{'[met]' if ratio <= TARGET else '[NOT MET]'} --jobs 2 takes {ratio:.3f}x the time of --jobs 1 "
          f"(median of {len(ratios)} round(s); target <= {TARGET}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
