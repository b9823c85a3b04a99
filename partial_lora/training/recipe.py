"""The training recipe: `TrainConfig` (the `trainer` config group, range-checked) and the
learning-rate schedule it names, which `loop.fit` runs; and the retrain's (`RetrainConfig`, the
`retrain` group): how a sparse adapter's learning rate is set (`retrain_recipe`)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from partial_lora import distributed
from partial_lora.errors import PlrError


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation recipe (the `trainer` config group).

    Attributes:
        epochs: passes over the training split.
        max_steps: optimizer steps cap (None: epochs decide).
        batch_size / eval_batch_size: examples per forward pass.
        grad_accum: forward passes per optimizer step.
        lr: adapter learning rate; head_lr: head learning rate (None: same as lr).
        adapter_lr_scale: multiplies `lr` for the adapter only (sparse adapters want more).
        weight_decay: AdamW decoupled weight decay (adapter and head alike).
        warmup_ratio: share of the steps with linear warmup from 0.
        warmup_steps: a fixed number of warmup steps instead (None: use warmup_ratio).
        schedule: `cosine`, `linear` or `constant` decay after warmup.
        max_grad_norm: clip the global gradient norm (<= 0: off).
        precision: `auto` (bf16 autocast on CUDA, fp32 elsewhere), `bf16` or `fp32`.
        metric: the validation metric that selects the best epoch (higher is better).
        eval_every_epochs: evaluate every N epochs (the last epoch always).
        progress: show a tqdm bar.
        num_workers: DataLoader workers.
        device: `auto`, `cpu`, `cuda`, `cuda:1`...
        checkpoint_every: also checkpoint every N optimizer steps (0: only at epoch ends).
        max_bad_steps: optimizer steps with a non-finite loss or gradient that may be skipped
            before the run stops (0: stop at the first).
        deterministic: use deterministic algorithms (on CUDA: slower kernels, no cuDNN autotuning).
        compile: train through `torch.compile(model)` (worth it on CUDA for long runs; the first
            steps pay the compilation).
        strategy: under a multi-process launch, `ddp` (each process holds the whole model; rank 0
            alone probes and searches) or `fsdp` (the model is sharded over the processes, which
            run every stage together); see `partial_lora.distributed`.
    """

    epochs: float = 3
    max_steps: int | None = None
    batch_size: int = 32
    eval_batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-3
    head_lr: float | None = None
    adapter_lr_scale: float = 1.0
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    warmup_steps: int | None = None
    schedule: str = "cosine"
    max_grad_norm: float = 1.0
    precision: str = "auto"
    metric: str = "accuracy"
    eval_every_epochs: int = 1
    progress: bool = True
    num_workers: int = 0
    device: str = "auto"
    checkpoint_every: int = 0
    max_bad_steps: int = 0
    deterministic: bool = False
    compile: bool = False
    strategy: str = "ddp"

    def __post_init__(self) -> None:
        checks = [
            (self.batch_size >= 1, f"trainer.batch_size must be at least 1, got {self.batch_size}"),
            (self.eval_batch_size >= 1, f"trainer.eval_batch_size must be at least 1, got {self.eval_batch_size}"),
            (self.grad_accum >= 1, f"trainer.grad_accum must be at least 1, got {self.grad_accum}"),
            (self.lr > 0, f"trainer.lr must be positive, got {self.lr}"),
            (self.head_lr is None or self.head_lr >= 0, f"trainer.head_lr must be >= 0, got {self.head_lr}"),
            (self.adapter_lr_scale > 0, f"trainer.adapter_lr_scale must be positive, got {self.adapter_lr_scale}"),
            (self.epochs > 0 or (self.max_steps or 0) > 0, "trainer.epochs (or trainer.max_steps) must be positive"),
            (0 <= self.warmup_ratio < 1, f"trainer.warmup_ratio must be in [0, 1), got {self.warmup_ratio}"),
            (self.warmup_steps is None or self.warmup_steps >= 0,
             f"trainer.warmup_steps must be >= 0 (or null), got {self.warmup_steps}"),
            (self.schedule in SCHEDULES,
             f"trainer.schedule '{self.schedule}' is unknown; use one of {list(SCHEDULES)}"),
            (self.precision in ("auto", "bf16", "fp32"),
             f"trainer.precision '{self.precision}' must be auto, bf16 or fp32"),
            (self.weight_decay >= 0, f"trainer.weight_decay must be >= 0, got {self.weight_decay}"),
            (self.checkpoint_every >= 0, f"trainer.checkpoint_every must be >= 0, got {self.checkpoint_every}"),
            (self.max_bad_steps >= 0, f"trainer.max_bad_steps must be >= 0, got {self.max_bad_steps}"),
            (self.max_steps is None or self.max_steps >= 1,
             f"trainer.max_steps must be >= 1 (or null: trainer.epochs decides), got {self.max_steps}"),
            (self.eval_every_epochs >= 1, f"trainer.eval_every_epochs must be >= 1, got {self.eval_every_epochs}"),
            (self.num_workers >= 0, f"trainer.num_workers must be >= 0 (0: load in the main process), "
                                    f"got {self.num_workers}"),
            (self.strategy in distributed.STRATEGIES,
             f"trainer.strategy '{self.strategy}' must be one of {', '.join(distributed.STRATEGIES)}"),
            (_DEVICE.fullmatch(self.device) is not None,
             f"trainer.device '{self.device}' must be auto, cpu, cuda, cuda:<index> or mps"),
        ]
        for ok, msg in checks:
            if not ok:
                raise PlrError(msg + "; fix that override")


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")

SCHEDULES: dict[str, Callable[[float], float]] = {
    "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
    "linear": lambda p: 1.0 - p,
    "constant": lambda p: 1.0,
}


def lr_lambda(total_steps: int, warmup_ratio: float, schedule: str,
              warmup_steps: int | None = None) -> Callable[[int], float]:
    """Multiplier of the base learning rate at a step: linear warmup, then the decay.

    `warmup_steps` (when not None) fixes the warmup length, capped at the total; otherwise
    it is `warmup_ratio` of the total.
    """
    warmup = int(round(warmup_ratio * total_steps)) if warmup_steps is None else min(warmup_steps, total_steps)
    decay = SCHEDULES[schedule]

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, decay((step - warmup) / max(1, total_steps - warmup)))

    return f


@dataclass(frozen=True)
class RetrainConfig:
    """`retrain`: how the sparse adapter restarts and learns.

    Attributes:
        init: `rewind` (the probe's initial values restricted to R × C) or `fresh`.
        adapter_lr_scale: a number, or `auto` = 1/sqrt(kept density) capped at `lr_scale_cap` [ours].
        lr_scale_cap: the cap of `auto`.
        lr_scale_per_layer: with `auto`, use each layer's own kept density instead of the
            adapter's overall density (a dense layer then keeps the base learning rate).
        lr: the adapter's learning rate in the retrain [ours], replacing `trainer.lr` times
            `adapter_lr_scale` (and `lr_scale_per_layer`); the head keeps `trainer.head_lr` (or
            `trainer.lr`), the probe the trainer's. None: today's rate. What `plr study --tune
            retrain.lr=...` chooses per arm on validation.
    """

    init: str = "rewind"
    adapter_lr_scale: float | str = "auto"
    lr_scale_cap: float = 8.0
    lr_scale_per_layer: bool = False
    lr: float | None = None

    def __post_init__(self) -> None:
        if self.lr is not None and self.lr <= 0:
            raise PlrError(f"retrain.lr must be a positive learning rate (or null: trainer.lr x "
                           f"retrain.adapter_lr_scale), got {self.lr}")
        if self.init not in ("rewind", "fresh"):
            raise PlrError(f"retrain.init must be rewind or fresh, got '{self.init}'")
        s = self.adapter_lr_scale
        if s != "auto" and (isinstance(s, str) or s <= 0):
            raise PlrError(f"retrain.adapter_lr_scale must be a positive number or auto, got '{s}'")
        if self.lr_scale_cap <= 0:
            raise PlrError("retrain.lr_scale_cap must be positive (the largest scale adapter_lr_scale=auto gives), got "
                           f"{self.lr_scale_cap}; e.g. retrain.lr_scale_cap=8")


def lr_scale_auto(alloc_density: float, cap: float = 8.0) -> float:
    """`retrain.adapter_lr_scale=auto` [ours]: 1/sqrt(kept density), capped."""
    return float(min(cap, 1.0 / math.sqrt(max(alloc_density, 1e-12))))


def retrain_recipe(train: TrainConfig, rc: RetrainConfig, metric: str, n_adapter: int, density: float,
                   layer_densities: Mapping[str, float]) -> tuple[TrainConfig, dict[str, float] | None]:
    """The retrain's recipe and per-layer learning-rate factors (None: one rate for the adapter).

    `retrain.lr` set: the adapter learns at exactly that rate (scale 1, no per-layer factors) and the
    head at `trainer.head_lr` (`trainer.lr` when that is null), so arms tuned to different adapter
    rates share the head's. Else the adapter's rate is `trainer.lr` times `retrain.adapter_lr_scale`
    (`auto`: 1/sqrt(kept `density`), capped; per layer, from `layer_densities`, with `lr_scale_per_layer`).
    """
    train = replace(train, metric=metric)
    if rc.lr is not None:
        head = train.lr if train.head_lr is None else train.head_lr
        return replace(train, lr=rc.lr, head_lr=head, adapter_lr_scale=1.0), None
    if n_adapter == 0:  # adapter=head: no adapter to scale
        return replace(train, adapter_lr_scale=1.0), None
    if rc.adapter_lr_scale != "auto":
        return replace(train, adapter_lr_scale=float(rc.adapter_lr_scale)), None
    if rc.lr_scale_per_layer:
        return replace(train, adapter_lr_scale=1.0), {
            lid: lr_scale_auto(d, rc.lr_scale_cap) for lid, d in layer_densities.items()}
    return replace(train, adapter_lr_scale=lr_scale_auto(density, rc.lr_scale_cap)), None
