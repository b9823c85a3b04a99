"""retrain: train the (dense or masked) adapter and the head on the full training split.

Reads `extract/masks.safetensors` when the plan has an extract stage; writes the best adapter
and head (selected on the validation split) and the training curve.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from partial_lora import artifacts as A
from partial_lora import config as C
from partial_lora.lora import adapter_state_dict, count_adapter_parameters
from partial_lora.stages.base import loader, setup
from partial_lora.tracking import Tracker
from partial_lora.train import JsonlLog, fit, set_seed

NAME = "retrain"


def run(cfg: DictConfig, run_dir: Path, tracker: Tracker | None = None) -> dict[str, Any]:
    out = A.stage_dir(run_dir, NAME)
    set_seed(int(cfg.seed))
    s = setup(cfg)
    _, main = C.task_metrics(cfg)
    tc = C.train_config(cfg, metric=main)
    result = fit(s.built.model, loader(s, s.data.train, tc, train=True, seed=int(cfg.seed)),
                 loader(s, s.data.val, tc, train=False), tc, device=s.device, metrics=s.metrics,
                 log=JsonlLog(out / A.CURVE, tracker, prefix=f"{NAME}/"), desc=NAME)
    meta = {"model": str(cfg.model.name), "task": str(cfg.task.name)}
    A.save_tensors(out / A.ADAPTER, adapter_state_dict(s.built.model.net), meta)
    A.save_tensors(out / A.HEAD, s.built.model.head_state_dict(), meta)
    params = count_adapter_parameters(s.built.model.net)
    return {f"best_val_{main}": result.best_metric, "best_epoch": result.best_epoch, "steps": result.steps,
            "train_wall_s": result.wall_s, "adapter_params": params["adapter"],
            "head_params": sum(p.numel() for p in s.built.model.head_parameters()),
            "train_examples": len(s.data.train), "history": result.history}
