"""Prediction over a loader: logits, labels and mean loss (`predict`), and task metrics from them (`evaluate`).

`loop.fit` validates with `evaluate` after its epochs; the allocate and evaluate stages call `predict`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import Tensor

from partial_lora.models.classifier import Classifier
from partial_lora.errors import PlrError
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
