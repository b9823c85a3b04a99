"""retrain: train the (dense or masked) adapter and the head on the full training split.

[paper] sparse training from scratch with a fixed mask, as in the lottery ticket hypothesis. [ours]
`retrain.init=rewind` starts the sparse factors from the probe's initial values restricted to R × C
(`inject.rewind`); `fresh` draws new ones. The adapter's learning rate is `recipe.retrain_recipe`'s.
Writes the best adapter and head (selected on the validation split), the training curve, and the
peak memory of the training (`runtime.peak_memory`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from partial_lora import artifacts, distributed
from partial_lora.adapter.inject import rewind
from partial_lora.spec import RunSpec
from partial_lora.tracking import Tracker
from partial_lora.training import checkpoint, runtime
from partial_lora.training.curve import JsonlLog
from partial_lora.training.loop import fit
from partial_lora.training.recipe import retrain_recipe
from partial_lora.working_set.build import setup_run
from partial_lora.working_set.loaders import loader, validator
from partial_lora.working_set.trained import save_trained

NAME = artifacts.RETRAIN


def run(spec: RunSpec, run_dir: Path, tracker: Tracker | None = None) -> dict[str, Any]:
    out, main = artifacts.stage_dir(run_dir, NAME), spec.main_metric
    runtime.set_seed(spec.seed)
    s = setup_run(spec, run_dir)
    init_file, init = artifacts.stage_dir(run_dir, artifacts.PROBE) / artifacts.INIT, "fresh"
    if spec.sparse and spec.retrain.init == "rewind":
        if init_file.exists():
            rewind(s.branches, artifacts.load_tensors(init_file))
            init = "rewind"
        else:  # uniform sparsity runs no probe: nothing to rewind to
            print("[plr] retrain: no probe in this run (uniform sparsity), so retrain.init=rewind starts fresh")
    n_adapter = s.adapter_params()
    density = n_adapter / s.dense_lora_params
    tc, per_layer = retrain_recipe(spec.train, spec.retrain, main, n_adapter, density,
                                   {lid: b.num_parameters() / b.dense_num_parameters() for lid,
                                    b in s.branches.items()})
    runtime.reset_peak_memory(s.device)
    scale = tc.adapter_lr_scale
    if not any(p.requires_grad for p in s.built.model.parameters()):
        # adapter=head on a causal LM: no adapter and no head, so the run scores the model as it is.
        print("[plr] retrain: nothing to train (adapter=head on a model without a new head); "
              "evaluating the model as it is (zero-shot)")
        save_trained(s, out, spec)
        return {f"best_val_{main}": None, "best_epoch": None, "steps": 0, "train_wall_s": 0.0,
                "adapter_params": 0, "density": 0.0, "adapter_lr_scale": scale, "adapter_lr": None, "init": init,
                "rank": None, "head_params": 0, "train_examples": len(s.data.train), "history": [],
                **runtime.peak_memory(s.device)}
    result = fit(s.built.model, loader(s, s.data.train, tc, train=True, seed=spec.seed), tc, device=s.device,
                 hooks=s.train_hooks(validator(s, tc, [p.data.val for p in s.parts()])),
                 log=JsonlLog(out / artifacts.CURVE, tracker, prefix=f"{NAME}/"), desc=NAME, checkpoint=out
                 / checkpoint.FILE,
                 layer_lr_scales=per_layer)
    if distributed.launched():  # each process loaded only its shard of every batch
        print(f"[plr] {NAME}: rank {distributed.rank()} of {distributed.world_size()} trained on {result.examples} "
              f"examples in {result.steps} steps", flush=True)
    save_trained(s, out, spec)
    return {f"best_val_{main}": result.best_metric, "best_epoch": result.best_epoch, "steps": result.steps,
            "train_wall_s": result.wall_s, "adapter_params": n_adapter, "density": density,
            "adapter_lr_scale": scale, "adapter_lr": tc.lr * scale if n_adapter else None,
            "layer_lr_scales": per_layer, "init": init, **runtime.peak_memory(s.device),
            "rank": next(iter(s.branches.values())).r if s.branches else
            (None if spec.method == "head" else spec.lora.r),
            "head_params": sum(p.numel() for p in s.built.model.head_parameters()),
            "train_examples": len(s.data.train), "history": result.history}
