"""What a fit starts from: AdamW, its learning-rate schedule and the training state.

The adapter's parameters form one AdamW group per learning-rate scale and the head another;
the schedule runs over the planned steps (`step_plan`); the training state is new, or resumed
from a checkpoint that the same run wrote (same recipe, data size and trainable shapes).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from partial_lora.adapter.inject import iter_branches
from partial_lora.errors import PlrError
from partial_lora.models.classifier import Classifier
from partial_lora.training.checkpoint import Training
from partial_lora.training.recipe import TrainConfig, lr_lambda


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


def step_plan(batches: int, cfg: TrainConfig) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps) of a training on `batches` batches per epoch:
    `cfg.max_steps`, else `cfg.epochs` of them (the one place that counts a training's steps)."""
    if batches == 0:
        raise PlrError("the training split is empty; check the task's split settings")
    per_epoch = max(1, batches // cfg.grad_accum)
    return per_epoch, cfg.max_steps or max(1, int(math.ceil(cfg.epochs * per_epoch)))


def start_training(model: Classifier, train_loader: DataLoader, cfg: TrainConfig, device: torch.device,
                   layer_lr_scales: Mapping[str, float] | None, checkpoint: Path | None) -> tuple[Training, int, int]:
    """AdamW, the schedule and the training state, resumed from `checkpoint` when it exists.
    Returns (state, total steps, epochs)."""
    model.to(device)
    opt = torch.optim.AdamW(optimizer_groups(model, cfg, layer_lr_scales), weight_decay=cfg.weight_decay)
    steps_per_epoch, total = step_plan(len(train_loader), cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, cfg.warmup_ratio, cfg.schedule, cfg.warmup_steps))
    trainable = {n: p for n, p in model.net.named_parameters() if p.requires_grad}
    # A checkpoint is only taken up by the same run: same recipe, data size and trainable shapes.
    fingerprint = {**{k: v for k, v in dataclasses.asdict(cfg).items() if k not in _FREE_TO_CHANGE},
                   "total_steps": total, "examples": len(train_loader.dataset),
                   "trainable": {n: list(p.shape) for n, p in trainable.items()}}
    return Training.start(checkpoint, trainable, opt, sched,
                          fingerprint), total, max(1, math.ceil(total / steps_per_epoch))


# Settings that do not change what training computes: a checkpoint survives changing them.
_FREE_TO_CHANGE = ("progress", "num_workers", "eval_batch_size", "device", "checkpoint_every", "max_bad_steps",
                   "eval_every_epochs", "compile", "strategy")
