"""Regenerate the offline demo table: Partial-LoRA vs its controls on MiniLM + BBC News.

    .venv/bin/python experiments/bbc_news_table.py [--seeds 0 1 2] [--out outputs/bbc-table] [--extra k=v ...]

Runs, per seed (sequentially, each a `plr train` in its own run dir, rerun-safe):
  dense        dense LoRA r=8                                        adapter=lora
  partial      Partial-LoRA auto, subspace masks                     (the default)
  partial-rand Partial-LoRA auto, random masks, same allocation      from_run=partial, mask.method=random
  uniform-matched  uniform random rows/cols at partial's budget      adapter=uniform adapter.match.run=partial
  lora-matched dense LoRA at the rank closest to partial's budget    adapter=lora_matched adapter.match.run=partial
  peft-lora    PEFT's LoRA at r=8 (a check on plr's own LoRA)         adapter=peft_lora
and the same four Partial-LoRA rows again with adapter.allocation.relative_to=gain (probe reused),
then prints a markdown table of test accuracy (mean ± std) and adapter parameters.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

PLR = [sys.executable, "-m", "partial_lora.cli", "train", "trainer.progress=false"]


def run(run_dir: Path, *overrides: str) -> dict:
    res_file = run_dir / "results.json"
    if res_file.exists() and json.loads(res_file.read_text()).get("status") == "complete":
        return json.loads(res_file.read_text())
    cmd = [*PLR, f"run_dir={run_dir}", *overrides]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads(res_file.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("outputs/bbc-table"))
    ap.add_argument("--extra", nargs="*", default=[], help="overrides added to every run")
    args = ap.parse_args()
    rows: dict[str, list[dict]] = {}
    for seed in args.seeds:
        common = [f"seed={seed}", *args.extra]
        d = args.out / f"seed{seed}"
        dense = run(d / "dense", "adapter=lora", *common)
        partial = run(d / "partial", *common)
        per_rank = dense["params"]["adapter"] // int(dense["adapter"]["r"])
        gain_args = ("adapter.allocation.relative_to=gain", f"from_run={d / 'partial'}")
        gain = run(d / "gain", *gain_args, *common)
        gain_budget = gain["params"]["adapter"]
        gain_rank = max(1, round(gain_budget / per_rank))
        out = {
            "dense LoRA r=8": dense,
            "Partial-LoRA auto (subspace masks)": partial,
            "Partial-LoRA auto (random masks, same ratios)": run(
                d / "partial-rand", f"from_run={d / 'partial'}", "adapter.mask.method=random",
                "adapter.allocation.search_masks=subspace", *common),
            "uniform random rows/cols, same budget (adapter=uniform)": run(
                d / "uniform-matched", "adapter=uniform", f"adapter.match.run={d / 'partial'}", "label=uniform",
                *common),
            "dense LoRA, rank-matched (adapter=lora_matched)": run(
                d / "lora-matched", "adapter=lora_matched", f"adapter.match.run={d / 'partial'}", *common),
            "PEFT LoRA r=8 (adapter=peft_lora)": run(d / "peft-lora", "adapter=peft_lora", *common),
            "Partial-LoRA auto, relative_to=gain (subspace masks)": gain,
            "Partial-LoRA auto, relative_to=gain (random masks, same ratios)": run(
                d / "gain-rand", f"from_run={d / 'gain'}", "adapter.allocation.relative_to=gain",
                "adapter.mask.method=random", "adapter.allocation.search_masks=subspace", *common),
            "uniform random rows/cols, gain's budget": run(
                d / "gain-uniform", "adapter.allocation.allocator=uniform", "adapter.allocation.ratio=1",
                f"adapter.allocation.budget={gain_budget}", "adapter.mask.method=random", *common),
            "dense LoRA, rank-matched to gain": run(d / f"rank-matched-r{gain_rank}", "adapter=lora",
                                                    f"adapter.r={gain_rank}", *common),
        }
        for k, v in out.items():
            rows.setdefault(k, []).append(v)
    print("\n| method | test accuracy (mean ± std) | adapter params (mean) | ranks / seeds |")
    print("|---|---|---|---|")
    for k, runs in rows.items():
        accs = [r["metrics"]["test_accuracy"] for r in runs]
        params = [r["params"]["adapter"] for r in runs]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        ranks = sorted({int(r["adapter"]["r"]) for r in runs})
        print(f"| {k} | {statistics.mean(accs):.4f} ± {sd:.4f} | {statistics.mean(params):,.0f} | "
              f"r={','.join(map(str, ranks))} / {len(runs)} |")


if __name__ == "__main__":
    main()
