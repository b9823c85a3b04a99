"""The one training loop, shared by the probe and the retrain stage.

`fit()` trains the adapter and head of a `Classifier` with AdamW (separate head learning rate),
linear warmup then cosine or linear decay, gradient accumulation and clipping, bf16 autocast
on CUDA; it evaluates on the validation split after every epoch and keeps the best adapter +
head in memory (they are small), restoring them at the end. Everything it logs also goes, line
by line, to `metrics.jsonl` so a crashed run still leaves its curve behind.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler
from tqdm.auto import tqdm

from partial_lora import artifacts as A
from partial_lora import checkpoint as CK
from partial_lora import distributed as D
from partial_lora.errors import Interrupted, PlrError
from partial_lora.inject import iter_branches
from partial_lora.metrics import compute_metrics
from partial_lora.models import Classifier
from partial_lora.recipe import TrainConfig, lr_lambda

__all__ = ["FitResult", "Hooks", "JsonlLog", "TrainConfig", "evaluate", "fit", "lr_lambda", "predict", "set_seed"]


def set_seed(seed: int) -> None:
    """Seed every RNG a run touches; call before any model is built."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PlrError(f"device '{name}' asked for but CUDA is not available; set trainer.device=cpu or auto")
    return torch.device(name)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.precision == "fp32" or (cfg.precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def _to(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}




@torch.no_grad()
def predict(model: Classifier, loader: Iterable[Mapping[str, Tensor]], device: torch.device,
            dtype: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Logits, labels and mean loss over a loader (model put in eval mode, then restored)."""
    was_training = model.training
    model.eval()
    all_logits, all_labels, loss_sum, n = [], [], 0.0, 0
    for batch in loader:
        batch = _to(batch, device)
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = model(batch)
        loss_sum += model.loss(logits, batch).item() * len(batch["labels"])
        n += len(batch["labels"])
        all_logits.append(logits.float().cpu())
        all_labels.append(batch["labels"].cpu())
    model.train(was_training)
    if n == 0:
        raise PlrError("evaluation split is empty; check task.val_split / task.test_split / max_eval_samples")
    return torch.cat(all_logits).numpy(), torch.cat(all_labels).numpy(), loss_sum / n


def evaluate(model: Classifier, loader: Iterable[Mapping[str, Tensor]], device: torch.device,
             dtype: torch.dtype | None = None, metrics: Iterable[str] = ("accuracy",)) -> dict[str, float]:
    """Task metrics and mean loss on a loader."""
    logits, labels, loss = predict(model, loader, device, dtype)
    out = compute_metrics(logits, labels, metrics)
    out["loss"] = loss
    return out


class ResumableSampler(RandomSampler):
    """`RandomSampler` whose next pass can start `skip` samples in (resuming in mid-epoch).

    The pass draws the same permutation from the same generator as a full pass would, so the
    batches after the skipped ones are the ones an uninterrupted run sees.
    """

    skip = 0

    def __iter__(self):  # type: ignore[override]
        skip, self.skip = self.skip, 0
        return itertools.islice(super().__iter__(), skip, None)


@dataclass
class FitResult:
    best_metric: float
    best_epoch: int
    steps: int
    wall_s: float
    history: list[dict[str, Any]]
    examples: int = 0  # the training rows this process took (under data parallel: its shard), resumed steps excluded


class JsonlLog:
    """Append-only metrics log, flushed per line, optionally mirrored to a tracker."""

    def __init__(self, path: Path | None, tracker: Any | None = None, prefix: str = "") -> None:
        self.path, self.tracker, self.prefix = path, tracker, prefix

    def reset(self, keep_until_step: int | None = None) -> None:
        """Start the curve: empty, or (resuming) keep the records up to a checkpoint's step."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if keep_until_step is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= keep_until_step:
                        kept.append(line + "\n")
                except json.JSONDecodeError:
                    break  # a line cut by the kill: nothing after it is kept
        with A.atomic_path(self.path) as tmp:
            tmp.write_text("".join(kept))

    def __call__(self, record: dict[str, Any]) -> None:
        if self.path is not None and D.is_main():
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.tracker is not None:
            step = record.get("step")
            self.tracker.log({f"{self.prefix}{k}": v for k, v in record.items() if k != "step"}, step=step)


@dataclass(frozen=True)
class Hooks:
    """What a caller adds to `fit`, each optional.

    validate: metrics by name (`cfg.metric` among them), replacing the evaluation on the
        validation loader (a multi-task run validates each task on its own set).
    after_step: called with the step index after each optimizer step, before the gradients are
        cleared (AdaLoRA's budget update reads them).
    extra_loss: added to the task loss (AdaLoRA's regulariser).
    """

    validate: Callable[[], dict[str, float]] | None = None
    after_step: Callable[[int], None] | None = None
    extra_loss: Callable[[], Tensor] | None = None


def optimizer_groups(model: Classifier, cfg: TrainConfig,
                     layer_lr_scales: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """AdamW's parameter groups: the adapter (one group per learning-rate scale) and the head."""
    by_scale: dict[float, list[nn.Parameter]] = {}
    for lid, branch in iter_branches(model.net):
        scale = float((layer_lr_scales or {}).get(lid, 1.0))
        by_scale.setdefault(scale, []).extend(p for p in (branch.lora_A, branch.lora_B) if p.requires_grad)
    head = [p for p in model.head_parameters() if p.requires_grad]
    grouped = {id(p) for p in head} | {id(p) for ps in by_scale.values() for p in ps}
    others = [p for p in model.net.parameters() if p.requires_grad and id(p) not in grouped]
    if others:  # a PEFT adapter
        by_scale.setdefault(1.0, []).extend(others)
    groups = [{"params": ps, "lr": cfg.lr * cfg.adapter_lr_scale * sc, "name": f"adapter x{sc:g}"}
              for sc, ps in sorted(by_scale.items())]
    groups.append({"params": head, "lr": cfg.lr if cfg.head_lr is None else cfg.head_lr, "name": "head"})
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise PlrError("nothing to train: no adapter or head parameters require gradients")
    return groups


def step_plan(train_loader: DataLoader, cfg: TrainConfig) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps): `cfg.max_steps`, else `cfg.epochs` of the loader."""
    if len(train_loader) == 0:
        raise PlrError("the training split is empty; check the task's split settings")
    per_epoch = max(1, len(train_loader) // cfg.grad_accum)
    return per_epoch, cfg.max_steps or max(1, int(math.ceil(cfg.epochs * per_epoch)))


def _shares(train_loader: DataLoader, i: int, batch: Mapping[str, Tensor], model: Classifier) -> tuple[int, float]:
    """(this process's rows, the weight of its mean loss) for batch i of the epoch.

    One process: all the rows, weight 1. Data parallel (`D.ShardedBatches`): DDP and FSDP average
    the gradients over the W processes, so a process whose loss is a mean over u of the global
    batch's U units (rows; an LLM's answer tokens, `model.loss_units`) weighs it W·u/U, and the
    average is the gradient of the global batch's mean loss. Rows are counted from the sampler;
    tokens differ per process, so their total is summed over the processes.
    """
    sharded = train_loader.batch_sampler
    if not isinstance(sharded, D.ShardedBatches):
        return len(batch["labels"]), 1.0
    mine, total = sharded.rows(i)
    units = model.loss_units(batch)  # None on every process alike (it depends on the model's kind)
    if units is None:
        return mine, sharded.world * mine / max(1, total)
    units = units if mine else 0  # a lent row counts for nothing
    return mine, sharded.world * units / max(1, D.sum_int(units))


def _backward(model: Classifier, forward: Callable[[dict[str, Tensor]], Any], batch: dict[str, Tensor],
              rows: int, weight: float, cfg: TrainConfig, device: torch.device, dtype: torch.dtype | None,
              extra_loss: Callable[[], Tensor] | None) -> Tensor:
    """One micro-batch: the loss and its gradient (scaled for accumulation and for this process's share)."""
    batch = _to(batch, device)
    with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss = model.loss(forward(batch), batch)
        if extra_loss is not None:
            loss = loss + extra_loss()
    (loss * (weight / cfg.grad_accum)).backward()
    return loss if rows else torch.zeros((), device=device)  # a row lent to keep the processes in step counts for nothing


def _guarded_step(t: CK.Training, params: list[nn.Parameter], cfg: TrainConfig, bad: bool,
                  after_step: Callable[[int], None] | None, step: int) -> tuple[bool, Tensor | None]:
    """Clip and take the optimizer step, unless a loss or the gradient is non-finite: then the
    gradients are dropped and the weights stay as they were. Returns (stepped, gradient norm)."""
    bad = D.any_flag(bad)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
    grad_norm = D.full(grad_norm) if grad_norm is not None else None  # FSDP: a DTensor, the same on every process
    if bad or (grad_norm is not None and not bool(torch.isfinite(grad_norm))):
        t.opt.zero_grad(set_to_none=True)
        return False, grad_norm
    t.opt.step()
    t.sched.step()
    if after_step is not None:
        after_step(step)
    t.opt.zero_grad(set_to_none=True)
    return True, grad_norm


def _select(t: CK.Training, val: dict[str, float], cfg: TrainConfig, epoch: int, step: int, log: JsonlLog) -> None:
    """End of an evaluated epoch: log the validation metrics, keep the state if it is the best so far."""
    if cfg.metric not in val:
        raise PlrError(f"trainer.metric '{cfg.metric}' is not computed for this task; use one of {sorted(val)}")
    rec = {"step": step, "epoch": epoch, **{f"val_{k}": v for k, v in val.items()}}
    t.progress.history.append(rec)
    log(rec)
    if val[cfg.metric] > t.progress.best:
        t.progress.best, t.progress.best_epoch, t.best_state = val[cfg.metric], epoch, t.snapshot()


def _start_epoch(t: CK.Training, epoch: int, train_loader: DataLoader, resume_epoch: int | None) -> int:
    """Set the data order for `epoch` (a resumed epoch replays its order); return the batches to skip."""
    state, gen, skip = t.progress, train_loader.generator, 0
    if gen is not None:
        if epoch == resume_epoch and state.epoch_gen_state is not None:
            gen.set_state(torch.tensor(state.epoch_gen_state, dtype=torch.uint8))  # replay this epoch's order
            skip = state.batches_done
        state.epoch_gen_state = gen.get_state().tolist()
    sampler = getattr(train_loader.batch_sampler, "sampler", None)
    if isinstance(sampler, ResumableSampler):
        sampler.skip = skip * int(getattr(train_loader.batch_sampler, "batch_size", 1) or 1)
    state.epoch, state.batches_done = epoch, skip
    return skip


def start_training(model: Classifier, train_loader: DataLoader, cfg: TrainConfig, device: torch.device,
                   layer_lr_scales: Mapping[str, float] | None, checkpoint: Path | None) -> tuple[CK.Training, int, int]:
    """AdamW, the schedule and the training state, resumed from `checkpoint` when it exists.
    Returns (state, total steps, epochs)."""
    model.to(device)
    opt = torch.optim.AdamW(optimizer_groups(model, cfg, layer_lr_scales), weight_decay=cfg.weight_decay)
    steps_per_epoch, total = step_plan(train_loader, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, cfg.warmup_ratio, cfg.schedule, cfg.warmup_steps))
    trainable = {n: p for n, p in model.net.named_parameters() if p.requires_grad}
    # A checkpoint is only taken up by the same run: same recipe, data size and trainable shapes.
    fingerprint = {**{k: v for k, v in dataclasses.asdict(cfg).items() if k not in _FREE_TO_CHANGE},
                   "total_steps": total, "examples": len(train_loader.dataset),
                   "trainable": {n: list(p.shape) for n, p in trainable.items()}}
    return CK.Training.start(checkpoint, trainable, opt, sched, fingerprint), total, max(1, math.ceil(total / steps_per_epoch))


@dataclass
class _Loop:
    """What one `fit` call's epochs share."""

    model: Classifier
    wrapped: nn.Module  # the model as trained: DDP-wrapped under a launch (`D.wrap`)
    forward: Callable[[dict[str, Tensor]], Any]  # `wrapped`, compiled with trainer.compile
    loader: DataLoader
    cfg: TrainConfig
    t: CK.Training
    total: int
    device: torch.device
    dtype: torch.dtype | None
    hooks: Hooks
    log: JsonlLog
    bar: Any
    desc: str
    checkpoint: Path | None
    examples: int = 0

    @property
    def done(self) -> bool:
        return self.t.progress.step >= self.total


def _train_epoch(lp: _Loop, epoch: int, skip: int) -> None:
    """The optimizer steps of one epoch (from batch `skip` of a resumed one), until the epoch or the
    run's steps are over; a checkpoint every `cfg.checkpoint_every` steps."""
    cfg, t, state = lp.cfg, lp.t, lp.t.progress
    params = [p for g in t.opt.param_groups for p in g["params"]]
    seen, t_epoch, bad = 0, time.perf_counter(), False
    for i, batch in enumerate(lp.loader, start=skip):
        rows, weight = _shares(lp.loader, i, batch, lp.model)
        with D.sync_unless(lp.wrapped, last_micro_batch=(i + 1) % cfg.grad_accum == 0):
            loss = _backward(lp.model, lp.forward, batch, rows, weight, cfg, lp.device, lp.dtype, lp.hooks.extra_loss)
        seen += rows
        lp.examples += rows
        finite = bool(torch.isfinite(loss))
        bad = bad or not finite
        if finite:
            first = state.step == 0 and i == 0
            state.run_loss = loss.item() if first else 0.9 * state.run_loss + 0.1 * loss.item()
        if (i + 1) % cfg.grad_accum:
            continue
        stepped, grad_norm = _guarded_step(t, params, cfg, bad, lp.hooks.after_step, state.step)
        bad = False
        if not stepped:
            state.bad_steps, state.batches_done = state.bad_steps + 1, i + 1
            if state.bad_steps > cfg.max_bad_steps:
                raise PlrError(_non_finite_message(cfg, state.step, epoch, state.bad_steps, lp.checkpoint))
            print(f"[plr] {lp.desc}: non-finite loss at step {state.step + 1}; step skipped "
                  f"({state.bad_steps} of trainer.max_bad_steps={cfg.max_bad_steps})", flush=True)
            continue
        state.step, state.batches_done = state.step + 1, i + 1
        lp.bar.update(1)
        # refresh=False: a refreshing set_postfix would redraw every step, ignoring mininterval.
        lp.bar.set_postfix(loss=f"{state.run_loss:.3f}", ex_s=f"{seen / max(1e-9, time.perf_counter() - t_epoch):.0f}",
                           refresh=False)
        lp.log({"step": state.step, "epoch": epoch, "loss": loss.item(), "lr": t.opt.param_groups[0]["lr"],
                **({"grad_norm": float(grad_norm)} if grad_norm is not None else {})})
        if lp.done:
            return
        if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
            t.save()


def _end_epoch(lp: _Loop, epoch: int) -> None:
    """The epoch is over: a resumed run starts the next one, with the data order's generator as it is now."""
    state, gen = lp.t.progress, lp.loader.generator
    state.epoch, state.batches_done = epoch + 1, 0
    state.epoch_gen_state = gen.get_state().tolist() if gen is not None else None
    lp.t.save()


def fit(model: Classifier, train_loader: DataLoader, val_loader: DataLoader | None, cfg: TrainConfig, *,
        device: torch.device, log: JsonlLog | None = None, metrics: Iterable[str] = ("accuracy",),
        desc: str = "train", layer_lr_scales: Mapping[str, float] | None = None, hooks: Hooks = Hooks(),
        checkpoint: Path | None = None) -> FitResult:
    """Train adapter + head; keep the state with the best validation `cfg.metric`.

    The model must already be frozen except for its adapter and head (see
    `inject.freeze_for_adapter`): every other trainable parameter (plr's LoRA branches, or a PEFT
    adapter) learns at the adapter learning rate. `layer_lr_scales` (layer id -> factor)
    further multiplies the adapter learning rate of single plr layers; missing layers use 1.

    With `checkpoint` (a file path), the whole training state is saved there at every epoch end
    and every `cfg.checkpoint_every` steps; if the file exists when `fit` starts, training
    resumes from it and takes exactly the steps an uninterrupted run would (the train loader
    must use a `ResumableSampler` with the loader's generator, as `stages.base.loader` does).
    A step with a non-finite loss or gradient is skipped; more than `cfg.max_bad_steps` of
    them stop the run with a `PlrError`, leaving the last good checkpoint in place.
    """
    metrics = tuple(dict.fromkeys([cfg.metric, *metrics]))
    dtype = autocast_dtype(cfg, device)
    t, total, n_epochs = start_training(model, train_loader, cfg, device, layer_lr_scales, checkpoint)
    state, resume_epoch = t.progress, t.progress.epoch if t.resumed else None
    if t.resumed:
        print(f"[plr] {desc}: resuming from {checkpoint} (step {state.step} of {total})", flush=True)
    log = log or JsonlLog(None)
    log.reset(state.step if t.resumed else None)
    if cfg.deterministic:
        use_deterministic_algorithms()
    # Data parallel under a launch: DDP's bucketed all-reduce, overlapped with the backward pass.
    wrapped = D.wrap(model, device, find_unused=_may_leave_unused(model))
    validate = hooks.validate or ((lambda: evaluate(model, val_loader, device, dtype, metrics))
                                  if val_loader is not None else None)
    lp = _Loop(model, wrapped, torch.compile(wrapped) if cfg.compile else wrapped, train_loader, cfg, t, total, device, dtype,
               hooks, log, _progress_bar(total, state.step, desc, cfg.progress), desc, checkpoint)
    t0 = time.perf_counter()
    model.train()
    try:
        for epoch in range(state.epoch, n_epochs):
            _train_epoch(lp, epoch, _start_epoch(t, epoch, train_loader, resume_epoch))
            if validate is not None and ((epoch + 1) % cfg.eval_every_epochs == 0 or lp.done or epoch == n_epochs - 1):
                _select(t, validate(), cfg, epoch, state.step, log)
            if lp.done:
                break
            _end_epoch(lp, epoch)
    except KeyboardInterrupt:
        lp.bar.close()
        raise Interrupted(desc, state.step) from None
    lp.bar.close()
    best_epoch = state.best_epoch
    if validate is None:  # nothing to select on: keep the last state
        t.best_state, best_epoch = t.snapshot(), n_epochs - 1
    t.restore_best()
    return FitResult(best_metric=state.best, best_epoch=best_epoch, steps=state.step,
                     wall_s=time.perf_counter() - t0, history=state.history, examples=lp.examples)


def _may_leave_unused(model: Classifier) -> bool:
    """Whether a step may leave a trainable parameter without a gradient, so that DDP must look for
    them: a PEFT adapter (plr's own branches and the head take part in every step)."""
    ours = {id(p) for _, b in iter_branches(model.net) for p in (b.lora_A, b.lora_B)}
    ours |= {id(p) for p in model.head_parameters()}
    return any(p.requires_grad and id(p) not in ours for p in model.net.parameters())


def _progress_bar(total: int, step: int, desc: str, show: bool) -> Any:
    """On a terminal the bar redraws often; in log files (sweeps, CI) only every 30 s."""
    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=step, desc=desc, disable=not show, dynamic_ncols=True, leave=tty,
                mininterval=0.1 if tty else 30.0)


# Settings that do not change what training computes: a checkpoint survives changing them.
_FREE_TO_CHANGE = ("progress", "num_workers", "eval_batch_size", "device", "checkpoint_every", "max_bad_steps",
                   "eval_every_epochs", "compile", "strategy")


def use_deterministic_algorithms() -> None:
    """Deterministic kernels everywhere (`trainer.deterministic=true`).

    On CUDA this costs speed: cuBLAS needs a fixed workspace (`CUBLAS_WORKSPACE_CONFIG`, set
    here before the first CUDA matmul), cuDNN stops autotuning, some ops use slower
    deterministic kernels, and an op without one raises an error instead of running.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)


def _non_finite_message(cfg: TrainConfig, step: int, epoch: int, bad: int, checkpoint: Path | None) -> str:
    kept = (f"the last good checkpoint is kept in {checkpoint}; " if checkpoint is not None and checkpoint.exists()
            else "")
    return (f"non-finite loss or gradient at step {step + 1} (epoch {epoch}), {bad} such step(s), more than "
            f"trainer.max_bad_steps={cfg.max_bad_steps}; {kept}lower trainer.lr, keep trainer.max_grad_norm > 0 or "
            f"use trainer.precision=fp32 (or allow skipped steps with trainer.max_bad_steps=N)")
