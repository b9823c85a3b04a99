"""Task metrics from scikit-learn and SciPy (never hand-written), and a mean log-likelihood.

Every metric takes (logits, labels) as numpy arrays and returns a float where higher is better.
Classification metrics use argmax predictions; regression metrics (a single-logit head) use the
raw outputs. The GLUE metrics: CoLA `mcc`; MRPC and QQP `f1` (of the positive class) and
`accuracy`; STS-B `pearson` and `spearman`; the rest `accuracy`. Generation tasks report `log_likelihood`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from types import ModuleType

import numpy as np

from partial_lora.errors import PlrError


# scipy.stats and sklearn.metrics are imported on first use, not with this module: together they take
# a second or more, which every `plr` process (a config error included) would otherwise pay at start.
def _skm() -> ModuleType:
    from sklearn import metrics

    return metrics


def _stats() -> ModuleType:
    from scipy import stats

    return stats


def _pred(logits: np.ndarray) -> np.ndarray:
    return logits.argmax(-1)


def _f1(logits: np.ndarray, labels: np.ndarray) -> float:
    # Binary tasks (MRPC, QQP) report F1 of the positive class; multi-class uses macro F1.
    average = "binary" if logits.shape[-1] == 2 else "macro"
    return float(_skm().f1_score(labels, _pred(logits), average=average))


def _correlation(name: str) -> Callable[[np.ndarray, np.ndarray], float]:
    """scipy.stats' `name` (pearsonr, spearmanr) of the first output column against the labels."""

    def metric(logits: np.ndarray, labels: np.ndarray) -> float:
        stats = _stats()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", stats.ConstantInputWarning)
            r = float(getattr(stats, name)(logits.reshape(len(labels), -1)[:, 0], labels).statistic)
        # A constant prediction (e.g. an untrained head) has no correlation: score it 0, not NaN,
        # so checkpoint selection and the allocator's comparisons stay well defined.
        return 0.0 if np.isnan(r) else r

    return metric


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": lambda lo, la: float(_skm().accuracy_score(la, _pred(lo))),
    "f1": _f1,
    "macro_f1": lambda lo, la: float(_skm().f1_score(la, _pred(lo), average="macro")),
    "mcc": lambda lo, la: float(_skm().matthews_corrcoef(la, _pred(lo))),
    "pearson": _correlation("pearsonr"),
    "spearman": _correlation("spearmanr"),
    # Generation (one "choice", the response): the mean over examples of the gold answer's score,
    # its log-likelihood (per token with task.scoring=mean). Higher is better, like the others.
    "log_likelihood": lambda lo, la: float(np.mean(lo[np.arange(len(la)), la.astype(int)])),
}


REGRESSION_METRICS = ("pearson", "spearman")  # what scores a regression task (task.regression=true)


def compute_metrics(logits: np.ndarray, labels: np.ndarray, names: Iterable[str]) -> dict[str, float]:
    """The named metrics of one evaluation."""
    out = {}
    for name in names:
        if name not in METRICS:
            raise PlrError(f"unknown metric '{name}'; set task.metrics to names from: {', '.join(METRICS)}")
        out[name] = METRICS[name](logits, labels)
    return out
