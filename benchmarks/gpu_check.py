"""plr gpu-check: the CUDA path end to end on one GPU, in one command of a few minutes.

    make gpu-check                                  # = .venv/bin/python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --out outputs/gpu-check.txt

What it does, in order (each part is timed; a failing part is reported and the next one runs):

1. the device: name, compute capability, memory, torch / CUDA / cuDNN versions, bf16 support,
   and a bf16 matmul checked against fp32;
2. `python -m partial_lora.cli train experiment=smoke trainer.device=cuda trainer.precision=bf16
   run_dir=<tmp>` for Partial-LoRA (the default adapter) and for `adapter=lora`, and a causal-LM
   multi-task run (`model=tiny-llama task=multi` over generated ARC-e and BoolQ copies): exit
   code 0, results.json status complete, the run's env.json saw CUDA; prints the test metric and
   the wall time of every stage;
3. the ViT-B/16 step-time benchmark in bf16 (benchmarks/step_time.py's functions): floor, PEFT
   LoRA, dense LoRA (ours), Partial-LoRA ρ=0.125 (per layer and with a shared input), as time and
   memory ratios with the issue's targets (met / not met; a benchmark, never a failure).

Everything printed also goes to `--out` (default outputs/gpu-check.txt), line by line, so a run
cut short still leaves its file. Exit status: 0 when parts 1-3 ran (whatever the ratios), 1 when
a check failed, 2 with one line `plr: gpu-check: no CUDA device ...` when there is no GPU.

`--cpu` runs the same steps on the CPU in fp32 with the tiny ViT (no GPU check: for testing this
script on a machine without one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # step_time, also when imported from elsewhere

PREFIX = "plr: gpu-check:"


class Tee:
    """print() to stdout and to a file, flushed line by line."""

    def __init__(self, path: Path | None) -> None:
        self.file: TextIO | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = path.open("w", encoding="utf-8")

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        if self.file is not None:
            self.file.write(line + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def no_cuda_reason() -> str | None:
    """None when a CUDA device is usable, else why not (one line)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA initialization: ..." warnings; the line below says it
        import torch

        available = torch.cuda.is_available() and torch.cuda.device_count() > 0
    if available:
        return None
    build = f"torch {torch.__version__}, built for CUDA {torch.version.cuda}" if torch.version.cuda else \
        f"torch {torch.__version__}, a CPU-only build"
    hidden = " with CUDA_VISIBLE_DEVICES set to ''" if os.environ.get("CUDA_VISIBLE_DEVICES") == "" else ""
    return (f"{PREFIX} no CUDA device (torch.cuda.is_available() is False{hidden}; {build}); "
            "run it on a machine with an NVIDIA GPU and a CUDA build of torch")


# --------------------------------------------------------------------------- 1. the device


def device_info(echo: Callable[[str], None], device: str) -> bool:
    import torch

    echo("## 1. device")
    echo(f"python {platform.python_version()}, torch {torch.__version__}, CUDA (torch build) {torch.version.cuda}, "
         f"cuDNN {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}")
    try:
        import peft
        import transformers

        echo(f"transformers {transformers.__version__}, peft {peft.__version__}")
    except ImportError as e:
        echo(f"[FAIL] {e}")
        return False
    if device == "cpu":
        echo(f"--cpu: no GPU checked; CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
        return True
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip()
            echo(f"nvidia-smi: {out or '(no output)'}")
        except (OSError, subprocess.TimeoutExpired) as e:
            echo(f"nvidia-smi: {e}")
    n = torch.cuda.device_count()
    for i in range(n):
        p = torch.cuda.get_device_properties(i)
        echo(f"cuda:{i} {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
             f"{p.multi_processor_count} SMs")
    bf16 = torch.cuda.is_bf16_supported()
    echo(f"bf16 supported: {bf16}")
    # A bf16 GEMM against fp32: the kernels the trainer's autocast uses run and are sane.
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(1024, 1024, device="cuda", generator=g)
    b = torch.randn(1024, 1024, device="cuda", generator=g)
    ref = a @ b
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = a @ b
    err = float((low.float() - ref).norm() / ref.norm())
    ok = bool(low.dtype == torch.bfloat16 and torch.isfinite(low).all() and err < 2e-2)
    echo(f"bf16 autocast matmul 1024²: dtype {low.dtype}, relative error vs fp32 {err:.2e} "
         f"[{'ok' if ok else 'FAIL'}]")
    return ok and bf16


# --------------------------------------------------------------------------- 2. plr train on the device


def train_check(echo: Callable[[str], None], label: str, overrides: Sequence[str], run_dir: Path, device: str,
                precision: str, timeout: int) -> bool:
    """`plr train experiment=smoke <overrides>` in a subprocess; True when it finished complete on `device`."""
    cmd = [sys.executable, "-m", "partial_lora.cli", "train", "experiment=smoke", f"trainer.device={device}",
           f"trainer.precision={precision}", f"run_dir={run_dir}", *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for k, v in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("WANDB_MODE", "disabled"),
                 ("TOKENIZERS_PARALLELISM", "false")):
        env.setdefault(k, v)
    echo(f"$ {' '.join(['python', *cmd[1:]])}")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        echo(f"  [FAIL] {label}: still running after {timeout} s (--train-timeout); killed")
        _tail(echo, (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""))
        return False
    wall = time.perf_counter() - t0
    problems = []
    if proc.returncode != 0:
        problems.append(f"exit code {proc.returncode}")
    results: dict = {}
    try:
        results = json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError) as e:
        problems.append(f"no readable results.json ({e.__class__.__name__})")
    if results and results.get("status") != "complete":
        problems.append(f"results.json status {results.get('status')!r}, not 'complete'")
    if device == "cuda":
        try:
            seen = json.loads((run_dir / "env.json").read_text())
            if not seen.get("cuda_available"):
                problems.append("the run's env.json says CUDA was not available")
        except (OSError, ValueError):
            problems.append("no readable env.json")
    if problems:
        echo(f"  [FAIL] {label}: {'; '.join(problems)} (process {wall:.1f} s)")
        _tail(echo, proc.stderr + proc.stdout)
        return False
    main = results.get("main_metric", "accuracy")
    test = results.get("metrics", {}).get(f"test_{main}")
    walls = {k: v for k, v in (results.get("wall_s") or {}).items() if v is not None}
    stages = " · ".join(f"{k} {v:.1f} s" for k, v in walls.items())
    params = results.get("params") or {}
    echo(f"  [ok] {label}: exit 0, status complete, test {main} "
         f"{'-' if test is None else f'{test:.4f}'} (tiny random model: chance level is expected), "
         f"adapter params {params.get('adapter')}")
    echo(f"       wall time: {stages} · stages {sum(walls.values()):.1f} s · process {wall:.1f} s")
    return True


def llm_overrides(tmp: Path) -> list[str]:
    """The causal-LM run's overrides, with generated ARC-e and BoolQ copies (tests/fixtures.py) in `tmp`."""
    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures import write_commonsense

    paths = [f"+task.members.{t}.path={write_commonsense(tmp / 'data' / t, t)}" for t in ("arc-e", "boolq")]
    return ["model=tiny-llama", "task=multi", "task.names=[arc-e,boolq]", *paths]


def _tail(echo: Callable[[str], None], text: str, n: int = 15) -> None:
    for line in text.strip().splitlines()[-n:]:
        echo(f"       | {line}")


# --------------------------------------------------------------------------- 3. step time


def bench_check(echo: Callable[[str], None], device_name: str, size_name: str, batches: Sequence[int],
                steps: int, warmup: int, dtype: str) -> bool:
    import step_time as st
    import torch

    st.quiet_warnings()
    device = torch.device(device_name)
    amp = torch.bfloat16 if dtype == "bf16" else None
    size = st.SIZES[size_name]
    echo(st.memory_note(device))
    for batch in batches:
        run = st.run_size(size, device, amp, steps=steps, warmup=warmup, densities=(1.0, st.TARGET_DENSITY),
                          batch=batch, echo=echo)
        st.report_size(run, device, echo=echo)
        echo("")
        for t in st.targets(run.size, run.results, device):
            echo(t.line().replace(f"{size.name}:", f"{size.name} batch {batch}:", 1))
    echo("\n" + st.machine(device))
    return True


# --------------------------------------------------------------------------- main


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=None,
                   help="also write the output here ('' for none; default outputs/gpu-check.txt, "
                        "with --cpu outputs/gpu-check-cpu.txt)")
    p.add_argument("--steps", type=int, default=30, help="timed rounds of the step-time benchmark")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per variant before timing")
    p.add_argument("--batch", type=int, nargs="+", default=[64, 8],
                   help="ViT-B batch sizes to benchmark (64: the VTAB recipe's; 8: a small batch)")
    p.add_argument("--train-timeout", type=int, default=240, help="seconds allowed for each plr train run")
    p.add_argument("--skip-train", action="store_true", help="skip part 2 (plr train on the device)")
    p.add_argument("--skip-bench", action="store_true", help="skip part 3 (step time)")
    p.add_argument("--cpu", action="store_true",
                   help="test this script without a GPU: CPU, fp32, the tiny ViT (checks no GPU)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = str(ROOT / "outputs" / ("gpu-check-cpu.txt" if args.cpu else "gpu-check.txt"))
    if args.steps < 1 or args.warmup < 0 or any(b < 1 for b in args.batch):
        p.error("--steps and --batch must be ≥ 1, --warmup ≥ 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if not args.cpu:
        reason = no_cuda_reason()
        if reason:
            print(reason, file=sys.stderr)
            return 2
    device, precision = ("cpu", "fp32") if args.cpu else ("cuda", "bf16")
    size = "tiny-vit" if args.cpu else "vit-b"
    echo = Tee(Path(args.out) if args.out else None)
    t_all = time.perf_counter()
    failed: list[str] = []

    def part(name: str, fn: Callable[[], bool]) -> None:
        t0 = time.perf_counter()
        try:
            ok = fn()
        except Exception:  # report and go on: one prepared command should say as much as it can
            echo(f"[FAIL] {name}: an exception")
            _tail(echo, traceback.format_exc(), n=25)
            ok = False
        echo(f"({name}: {time.perf_counter() - t0:.1f} s)\n")
        if not ok:
            failed.append(name)

    try:
        echo(f"plr gpu-check · {time.strftime('%Y-%m-%d %H:%M:%S')} · {platform.node()} · "
             f"{'CPU test run (--cpu)' if args.cpu else 'CUDA'}\n")
        part("device", lambda: device_info(echo, device))
        if not args.skip_train:
            def train() -> bool:
                echo(f"## 2. plr train experiment=smoke on {device}, {precision}")
                with tempfile.TemporaryDirectory(prefix="plr-gpu-check-") as tmp:
                    runs = [("Partial-LoRA (default adapter)", [], "partial"),
                            ("dense LoRA (adapter=lora)", ["adapter=lora"], "lora"),
                            ("causal LM, multi-task (tiny-llama on ARC-e + BoolQ)", llm_overrides(Path(tmp)), "llm")]
                    ok = [train_check(echo, label, overrides, Path(tmp) / name, device, precision, args.train_timeout)
                          for label, overrides, name in runs]
                return all(ok)
            part("plr train", train)
        if not args.skip_bench:
            def bench() -> bool:
                echo(f"## 3. step time: {size}, {precision}, {device}")
                return bench_check(echo, device, size, args.batch, args.steps, args.warmup, precision)
            part("step time", bench)
        total = time.perf_counter() - t_all
        if failed:
            echo(f"{PREFIX} {len(failed)} part(s) failed: {', '.join(failed)} (total {total:.1f} s)")
        else:
            echo(f"gpu-check: every part ran (total {total:.1f} s); ratios against the targets are above")
        if args.out:
            echo(f"(written to {args.out})")
    finally:
        echo.close()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
