"""evaluate: task metrics of the retrained adapter on the validation and test splits.

Metrics are keyed `val_<metric>`, `test_<metric>` and, for a task's further evaluation sets
(`task.eval_splits`, e.g. MNLI mismatched), `test_<name>_<metric>`. Every evaluated example's
prediction goes to `evaluate/predictions.parquet` (one row each: `split`, `task` for a
multi-task member, `index` into that split, `label`, `prediction` (class id, or the regression
output), `score` (the predicted class's softmax probability, or the regression output)), so runs
can be paired example by example (`plr study`, error analysis).

For a single-task run it also records the main metric's constant-prediction level on the
validation split (`constant_level`, with `constant_n` examples; `partial_lora.training.failed_reading`), so
the run's results can say when its score is no better than ignoring the input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from partial_lora import artifacts
from partial_lora.spec import RunSpec
from partial_lora.tracking import Tracker
from partial_lora.training.failed_reading import constant_level
from partial_lora.training.predict import Predictions
from partial_lora.training.runtime import autocast_dtype, set_seed
from partial_lora.working_set.build import Part, setup_run
from partial_lora.working_set.loaders import loader
from partial_lora.working_set.trained import load_trained

NAME = artifacts.EVALUATE


def run(spec: RunSpec, run_dir: Path, tracker: Tracker | None = None) -> dict[str, Any]:
    set_seed(spec.seed)
    s = setup_run(spec, run_dir)
    load_trained(s, artifacts.stage_dir(run_dir, artifacts.RETRAIN))
    s.built.model.to(s.device)
    table = Predictions(s.device, autocast_dtype(spec.train, s.device))
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)

    def score(p: Part, split: Any, name: str) -> dict[str, float]:
        return table.score(p.view, loader(s, split, spec.train, train=False), p.metrics, name, p.name)

    # Each part (a multi-task run's member) through its own head, then merged: a single task's
    # `<split>_<metric>`, a multi-task run's `<split>_<task>_<metric>` and the mean over members.
    out: dict[str, Any] = {}
    parts = s.parts()
    for split in ("val", "test"):
        merged = s.merge([score(p, getattr(p.data, split), split) for p in parts])
        out.update({f"{split}_{k}": v for k, v in merged.items()})
    for p in parts:  # further evaluation sets (MNLI mismatched): test_[<task>_]<set>_<metric>
        for name, d in p.data.extra.items():
            out.update({f"test_{p.name + '_' if p.name else ''}{name}_{k}": v
                        for k, v in score(p, d, f"test_{name}").items()})
    out.update(s.test_counts())
    if s.multi is None:  # not prefixed val_: results.json's metrics stay the task's own
        outputs, labels = table.seen["val"]
        out.update(constant_level=constant_level(outputs, labels, spec.main_metric), constant_n=len(labels))
    artifacts.write_predictions(artifacts.stage_dir(run_dir, NAME) / artifacts.PREDICTIONS, table.columns())
    out.update(adapter_params=s.adapter_params(), dense_lora_params=s.dense_lora_params,
               head_params=sum(p.numel() for p in s.built.model.head_parameters()))
    if tracker is not None:
        tracker.log({f"{NAME}/{k}": v for k, v in out.items()})
    return out
