"""What the data's identity costs: the BLAKE2b digest of every data file a load reads (`data.identity`).

    python benchmarks/data_fingerprint.py [--mb 128] [--rounds 3]

1. BBC News (the largest task that ships offline, 2,225 files): the digest of its files against a
   cold load of the task (reading the files, dropping duplicates, splitting, checks), each the
   median of `--rounds` runs in this process, interleaved.
2. A generated CSV of `--mb` MB (text,label rows) in a temporary folder: the digest's throughput
   against `datasets`' preparation of the same file (CSV to Arrow, what a first load pays), in a
   scratch cache. The digest runs once per load and file; a run loads its task once
   (`working_set.data.data_loaded_once`). A measurement, not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402

from partial_lora.data import (
    identity,  # noqa: E402
    offline,  # noqa: E402
)
from partial_lora.data.base import TaskSpec  # noqa: E402
from partial_lora.data.registry import load_task  # noqa: E402


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bbc(rounds: int) -> None:
    root = offline._bbc_root()
    files = sorted(root.rglob("*.txt"))
    spec = TaskSpec(name="bbc-news", loader="bbc-news")
    digest, load = [], []
    for _ in range(rounds):
        digest.append(_timed(lambda: [identity.digest_file(f) for f in files]))
        offline._bbc_corpus.cache_clear()  # a cold load reads every file again
        load.append(_timed(lambda: load_task(spec)))
    size = sum(f.stat().st_size for f in files) / 2**20
    d, lo = statistics.median(digest), statistics.median(load)
    print(f"bbc-news: {len(files):,} files, {size:.1f} MiB; digest {d * 1e3:.1f} ms, cold task load "
          f"{lo * 1e3:.0f} ms (the digest is {100 * d / lo:.1f}% of a load; the load includes it)")


def big_csv(mb: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.csv"
        row = "the quick brown fox jumps over the lazy dog " * 4
        with open(path, "w") as f:
            f.write("text,label\n")
            i = 0
            while f.tell() < mb << 20:
                f.write(f"{row}{i},{i % 5}\n")
                i += 1
        size = path.stat().st_size / 2**20
        digest = statistics.median(_timed(lambda: identity.digest_file(path)) for _ in range(rounds))
        cache = Path(tmp) / "cache"
        prepare = _timed(lambda: datasets.load_dataset_builder("csv", data_files=[str(path)], cache_dir=str(cache))
                         .download_and_prepare())
        print(f"csv: {size:.0f} MiB, {i:,} rows; digest {digest:.2f} s ({size / digest:.0f} MiB/s), datasets' "
              f"first preparation {prepare:.2f} s (the digest is {100 * digest / prepare:.1f}% of it)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    datasets.disable_progress_bars()
    bbc(args.rounds)
    big_csv(args.mb, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
