"""Where a run's stages spend their wall time: one `plr train` run in this process, timed by part.

    .venv/bin/python benchmarks/stage_profile.py [--threads 2] [overrides ...]
    .venv/bin/python benchmarks/stage_profile.py --threads 1 experiment=offline-minilm task=rt-polarity

Runs the pipeline (`pipeline.runner.run_pipeline`) in a fresh temporary run dir with a few of plr's own
functions wrapped in timers, and prints, for each stage, its wall time split into:

- `setup`: building the model and loading and tokenising the data (`working_set.build.setup`);
- `train`: the training epochs' forward, backward and optimizer steps (`loop._train_epoch`);
- `scoring`: evaluation passes outside the search (per-epoch validation and the evaluate stage,
  `predict.evaluate`);
- `search`: the allocation search's forward passes over its few-shot set (`predict.predict`
  called from the allocate stage), with the blocks it replays;
- `rankings`: the row/column rankings (`masks.rank_layer`, an SVD per layer for `subspace`);
- `writes`: writing checkpoints and tensors (`checkpoint.save`, `artifacts.save_tensors`);
- `plot`: the allocation's plot (`allocation.plot.plot`, matplotlib's import included);
- `other`: the rest of the stage.

Each second is counted once, in the innermost timed part it was spent in. Unlike cProfile, the
wrappers add nothing measurable. A benchmark, not a test: the shares are only as good as the
machine is quiet, so say what else ran.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

PARTS = {  # (module, function) -> the part it is counted in
    ("partial_lora.working_set.build", "setup"): "setup",
    ("partial_lora.training.loop", "_train_epoch"): "train",
    ("partial_lora.training.predict", "evaluate"): "scoring",
    ("partial_lora.training.predict", "predict"): "search",
    ("partial_lora.adapter.masks", "rank_layer"): "rankings",
    ("partial_lora.training.checkpoint", "save"): "writes",
    ("partial_lora.artifacts", "save_tensors"): "writes",
    ("partial_lora.allocation.plot", "plot"): "plot",
}
ORDER = ["setup", "train", "scoring", "search", "rankings", "writes", "plot", "other"]


class Clock:
    """Exclusive wall time per (stage, part): a stack of the timed calls now running."""

    def __init__(self, timer: Callable[[], float] = time.perf_counter) -> None:
        self.timer = timer
        self.stage = "(before the stages)"
        self.spent: dict[tuple[str, str], float] = defaultdict(float)
        self.stack: list[list[Any]] = []  # [part, started] of each timed call in progress

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        now = self.timer()
        if self.stack:  # the enclosing part stops counting while this one runs
            outer = self.stack[-1]
            self.spent[self.stage, outer[0]] += now - outer[1]
        self.stack.append([name, now])
        try:
            yield
        finally:
            name, started = self.stack.pop()
            now = self.timer()
            self.spent[self.stage, name] += now - started
            if self.stack:
                self.stack[-1][1] = now

    def wrap(self, fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            # predict() outside the allocate stage is part of scoring (evaluate calls it)
            part = name if name != "search" or self.stage == "allocate" else "scoring"
            with self.part(part):
                return fn(*args, **kwargs)
        return timed

    def stage_fn(self, fn: Callable[..., Any], stage: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.stage = stage
            with self.part("other"):
                return fn(*args, **kwargs)
        return timed


@contextlib.contextmanager
def instrument(clock: Clock) -> Iterator[None]:
    """Replace each timed function by its wrapper wherever plr's modules hold it (their own module
    and every `from ... import name` of it), and each stage's entry in the pipeline's registry;
    put everything back on leaving."""
    import importlib

    from partial_lora.pipeline import runner as stages

    undo: list[tuple[Any, str, Any]] = []
    for (module, name), part in PARTS.items():
        original = getattr(importlib.import_module(module), name)
        wrapped = clock.wrap(original, part)
        for mod in [m for k, m in sys.modules.items() if k.startswith("partial_lora") and m is not None]:
            for attr, value in list(vars(mod).items()):
                if value is original:
                    undo.append((mod, attr, value))
                    setattr(mod, attr, wrapped)
    registry = dict(stages.REGISTRY)
    for stage, fn in registry.items():
        stages.REGISTRY[stage] = clock.stage_fn(fn, stage)
    try:
        yield
    finally:
        stages.REGISTRY.update(registry)
        for mod, attr, value in undo:
            setattr(mod, attr, value)


def report(clock: Clock, total: float) -> str:
    stages: dict[str, dict[str, float]] = defaultdict(dict)
    for (stage, part), s in clock.spent.items():
        stages[stage][part] = s
    lines = [f"{'stage':<10} {'wall s':>8}  " + "  ".join(f"{p:>12}" for p in ORDER)]
    for stage, parts in stages.items():
        wall = sum(parts.values())
        shares = "  ".join(f"{parts.get(p, 0.0):7.1f} {100 * parts.get(p, 0.0) / wall:3.0f}%" for p in ORDER)
        lines.append(f"{stage:<10} {wall:8.1f}  {shares}")
    lines.append(f"whole process {total:.1f} s (the stages {sum(clock.spent.values()):.1f} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Clock:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("overrides", nargs="*", default=[])
    args = p.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    import datasets
    import torch
    from hydra import compose, initialize_config_module

    from partial_lora.pipeline.runner import run_pipeline

    torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()  # as `plr train` does: the table is what this prints
    clock = Clock()
    t0 = time.perf_counter()
    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        cfg = compose("config", overrides=["trainer.progress=false", *args.overrides])
    with instrument(clock), tempfile.TemporaryDirectory() as tmp:
        run_pipeline(cfg, Path(tmp) / "run")
    print(report(clock, time.perf_counter() - t0))
    print(f"({' '.join(args.overrides) or 'the offline demo'}, {args.threads} thread(s))")
    return clock


if __name__ == "__main__":
    main()
