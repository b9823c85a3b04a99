"""probe: a short dense-LoRA run on a few-shot subset; its accuracy a_ref anchors the allocation.

[paper] "a separate training phase on a few-shot subset". [ours] `adapter.probe.shots` examples
per class for training and a disjoint `val_shots` per class for validation, both drawn from the
training split with the run's seed. Writes the trained adapter and head, the adapter's *initial*
values (for rewinding the sparse retrain), and the few-shot indices.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from partial_lora import artifacts
from partial_lora.adapter.inject import adapter_state_dict
from partial_lora.spec import RunSpec
from partial_lora.tracking import Tracker
from partial_lora.training import checkpoint
from partial_lora.training.curve import JsonlLog
from partial_lora.training.loop import Hooks, fit
from partial_lora.training.runtime import set_seed
from partial_lora.working_set.build import setup
from partial_lora.working_set.loaders import few_shot_sets, fewshot_indices, loader, validator
from partial_lora.working_set.trained import save_trained

NAME = artifacts.PROBE


def run(spec: RunSpec, run_dir: Path, tracker: Tracker | None = None) -> dict[str, Any]:
    out = artifacts.stage_dir(run_dir, NAME)
    pc = spec.probe
    set_seed(spec.seed)
    s = setup(spec)
    train_idx, val_idx = fewshot_indices(s, pc, spec.seed)
    meta = {"model": spec.model.name, "task": spec.task}
    artifacts.save_tensors(out / artifacts.INIT, adapter_state_dict(s.built.model.net), meta)  # before any step
    artifacts.write_json(out / artifacts.FEWSHOT,
                         {"train": train_idx, "val": val_idx, "shots": pc.shots, "val_shots": pc.val_shots})
    main = spec.main_metric
    tc = replace(spec.train, metric=main, epochs=pc.epochs, batch_size=pc.batch_size, max_steps=None,
                 **({"lr": pc.lr} if pc.lr else {}), **({"head_lr": pc.head_lr} if pc.head_lr else {}))
    few_train = s.data.train.select(train_idx)
    result = fit(s.built.model, loader(s, few_train, tc, train=True, seed=spec.seed), tc,
                 device=s.device, hooks=Hooks(validate=validator(s, tc, few_shot_sets(s, val_idx))),
                 log=JsonlLog(out / artifacts.CURVE, tracker, prefix=f"{NAME}/"), desc=NAME, checkpoint=out
                 / checkpoint.FILE)
    save_trained(s, out, spec)
    return {"a_ref": result.best_metric, "metric": main, "best_epoch": result.best_epoch, "steps": result.steps,
            "train_examples": len(train_idx), "val_examples": len(val_idx), "train_wall_s": result.wall_s}
