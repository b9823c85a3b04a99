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

import numpy as np
import torch
from partial_lora import artifacts as A
from partial_lora.training.failed_reading import constant_level
from partial_lora.training.metrics import compute_metrics
from partial_lora.training.predict import predict
from partial_lora.training.runtime import autocast_dtype, set_seed
from partial_lora.spec import RunSpec
from partial_lora.working_set.trained import load_trained
from partial_lora.working_set.loaders import loader
from partial_lora.working_set.build import setup_run
from partial_lora.tracking import Tracker

NAME = A.EVALUATE


def run(spec: RunSpec, run_dir: Path, tracker: Tracker | None = None) -> dict[str, Any]:
    set_seed(spec.seed)
    s = setup_run(spec, run_dir)
    load_trained(s, A.stage_dir(run_dir, A.RETRAIN))
    tc = spec.train
    s.built.model.to(s.device)
    dtype = autocast_dtype(tc, s.device)
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    out: dict[str, Any] = {}
    table = Predictions()
    seen: dict[str, tuple[int, np.ndarray]] = {}  # split -> (outputs per example, labels), a single task's

    def score(view: Any, split: Any, metrics: list[str], split_name: str, task: str = "") -> dict[str, float]:
        logits, labels, loss = predict(view, loader(s, split, tc, train=False), s.device, dtype)
        table.add(split_name, task, logits, labels)
        seen[split_name] = (logits.shape[-1], labels)
        return {**compute_metrics(logits, labels, metrics), "loss": loss}

    # Each part (a multi-task run's member) through its own head, then merged: a single task's
    # `<split>_<metric>`, a multi-task run's `<split>_<task>_<metric>` and the mean over members.
    parts = s.parts()
    for split_name in ("val", "test"):
        per_part = [score(p.view, getattr(p.data, split_name), p.metrics, split_name, p.name) for p in parts]
        out.update({f"{split_name}_{k}": v for k, v in s.merge(per_part).items()})
    for p in parts:  # further evaluation sets (MNLI mismatched): test_[<task>_]<set>_<metric>
        for name, d in p.data.extra.items():
            for k, v in score(p.view, d, p.metrics, f"test_{name}", p.name).items():
                out[f"test_{p.name + '_' if p.name else ''}{name}_{k}"] = v
    out.update(s.test_counts())
    if s.multi is None:  # not prefixed val_: results.json's metrics stay the task's own
        outputs, labels = seen["val"]
        out.update(constant_level=constant_level(outputs, labels, spec.main_metric), constant_n=len(labels))
    A.write_predictions(A.stage_dir(run_dir, NAME) / A.PREDICTIONS, table.columns())
    out.update(adapter_params=s.adapter_params(), dense_lora_params=s.dense_lora_params,
               head_params=sum(p.numel() for p in s.built.model.head_parameters()))
    if tracker is not None:
        tracker.log({f"{NAME}/{k}": v for k, v in out.items()})
    return out


class Predictions:
    """Per-example rows of every evaluated split, gathered for `predictions.parquet`."""

    def __init__(self) -> None:
        self.parts: list[dict[str, np.ndarray]] = []

    def add(self, split: str, task: str, logits: np.ndarray, labels: np.ndarray) -> None:
        n = len(labels)
        if logits.shape[-1] == 1:  # a regression head: the output is the prediction
            pred = score = logits.reshape(n).astype(np.float64)
        else:
            finite = np.where(np.isfinite(logits), logits, -np.inf)  # padded-out choices are -inf
            probs = np.exp(finite - finite.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            pred = logits.argmax(-1)
            score = probs[np.arange(n), pred]
        self.parts.append({"split": np.full(n, split), "task": np.full(n, task), "index": np.arange(n),
                           "label": labels, "prediction": pred, "score": score})

    def columns(self) -> dict[str, np.ndarray]:
        keys = ("split", "task", "index", "label", "prediction", "score")
        return {k: np.concatenate([p[k] for p in self.parts]) for k in keys}
