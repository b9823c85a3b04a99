"""A failed reading is never silent: the two signs that a run's number measures a failure [ours].

1. **Every layer at the grid's floor.** The threshold search (or truncation) ended with every
   layer at the smallest keep ratio of `adapter.allocation.grid`: the few-shot target was met
   even then, so the search told no layer from another, and the adapter is the smallest the grid
   allows.
2. **A validation score near the constant-prediction level.** The constant-prediction level of a
   metric is the best score a prediction that ignores its input gets on the validation labels:
   for a classifier, the best of "always class c" over the classes (the majority class's share
   for accuracy; for F1, the positive class's 2p/(1+p)); for MCC, Pearson and Spearman it is 0
   (a constant has no correlation, and plr scores it 0). "Near" is within two standard errors
   of that level on the n validation examples: 2·sqrt(level·(1 − level)/n) for accuracy and F1
   (a proportion's standard error at the level; at least 0.01), and 2/sqrt(n) for MCC and the
   correlations (a correlation's standard error around 0). Not checked: the log-likelihood of
   generation tasks and the mean over a multi-task run's members.

Each sign becomes one line in the run's results table (`pipeline.results.format_results`), in
`results.json` (`failed_reading`) and in its log, naming the likely cause and the setting that
avoids it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from partial_lora.training.metrics import compute_metrics

PROPORTIONS = ("accuracy", "f1", "macro_f1")
CORRELATIONS = ("mcc", "pearson", "spearman")
SEARCHES = ("threshold", "truncation")  # the allocators whose floor is a finding, not a budget


def constant_level(n_outputs: int, labels: np.ndarray, metric: str) -> float | None:
    """The best `metric` a constant prediction scores on `labels` (None: not defined for it).

    Args:
        n_outputs: the model's outputs per example (classes or choices; 1 for a regression head).
        labels: the validation labels.
        metric: a name from `partial_lora.training.metrics.METRICS`.
    """
    if metric in CORRELATIONS:
        return 0.0
    if metric not in PROPORTIONS or n_outputs < 2 or len(labels) == 0:
        return None
    best = -math.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn warns on the F1 of a class never predicted
        for c in range(n_outputs):
            logits = np.zeros((len(labels), n_outputs), dtype=np.float32)
            logits[:, c] = 1.0
            best = max(best, compute_metrics(logits, labels, [metric])[metric])
    return float(best)


def tolerance(metric: str, level: float, n: int) -> float:
    """How far above the constant-prediction level a score still counts as near it (see the module)."""
    if metric in CORRELATIONS:
        return 2.0 / math.sqrt(max(1, n))
    return max(0.01, 2.0 * math.sqrt(max(0.0, level * (1.0 - level)) / max(1, n)))


def floor_line(allocation: Mapping[str, Any], grid: list[float], adapter_params: int | None,
               relative_to: str | None) -> str | None:
    """The line for an allocation with every layer at the grid's floor (None: it is not)."""
    if (allocation.get("allocator") not in SEARCHES or not grid or min(grid) >= 1
            or (allocation.get("floor_share") or 0.0) < 1.0):  # a grid of only 1: dense, nothing was searched
        return None
    fix = ("adapter.allocation.relative_to=gain (the target counts the probe's gain over no adapter; "
           "or experiment=partial-best)" if relative_to == "probe"
           else "a higher adapter.allocation.tau, or more adapter.probe.val_shots")
    params = "" if adapter_params is None else f", {adapter_params:,} adapter entries"
    return (f"failed reading: every layer ended at the grid's floor (keep ratio {min(grid):g}{params}), so the "
            f"search told no layer from another; likely cause: the few-shot target "
            f"({_num(allocation.get('target'))}) is met even with every layer at the floor (few-shot score there "
            f"{_num(allocation.get('joint_accuracy'))}); avoid it with {fix}")


def constant_line(metric: str, value: float | None, level: float | None, n: int | None, lr: float,
                  scale: float | None, sparse: bool, lr_key: str = "trainer.lr") -> str | None:
    """The line for a validation score near the constant-prediction level (None: it is not). `lr_key`
    names the setting `lr` came from (`retrain.lr`, when set, is the adapter's rate with no scale)."""
    if value is None or level is None or not n:
        return None
    tol = tolerance(metric, level, n)
    if value > level + tol:
        return None
    what = "a constant prediction's score" if metric in CORRELATIONS else "always predicting one class"
    rate = f"{lr_key} {lr:g}" + ("" if scale is None or scale == 1 else
                                 f" x retrain.adapter_lr_scale {scale:.2f} = {lr * scale:.3g}")
    fix = f"a {lr_key} chosen on the validation split" + (
        " (or retrain.lr_scale_per_layer=true, which kept the study's sparse runs from collapsing)"
        if sparse and lr_key == "trainer.lr" else "")
    return (f"failed reading: validation {metric} {value:.4f} is within {tol:.3f} of {level:.4f}, what {what} "
            f"scores on the {n} validation examples; likely cause: the adapter's learning rate ({rate}): too high "
            f"collapses training to one answer, too low never leaves it; avoid it with {fix}")


def _num(x: Any) -> str:
    return "-" if x is None else f"{x:.4f}"
