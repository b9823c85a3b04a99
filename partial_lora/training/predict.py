"""Prediction over a loader: logits, labels and mean loss (`predict`), and task metrics from them (`evaluate`).

`loop.fit` validates with `evaluate` after its epochs; the allocation search calls `predict`, and the
evaluate stage scores its splits through `Predictions`, which keeps every example's prediction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import Tensor

from partial_lora.errors import PlrError
from partial_lora.models.classifier import Classifier
from partial_lora.training.metrics import compute_metrics
from partial_lora.training.runtime import to_device


@torch.no_grad()
def predict(model: Classifier, loader: Iterable[Mapping[str, Tensor]], device: torch.device,
            dtype: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Logits, labels and mean loss over a loader (model put in eval mode, then restored)."""
    was_training = model.training
    model.eval()
    all_logits, all_labels, loss_sum, n = [], [], 0.0, 0
    for batch in loader:
        batch = to_device(batch, device)
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


class Predictions:
    """Scores of evaluated splits, each split's per-example rows gathered for `predictions.parquet`,
    and its outputs per example and labels kept by split name (`seen`)."""

    def __init__(self, device: torch.device, dtype: torch.dtype | None) -> None:
        self.device, self.dtype = device, dtype
        self.parts: list[dict[str, np.ndarray]] = []
        self.seen: dict[str, tuple[int, np.ndarray]] = {}

    def score(self, model: Classifier, loader: Iterable[Mapping[str, Tensor]], metrics: list[str], split: str,
              task: str = "") -> dict[str, float]:
        """The split's task metrics and mean loss; its rows are recorded under `split` (and `task`)."""
        logits, labels, loss = predict(model, loader, self.device, self.dtype)
        self.add(split, task, logits, labels)
        self.seen[split] = (logits.shape[-1], labels)
        return {**compute_metrics(logits, labels, metrics), "loss": loss}

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
