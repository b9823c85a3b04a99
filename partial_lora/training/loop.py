"""The one training loop, shared by the probe and the retrain stage.

`fit()` trains the adapter and head of a `Classifier` with AdamW (separate head learning rate),
linear warmup then cosine or linear decay, gradient accumulation and clipping, bf16 autocast
on CUDA; it evaluates on the validation split after every epoch and keeps the best adapter +
head in memory (they are small), restoring them at the end. Everything it logs also goes, line
by line, to `metrics.jsonl` so a crashed run still leaves its curve behind.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler
from tqdm.auto import tqdm

from partial_lora import distributed
from partial_lora.adapter.inject import iter_branches
from partial_lora.errors import Interrupted, PlrError
from partial_lora.models.classifier import Classifier
from partial_lora.training.checkpoint import Training
from partial_lora.training.curve import JsonlLog
from partial_lora.training.optimizer import start_training
from partial_lora.training.recipe import TrainConfig
from partial_lora.training.runtime import autocast_dtype, to_device, use_deterministic_algorithms

__all__ = ["FitResult", "Hooks", "fit"]


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


@dataclass(frozen=True)
class Hooks:
    """What a caller adds to `fit`, each optional.

    validate: the validation's metrics by name (`cfg.metric` among them), after every
        `cfg.eval_every_epochs` epochs (`working_set.loaders.validator`; a multi-task run
        validates each task on its own set). None: nothing is selected, the last state is kept.
    after_step: called with the step index after each optimizer step, before the gradients are
        cleared (AdaLoRA's budget update reads them).
    extra_loss: added to the task loss (AdaLoRA's regulariser).
    """

    validate: Callable[[], dict[str, float]] | None = None
    after_step: Callable[[int], None] | None = None
    extra_loss: Callable[[], Tensor] | None = None


def _shares(train_loader: DataLoader, i: int, batch: Mapping[str, Tensor], model: Classifier) -> tuple[int, float]:
    """(this process's rows, the weight of its mean loss) for batch i of the epoch.

    One process: all the rows, weight 1. Data parallel (`distributed.ShardedBatches`): DDP and FSDP average
    the gradients over the W processes, so a process whose loss is a mean over u of the global
    batch's U units (rows; an LLM's answer tokens, `model.loss_units`) weighs it W·u/U, and the
    average is the gradient of the global batch's mean loss. Rows are counted from the sampler;
    tokens differ per process, so their total is summed over the processes.
    """
    sharded = train_loader.batch_sampler
    if not isinstance(sharded, distributed.ShardedBatches):
        return len(batch["labels"]), 1.0
    mine, total = sharded.rows(i)
    units = model.loss_units(batch)  # None on every process alike (it depends on the model's kind)
    if units is None:
        return mine, sharded.world * mine / max(1, total)
    units = units if mine else 0  # a lent row counts for nothing
    return mine, sharded.world * units / max(1, distributed.sum_int(units))


def _backward(model: Classifier, forward: Callable[[dict[str, Tensor]], Any], batch: dict[str, Tensor],
              rows: int, weight: float, cfg: TrainConfig, device: torch.device, dtype: torch.dtype | None,
              extra_loss: Callable[[], Tensor] | None) -> Tensor:
    """One micro-batch: the loss and its gradient (scaled for accumulation and for this process's share)."""
    batch = to_device(batch, device)
    with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss = model.loss(forward(batch), batch)
        if extra_loss is not None:
            loss = loss + extra_loss()
    (loss * (weight / cfg.grad_accum)).backward()
    # A row lent to keep the processes in step counts for nothing.
    return loss if rows else torch.zeros((), device=device)


def _guarded_step(t: Training, params: list[nn.Parameter], cfg: TrainConfig, bad: bool,
                  after_step: Callable[[int], None] | None, step: int) -> tuple[bool, Tensor | None]:
    """Clip and take the optimizer step, unless a loss or the gradient is non-finite: then the
    gradients are dropped and the weights stay as they were. Returns (stepped, gradient norm)."""
    bad = distributed.any_flag(bad)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
    # FSDP: a DTensor, the same on every process.
    grad_norm = distributed.full(grad_norm) if grad_norm is not None else None
    if bad or (grad_norm is not None and not bool(torch.isfinite(grad_norm))):
        t.opt.zero_grad(set_to_none=True)
        return False, grad_norm
    t.opt.step()
    t.sched.step()
    if after_step is not None:
        after_step(step)
    t.opt.zero_grad(set_to_none=True)
    return True, grad_norm


def _select(t: Training, val: dict[str, float], cfg: TrainConfig, epoch: int, step: int, log: JsonlLog) -> None:
    """End of an evaluated epoch: log the validation metrics, keep the state if it is the best so far."""
    if cfg.metric not in val:
        raise PlrError(f"trainer.metric '{cfg.metric}' is not computed for this task; use one of {sorted(val)}")
    rec = {"step": step, "epoch": epoch, **{f"val_{k}": v for k, v in val.items()}}
    t.progress.history.append(rec)
    log(rec)
    if val[cfg.metric] > t.progress.best:
        t.progress.best, t.progress.best_epoch, t.best_state = val[cfg.metric], epoch, t.snapshot()


def _start_epoch(t: Training, epoch: int, train_loader: DataLoader, resume_epoch: int | None) -> int:
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


@dataclass
class _Loop:
    """What one `fit` call's epochs share."""

    model: Classifier
    wrapped: nn.Module  # the model as trained: DDP-wrapped under a launch (`distributed.wrap`)
    forward: Callable[[dict[str, Tensor]], Any]  # `wrapped`, compiled with trainer.compile
    loader: DataLoader
    cfg: TrainConfig
    t: Training
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
        with distributed.sync_unless(lp.wrapped, last_micro_batch=(i + 1) % cfg.grad_accum == 0):
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


def fit(model: Classifier, train_loader: DataLoader, cfg: TrainConfig, *, device: torch.device,
        log: JsonlLog | None = None, desc: str = "train", layer_lr_scales: Mapping[str, float] | None = None,
        hooks: Hooks = Hooks(), checkpoint: Path | None = None) -> FitResult:
    """Train adapter + head; keep the state with the best validation `cfg.metric` (`hooks.validate`;
    without it, the last state).

    The model must already be frozen except for its adapter and head (see
    `inject.freeze_for_adapter`): every other trainable parameter (plr's LoRA branches, or a PEFT
    adapter) learns at the adapter learning rate. `layer_lr_scales` (layer id -> factor)
    further multiplies the adapter learning rate of single plr layers; missing layers use 1.

    With `checkpoint` (a file path), the whole training state is saved there at every epoch end
    and every `cfg.checkpoint_every` steps; if the file exists when `fit` starts, training
    resumes from it and takes exactly the steps an uninterrupted run would (the train loader
    must use a `ResumableSampler` with the loader's generator, as `working_set.loaders.loader` does).
    A step with a non-finite loss or gradient is skipped; more than `cfg.max_bad_steps` of
    them stop the run with a `PlrError`, leaving the last good checkpoint in place.
    """
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
    wrapped = distributed.wrap(model, device, find_unused=_may_leave_unused(model))
    validate = hooks.validate
    lp = _Loop(model, wrapped, torch.compile(wrapped) if cfg.compile else wrapped, train_loader, cfg, t, total, device,
               dtype,
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


def _non_finite_message(cfg: TrainConfig, step: int, epoch: int, bad: int, checkpoint: Path | None) -> str:
    kept = (f"the last good checkpoint is kept in {checkpoint}; " if checkpoint is not None and checkpoint.exists()
            else "")
    return (f"non-finite loss or gradient at step {step + 1} (epoch {epoch}), {bad} such step(s), more than "
            f"trainer.max_bad_steps={cfg.max_bad_steps}; {kept}lower trainer.lr, keep trainer.max_grad_norm > 0 or "
            f"use trainer.precision=fp32 (or allow skipped steps with trainer.max_bad_steps=N)")
