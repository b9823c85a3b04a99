"""The allocate stage with and without block replay, on a finished run: same allocation, less time.

    python benchmarks/allocation_replay.py <run dir with a finished probe> [--rounds 2]

Copies the run's config and probe into temporary run dirs and runs the allocate stage
alternately with `adapter.allocation.replay_mb=0` (every evaluation computed in full) and the
run's own setting, `--rounds` times each, interleaved so that a change in machine load hits both
alike. Prints the median search time of each, their ratio, the share of block forward passes
replayed, and whether the two allocations are identical (they must be: replay only skips work
whose result it already has). A measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from partial_lora import artifacts, config
from partial_lora.stages import allocate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    src = args.run_dir
    if not artifacts.is_done(src, "probe") or not (src / artifacts.HYDRA_CONFIG).is_file():
        print(f"{src} has no finished probe stage and .hydra/config.yaml; run `make demo` first", file=sys.stderr)
        return 2
    base = OmegaConf.load(src / artifacts.HYDRA_CONFIG)
    times: dict[str, list[float]] = {"full": [], "replay": []}
    found: dict[str, dict] = {}
    shared = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for name in (("full", "replay") if i % 2 == 0 else ("replay", "full")):
                run_dir = Path(tmp) / f"{name}{i}"
                shutil.copytree(artifacts.stage_dir(src, "probe"), artifacts.stage_dir(run_dir, "probe"))
                cfg = base.copy()
                if name == "full":
                    cfg.adapter.allocation.replay_mb = 0
                out = allocate.run(config.validate(cfg), run_dir)
                times[name].append(out["search_wall_s"])
                alloc = json.loads((artifacts.stage_dir(run_dir, "allocate") / artifacts.ALLOCATION).read_text())
                found[name] = {la["name"]: (la["ratio"], la["tried"]) for la in alloc["layers"]}
                if name == "replay":
                    shared = out["replayed_share"] or 0.0
    full, replay = statistics.median(times["full"]), statistics.median(times["replay"])
    print(f"allocate search on {src} ({args.rounds} rounds each, interleaved):")
    print(f"  full passes      {full:7.1f} s  (median of {', '.join(f'{t:.1f}' for t in times['full'])})")
    print(f"  block replay     {replay:7.1f} s  (median of {', '.join(f'{t:.1f}' for t in times['replay'])});"
          f" {100 * shared:.0f}% of block passes replayed")
    print(f"  ratio replay/full: {replay / full:.2f}x")
    same = found["full"] == found["replay"]
    print(f"  allocations (ratios and every accuracy tried) identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
