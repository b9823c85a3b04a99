"""Training-step time and memory: Partial-LoRA vs dense LoRA vs PEFT LoRA vs the no-adapter floor.

One process, one random backbone per size (no download). Every variant is a deep copy of it that
shares its frozen weights, and all variants see the same batch. Variants:

- `floor`: the frozen backbone with no adapter weights; only the head trains, but the outputs of
  the target layers are made to require grad, so backward runs down to the first adapted layer,
  exactly as far as any adapter on those layers needs it (see `make_floor`).
- `PEFT LoRA`: `peft.get_peft_model` with the same targets, rank and alpha, dropout 0.
- `dense LoRA (ours)`: `partial_lora.adapter.inject.inject_lora` keeping every row and column (ρ = 1).
- `Partial-LoRA ρ=…`: the same layer with ρ·d_out random rows and ρ·d_in random columns kept in
  every adapted layer (fixed seed, `torch.randperm`).
- `Partial-LoRA ρ=…, shared input`: the same, but the layers that read one input tensor (q and v)
  keep one random column set per input group and gather it once (`adapter.mask.shared_input`).

A step is forward + loss + backward + AdamW step + zero_grad over the trainable parameters only
(adapter + classification head). The variants are timed *interleaved*: after `--warmup` steps
each, every round times one step of every variant (the order rotates each round), so a change in
machine load during the run hits all variants alike. Times are the median over `--steps` rounds.
Memory is measured on one extra, untimed step per variant:

- CUDA: `max_memory_allocated` during the step minus `memory_allocated` just before it: the
  step's working set (activations kept for backward, gradients, optimizer temporaries). The
  weights, the batch and the persistent AdamW state exist before the step and are not in it.
- CPU (and as an extra column on CUDA): the bytes of tensors saved for backward, counted with
  `torch.autograd.graph.saved_tensors_hooks` over unique storages that did not exist before the
  step (frozen weights, buffers and the batch are excluded), plus the AdamW state. This is where
  Partial-LoRA keeps only the gathered input columns x[:, C] instead of the full input.

After the tables, a summary prints the issue's targets next to the measured ratios (met / not
met), and the allocation stage's share of a finished offline demo run's wall time, read from its
results.json. Nothing here asserts a timing: this is a measurement, not a test.

The parts live in `benchmarks/bench/`, one concept a module: `sizes` (the backbones and their
batches), `variants` (floor, PEFT LoRA, ours), `measure` (the step, timing, memory), `report`
(tables, targets, the demo's allocation share, the machine line). This file is the command line
and re-exports their public names.

    python benchmarks/step_time.py --sizes tiny --steps 3 --warmup 1          # smoke run, seconds
    python benchmarks/step_time.py --sizes vit-b deberta-v3-base --device cpu --threads 2 --steps 5 --warmup 2
    python benchmarks/step_time.py --sizes vit-b deberta-v3-base --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import gc
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from bench.measure import MiB, Result, Stepper, adapter_limit, measure, measure_interleaved

# DEMO_RUNS is read by bench.report's functions: to point them elsewhere, patch bench.report.DEMO_RUNS.
from bench.report import (
    ALLOCATION_SHARE,
    DEMO_RUNS,
    DENSE_VS_PEFT,
    ROOT,
    SPARSE_EXTRA_MEMORY,
    SPARSE_EXTRA_MEMORY_GOAL,
    SPARSE_TIME_VS_FLOOR,
    TARGET_DENSITY,
    Target,
    allocation_share,
    demo_target,
    find_demo_run,
    machine,
    memory_note,
    ratio_table,
    summary,
    table,
    targets,
)
from bench.sizes import ALIASES, DEBERTA_V3_BASE, SIZES, Size, build_backbone, make_batch
from bench.variants import Variant, input_groups, make_floor, make_ours, make_peft, random_keep, shared_keep

__all__ = [
    # bench.sizes
    "ALIASES", "DEBERTA_V3_BASE", "SIZES", "Size", "build_backbone", "make_batch",
    # bench.variants
    "Variant", "input_groups", "make_floor", "make_ours", "make_peft", "random_keep", "shared_keep",
    # bench.measure
    "MiB", "Result", "Stepper", "adapter_limit", "measure", "measure_interleaved",
    # bench.report
    "ALLOCATION_SHARE", "DEMO_RUNS", "DENSE_VS_PEFT", "ROOT", "SPARSE_EXTRA_MEMORY", "SPARSE_EXTRA_MEMORY_GOAL",
    "SPARSE_TIME_VS_FLOOR", "TARGET_DENSITY", "Target", "allocation_share", "demo_target", "find_demo_run",
    "machine", "memory_note", "ratio_table", "summary", "table", "targets",
    # this file
    "SizeRun", "main", "parse", "quiet_warnings", "report_size", "run_size",
]


@dataclass
class SizeRun:
    size: Size
    results: list[Result]
    header: str
    layers: dict[str, int]
    head_params: int


def run_size(size: Size, device: torch.device, amp: torch.dtype | None, *, steps: int, warmup: int,
             densities: Sequence[float] = (1.0, 0.5, 0.25, 0.125), shared: Sequence[float] = (TARGET_DENSITY,),
             r: int = 8, alpha: float = 16.0,
             batch: int | None = None, seq_len: int | None = None, peft: bool = True,
             verbose: bool = False, echo: Callable[[str], None] = print) -> SizeRun:
    """Build every variant of one size, time them interleaved, and measure memory."""
    torch.manual_seed(0)
    backbone = build_backbone(size).to(device)
    batch_n, seq_len = batch or size.batch, seq_len or size.seq_len
    data = make_batch(size, backbone, batch_n, seq_len, device)
    dtype = "bf16 autocast" if amp is not None else "fp32"
    shape = f"batch {batch_n}" + (f" × seq {seq_len}" if size.family == "hf-text" else
                                  f", {backbone.config.image_size}² images")
    header = (f"### {size.name}: {sum(p.numel() for p in backbone.parameters()) / 1e6:.1f}M params, {shape}, "
              f"r={r}, alpha={alpha:g}, targets {list(size.targets)}, {dtype}, {device}, "
              f"{steps} interleaved rounds after {warmup} warmup steps")
    echo(f"\n{header}\n")

    makers: list[tuple[Callable[..., Variant], tuple]] = [(make_floor, ())]
    if peft:
        makers.append((make_peft, (r, alpha)))
    makers += [(make_ours, (r, alpha, d)) for d in densities]
    makers += [(make_ours, (r, alpha, d, True)) for d in shared if d < 1]
    variants = []
    for make, extra in makers:
        torch.manual_seed(0)  # the same adapter init draws for every variant
        variants.append(make(backbone, size, *extra))
    layers = {v.label: v.layers for v in variants if v.layers}
    results = measure_interleaved([v.model for v in variants], data, device, amp, steps, warmup)
    for v, res in zip(variants, results, strict=True):
        res.label, res.adapter_params, res.kind, res.density = v.label, v.adapter_params, v.kind, v.density
        res.shared = v.shared
        if verbose:
            echo(f"  {v.label}: steps ms {[round(1e3 * t, 1) for t in res.times]}, last loss {res.loss:.4f}")
    head_params = sum(p.numel() for n in size.head_modules for p in backbone.get_submodule(n).parameters())
    del variants, backbone, data
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return SizeRun(size, results, header, layers, head_params)


def report_size(run: SizeRun, device: torch.device, echo: Callable[[str], None] = print) -> None:
    if len(set(run.layers.values())) > 1:  # PEFT and ours must adapt the same layers
        echo(f"WARNING: adapted layer counts differ between variants: {run.layers}")
    echo(table(run.size, run.results, device))
    echo(f"\n(adapted layers: {next(iter(run.layers.values()), 0)}; the head also trains in every variant: "
         f"{run.head_params:,} params)\n")
    echo(ratio_table(run.results, device))


def parse(argv: Iterable[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["vit-b", "deberta-v3-base"], choices=[*SIZES, *ALIASES])
    p.add_argument("--steps", type=int, default=20, help="timed rounds (one step of every variant each; median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant before timing")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: ViT 4, BERT/DeBERTa 8)")
    p.add_argument("--seq-len", type=int, default=None, help="text sequence length (default: 128; tiny 64)")
    p.add_argument("--r", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale alpha / r)")
    p.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.125],
                   help="Partial-LoRA keep ratios ρ on rows and cols; 1 = dense LoRA (ours)")
    p.add_argument("--shared-densities", type=float, nargs="*", default=[0.125],
                   help="keep ratios of Partial-LoRA with a shared input (adapter.mask.shared_input: one random "
                        "column set and one gather per input group); none: leave the variant out")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = torch.autocast (CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--demo-run", default=None, metavar="DIR",
                   help="a finished `make demo` run dir (or its results.json) for the allocation share "
                        "(default: the newest outputs/bbc-news-minilm-partial/*/results.json)")
    p.add_argument("--verbose", action="store_true", help="print every step time")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be ≥ 1 and --warmup ≥ 0")
    if any(not 0 < d <= 1 for d in args.densities):
        p.error("--densities must lie in (0, 1]")
    if any(not 0 < d < 1 for d in args.shared_densities):
        p.error("--shared-densities must lie in (0, 1)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for but CUDA is not available")
    return args


def quiet_warnings() -> None:
    # PEFT 0.21 calls a transformers 5 property that warns it is renamed; noise for this report.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def main(argv: Iterable[str] | None = None) -> int:
    args = parse(argv)
    quiet_warnings()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = torch.bfloat16 if args.dtype == "bf16" else None
    sizes = list(dict.fromkeys(s for name in args.sizes for s in ALIASES.get(name, [name])))
    print(memory_note(device), flush=True)
    found: list[Target] = []
    for name in sizes:
        run = run_size(SIZES[name], device, amp, steps=args.steps, warmup=args.warmup, densities=args.densities,
                       shared=args.shared_densities, r=args.r, alpha=args.alpha, batch=args.batch,
                       seq_len=args.seq_len, verbose=args.verbose, echo=lambda s: print(s, flush=True))
        report_size(run, device, echo=lambda s: print(s, flush=True))
        found += targets(run.size, run.results, device)
    demo_lines, demo = demo_target(args.demo_run)
    print(summary([*found, demo], device, demo_lines))
    print("\n" + machine(device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
