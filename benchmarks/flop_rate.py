"""How close a run's forward passes and training steps come to this machine's matrix-multiply peak.

    .venv/bin/python benchmarks/flop_rate.py [--threads 2] [--batch 64] [--train-batch 32] [overrides ...]
    .venv/bin/python benchmarks/flop_rate.py --threads 1 experiment=offline-minilm task=rt-polarity

Builds the model and data of one `plr train` configuration (the offline demo by default) with
plr's own `working_set.build.setup` (the adapter dense, as the probe trains it and as the allocation
search scores it), takes the first examples of the training split, and measures three things back
to back in this one process:

- `matmul peak`: one square matrix product (`--peak-n`, default 2048) on the run's device, in the
  dtype the run computes in (float32 on CPU, bf16 under CUDA autocast), this machine's practical roof
  at this thread count;
- `eval forward`: a no-grad forward pass in eval mode over `--batch` examples, what the probe's
  per-epoch validation, the allocation search and the evaluate stage run;
- `train step`: forward, loss, backward and an AdamW step over the trainable parameters on
  `--train-batch` examples in train mode, what the probe and the retrain run.

For each: the FLOPs (`torch.utils.flop_counter`: the matrix products, and the attention kernels it
has formulas for; this torch's fused CPU attention is not among them, so on CPU the rates leave the
attention's FLOPs out and are if anything low), the median wall time over `--repeats` timed calls
after one warm-up, the FLOP rate and its share of the peak, the rate of the matrix products alone
(their FLOPs over their share of the profiled time), and the ops with the most self time
(`torch.profiler`, as shares of the profiled time).

What it answers (issue 18, item 3): the allocation search and the probe's validation are forward
passes over a fixed few-shot set. When those run near the roof, no change that keeps the same
computation can make them much cheaper; only computing less (fewer passes, fewer examples) can, and
that changes what the search finds. A benchmark, not a test: rates are only as good as the machine
is quiet, so say what else ran.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Rate:
    """One measured part: its FLOPs per call, median seconds per call and top ops by self time."""

    name: str
    batch: int | None
    flops: float
    seconds: float
    top: list[tuple[str, float]]
    matmul_flops: float = 0.0  # the FLOPs of the matrix products (mm, addmm, bmm) alone
    matmul_share: float = 0.0  # their share of the profiled self time

    def gflops_per_s(self) -> float:
        return self.flops / self.seconds / 1e9

    def matmul_gflops_per_s(self) -> float | None:
        """The matrix products' own rate: their FLOPs over their share of the median time."""
        if not self.matmul_flops or not self.matmul_share:
            return None
        return self.matmul_flops / (self.seconds * self.matmul_share) / 1e9


MATMULS = ("mm", "addmm", "bmm")


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], device: Any, repeats: int) -> float:
    """Median wall time of `fn` over `repeats` calls, after one untimed warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def count_flops(fn: Callable[[], Any]) -> tuple[float, dict[str, float]]:
    """(the FLOPs of one call, its FLOPs by op name: `mm`, `addmm`, ...)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    by_op = {str(op).split(".")[-1]: float(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return float(counter.get_total_flops()), by_op


def op_shares(fn: Callable[[], Any], device: Any) -> list[tuple[str, float]]:
    """Every op's share of the self time of one profiled call, the largest first."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # the profiler's start/stop lines on stderr (read when it starts)
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    events = prof.key_averages()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events) or 1.0
    ranked = sorted(events, key=lambda e: -getattr(e, attr))
    return [(e.key, getattr(e, attr) / total) for e in ranked]


def measure(name: str, batch: int | None, fn: Callable[[], Any], device: Any, repeats: int, n_top: int) -> Rate:
    flops, by_op = count_flops(fn)
    seconds = median_seconds(fn, device, repeats)
    shares = op_shares(fn, device)
    matmul_share = sum(v for k, v in shares if k.removeprefix("aten::") in MATMULS)
    return Rate(name, batch, flops, seconds, shares[:n_top], sum(by_op.get(k, 0.0) for k in MATMULS), matmul_share)


def peak(device: Any, n: int, repeats: int, dtype: Any = None) -> Rate:
    """A square matrix product in the dtype the run computes in (float32, or its autocast dtype)."""
    import torch

    a, b = (torch.randn(n, n, device=device, dtype=dtype or torch.float32) for _ in range(2))
    flops, _ = count_flops(lambda: a @ b)
    return Rate(f"matmul peak ({n}x{n})", None, flops, median_seconds(lambda: a @ b, device, repeats), [])


def report(rates: list[Rate], roof: Rate, title: str) -> str:
    lines = [title, f"  {'part':<24} {'batch':>5} {'GFLOP':>8} {'ms':>9} {'GFLOP/s':>8} {'of peak':>8}"]
    for r in [roof, *rates]:
        share = r.gflops_per_s() / roof.gflops_per_s()
        lines.append(f"  {r.name:<24} {r.batch or '':>5} {r.flops / 1e9:>8.1f} {r.seconds * 1e3:>9.1f} "
                     f"{r.gflops_per_s():>8.0f} {share:>8.0%}")
    for r in rates:
        mm = r.matmul_gflops_per_s()
        if mm is not None:
            lines.append(f"  matrix products of the {r.name}: {r.matmul_flops / r.flops:.0%} of its FLOPs in "
                         f"{r.matmul_share:.0%} of its time, {mm:.0f} GFLOP/s = {mm / roof.gflops_per_s():.0%} of peak")
    for r in rates:
        lines.append(f"  top ops, {r.name}: " + ", ".join(f"{k.removeprefix('aten::')} {v:.0%}" for k, v in r.top))
    return "\n".join(lines)


def _positive(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def main(argv: list[str] | None = None) -> list[Rate]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=_positive, default=2)
    p.add_argument("--batch", type=_positive, default=64, help="examples in the eval forward (the demo's eval batch)")
    p.add_argument("--train-batch", type=_positive, default=32, help="examples in the train step (the demo's batch)")
    p.add_argument("--repeats", type=_positive, default=5, help="timed calls per part (the median is reported)")
    p.add_argument("--peak-n", type=_positive, default=2048, help="size of the square matrices of the peak")
    p.add_argument("--top", type=_positive, default=5, help="ops listed per part")
    p.add_argument("overrides", nargs="*", default=[])
    args = p.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    import datasets
    import torch
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException

    from partial_lora.config import validate
    from partial_lora.errors import PlrError, first_line
    from partial_lora.training.runtime import autocast_dtype, set_seed, to_device
    from partial_lora.working_set.build import setup
    from partial_lora.working_set.loaders import loader

    torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    try:
        with initialize_config_module("partial_lora.conf", version_base="1.3"):
            cfg = compose("config", overrides=["trainer.progress=false", *args.overrides])
        spec = validate(cfg)
        set_seed(spec.seed)
        s = setup(spec)
    except (PlrError, HydraException) as e:  # a bad override or value, a missing fetch: one line
        raise SystemExit(f"flop_rate: {first_line(e)}") from None
    model, device = s.built.model.to(s.device), s.device
    n = min(len(s.data.train), max(args.batch, args.train_batch))
    examples = s.data.train.select(range(n))
    batch = to_device(next(iter(loader(s, examples, spec.train, train=False))), device)  # eval_batch_size rows
    rows = len(next(v for v in batch.values() if isinstance(v, torch.Tensor)))
    eval_batch = {k: v[:args.batch] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    train_batch = {k: v[:args.train_batch] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if rows < max(args.batch, args.train_batch):
        print(f"(trainer.eval_batch_size or the split gives {rows} examples per batch: the parts use at most that)")
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.train.lr)
    dtype = autocast_dtype(spec.train,
                           device)  # as plr computes: bf16 autocast on CUDA, fp32 on CPU (trainer.precision)

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)

    def forward() -> None:
        model.eval()
        with torch.inference_mode(), autocast():
            model(eval_batch)

    def step() -> None:
        model.train()
        with autocast():
            loss = model.loss(model(train_batch), train_batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    roof = peak(device, args.peak_n, args.repeats, dtype)
    rates = [measure("eval forward", min(rows, args.batch), forward, device, args.repeats, args.top),
             measure("train step", min(rows, args.train_batch), step, device, args.repeats, args.top)]
    title = (f"flop rate  {spec.task} · {spec.model.name} · {device.type} · {dtype or torch.float32} · "
             f"{torch.get_num_threads()} thread(s) · "
             f"{' '.join(args.overrides) or 'the offline demo'}")
    print(report(rates, roof, title))
    return rates


if __name__ == "__main__":
    main()
