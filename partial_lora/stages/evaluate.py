"""evaluate: task metrics of the retrained adapter on the validation and test splits.

Metrics are keyed `val_<metric>`, `test_<metric>` and, for a task's further evaluation sets
(`task.eval_splits`, e.g. MNLI mismatched), `test_<name>_<metric>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from partial_lora import artifacts as A
from partial_lora import config as C
from partial_lora.stages.base import load_trained, loader, setup_run, validator
from partial_lora.tracking import Tracker
from partial_lora.train import autocast_dtype, evaluate, set_seed

NAME = "evaluate"


def run(cfg: DictConfig, run_dir: Path, tracker: Tracker | None = None) -> dict[str, Any]:
    set_seed(int(cfg.seed))
    s = setup_run(cfg, run_dir)
    load_trained(s, A.stage_dir(run_dir, "retrain"))
    tc = C.train_config(cfg)
    model = s.built.model.to(s.device)
    dtype = autocast_dtype(tc, s.device)
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    out: dict[str, Any] = {}
    if s.multi is None:
        sets = [("val", s.data.val), ("test", s.data.test), *((f"test_{n}", d) for n, d in s.data.extra.items())]
        for split_name, split in sets:
            out.update({f"{split_name}_{k}": v for k, v in validator(s, tc, split)().items()})
        out.update(test_examples=len(s.data.test), **{f"test_{n}_examples": len(d) for n, d in s.data.extra.items()})
    else:  # per member through its own head: `<split>_<task>_<metric>`, and the mean over members
        members = s.multi.members
        for split_name in ("val", "test"):
            scores = validator(s, tc, [getattr(part, split_name) for part in s.multi.parts])()
            out.update({f"{split_name}_{k}": v for k, v in scores.items()})
        for i, (m, part) in enumerate(zip(members, s.multi.parts, strict=True)):
            for name, d in part.extra.items():
                for k, v in evaluate(model.view(i), loader(s, d, tc, train=False), s.device, dtype, m.metrics).items():
                    out[f"test_{m.name}_{name}_{k}"] = v
        out.update(test_examples=sum(len(p.test) for p in s.multi.parts), members=[m.name for m in members],
                   member_metrics={m.name: {"metrics": list(m.metrics), "main": m.main} for m in members},
                   **{f"test_{m.name}_examples": len(p.test) for m, p in zip(members, s.multi.parts, strict=True)})
    out.update(adapter_params=s.adapter_params(), dense_lora_params=s.dense_lora_params,
               head_params=sum(p.numel() for p in s.built.model.head_parameters()))
    if tracker is not None:
        tracker.log({f"{NAME}/{k}": v for k, v in out.items()})
    return out
