"""retrain: train the (dense or masked) adapter and the head on the full training split.

[paper] sparse training from scratch with a fixed mask, as in the lottery ticket hypothesis.
[ours] `retrain.init=rewind` starts the sparse factors from the probe's initial values restricted
to R × C (A[:, C], B[R] = 0); `fresh` draws new ones. `retrain.adapter_lr_scale` multiplies the
adapter's learning rate (`auto` = 1/sqrt(kept density), capped); `retrain.lr`, when set, is the
adapter's learning rate instead (no scale; the head keeps its own). Writes the best adapter and
head (selected on the validation split), the training curve, and the peak memory of the training
(`runtime.peak_memory`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from partial_lora import artifacts as A
from partial_lora.training import checkpoint as CK
from partial_lora import distributed as D
from partial_lora.training import runtime as RT
from partial_lora.allocation.allocators import lr_scale_auto
from partial_lora.training.curve import JsonlLog
from partial_lora.adapter.lora import LoRABranch
from partial_lora.training.recipe import TrainConfig
from partial_lora.training.runtime import set_seed
from partial_lora.spec import RunSpec
from partial_lora.working_set.loaders import loader, validator
from partial_lora.working_set.trained import save_trained
from partial_lora.working_set.build import setup_run
from partial_lora.tracking import Tracker
from partial_lora.training.loop import fit

NAME = A.RETRAIN


def rewind(branches: dict[str, LoRABranch], init: dict[str, torch.Tensor]) -> None:
    """Load the probe's initial factors restricted to each branch's kept rows and columns."""
    for lid, b in branches.items():  # D.assign: under FSDP, this process's shard of each
        D.assign(b.lora_A, init[f"{lid}.lora_A"][:, b.cols.cpu()].to(b.lora_A.device))
        D.assign(b.lora_B, init[f"{lid}.lora_B"][b.rows.cpu()].to(b.lora_B.device))


def recipe(spec: RunSpec, n_adapter: int, density: float,
           branches: Mapping[str, LoRABranch]) -> tuple[TrainConfig, dict[str, float] | None]:
    """The retrain's recipe and per-layer learning-rate factors (None: one rate for the adapter).

    `retrain.lr` set: the adapter learns at exactly that rate (scale 1, no per-layer factors) and the
    head at `trainer.head_lr` (`trainer.lr` when that is null), so arms tuned to different adapter
    rates share the head's. Else the adapter's rate is `trainer.lr` times `retrain.adapter_lr_scale`
    (`auto`: 1/sqrt(kept density), capped; per layer with `lr_scale_per_layer`).
    """
    rc, train = spec.retrain, replace(spec.train, metric=spec.main_metric)
    if rc.lr is not None:
        head = train.lr if train.head_lr is None else train.head_lr
        return replace(train, lr=rc.lr, head_lr=head, adapter_lr_scale=1.0), None
    if n_adapter == 0:  # adapter=head: no adapter to scale
        return replace(train, adapter_lr_scale=1.0), None
    if rc.adapter_lr_scale != "auto":
        return replace(train, adapter_lr_scale=float(rc.adapter_lr_scale)), None
    if rc.lr_scale_per_layer:
        return replace(train, adapter_lr_scale=1.0), {
            lid: lr_scale_auto(b.num_parameters() / b.dense_num_parameters(), rc.lr_scale_cap)
            for lid, b in branches.items()}
    return replace(train, adapter_lr_scale=lr_scale_auto(density, rc.lr_scale_cap)), None


def run(spec: RunSpec, run_dir: Path, tracker: Tracker | None = None) -> dict[str, Any]:
    out = A.stage_dir(run_dir, NAME)
    rc = spec.retrain
    set_seed(spec.seed)
    s = setup_run(spec, run_dir)
    init_file = A.stage_dir(run_dir, A.PROBE) / A.INIT
    init = "fresh"
    if spec.sparse and rc.init == "rewind":
        if init_file.exists():
            rewind(s.branches, A.load_tensors(init_file))
            init = "rewind"
        else:  # uniform sparsity runs no probe: nothing to rewind to
            print("[plr] retrain: no probe in this run (uniform sparsity), so retrain.init=rewind starts fresh")
    n_adapter = s.adapter_params()
    density = n_adapter / s.dense_lora_params
    main = spec.main_metric
    tc, per_layer = recipe(spec, n_adapter, density, s.branches)
    scale = tc.adapter_lr_scale
    RT.reset_peak_memory(s.device)
    val = [p.data.val for p in s.parts()]
    if not any(p.requires_grad for p in s.built.model.parameters()):
        # adapter=head on a causal LM: no adapter and no head, so the run scores the model as it is.
        print("[plr] retrain: nothing to train (adapter=head on a model without a new head); "
              "evaluating the model as it is (zero-shot)")
        save_trained(s, out, spec)
        return {f"best_val_{main}": None, "best_epoch": None, "steps": 0, "train_wall_s": 0.0,
                "adapter_params": 0, "density": 0.0, "adapter_lr_scale": scale, "adapter_lr": None, "init": init,
                "rank": None, "head_params": 0, "train_examples": len(s.data.train), "history": [],
                **RT.peak_memory(s.device)}
    result = fit(s.built.model, loader(s, s.data.train, tc, train=True, seed=spec.seed), None, tc,
                 device=s.device, metrics=s.metrics, hooks=s.train_hooks(validator(s, tc, val)),
                 log=JsonlLog(out / A.CURVE, tracker, prefix=f"{NAME}/"), desc=NAME, checkpoint=out / CK.FILE,
                 layer_lr_scales=per_layer)
    if D.launched():  # each process loaded only its shard of every batch
        print(f"[plr] {NAME}: rank {D.rank()} of {D.world_size()} trained on {result.examples} examples "
              f"in {result.steps} steps", flush=True)
    save_trained(s, out, spec)
    return {f"best_val_{main}": result.best_metric, "best_epoch": result.best_epoch, "steps": result.steps,
            "train_wall_s": result.wall_s, "adapter_params": n_adapter, "density": density,
            "adapter_lr_scale": scale, "adapter_lr": tc.lr * scale if n_adapter else None,
            "layer_lr_scales": per_layer, "init": init, **RT.peak_memory(s.device),
            "rank": next(iter(s.branches.values())).r if s.branches else
            (None if spec.method == "head" else spec.lora.r),
            "head_params": sum(p.numel() for p in s.built.model.head_parameters()),
            "train_examples": len(s.data.train), "history": result.history}
