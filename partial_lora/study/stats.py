"""Paired comparisons of two methods: per-seed differences, a hierarchical bootstrap CI, a verdict.

A claim "method beats (or matches) control" is judged on the test metric's paired difference,
method minus control, with both run on the same seeds and scored on the same test examples:

- the point estimate is the mean over seeds of the per-seed differences;
- the 95% CI comes from a **hierarchical paired bootstrap**: each replicate resamples the seeds
  with replacement, then, within each drawn seed, the test examples with replacement, and
  scores both methods on the same resampled examples. It thus covers both sources of noise, the
  training seed and the finite test set. The resampling is seeded (`seed`), so the table is
  reproducible. Pooling over tasks averages the tasks' differences in every replicate (tasks
  are fixed strata, not resampled).
- the verdict compares the CI with a margin, in points (1 point = 0.01 of the metric):
  "matches" is non-inferiority at −1 point, "beats" superiority over 0. **holds** when the CI
  lies entirely above the margin, **refuted** when it lies entirely below it, **inconclusive**
  otherwise (a CI touching the margin does not clear it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

from partial_lora.errors import PlrError

MARGINS = {"matches": -1.0, "beats": 0.0}  # in points


@dataclass(frozen=True)
class Paired:
    """One seed's test predictions of both methods on the same examples (aligned by index)."""

    labels: np.ndarray
    method: np.ndarray   # predicted class ids, or regression outputs
    control: np.ndarray

    def __post_init__(self) -> None:
        if not len(self.labels) == len(self.method) == len(self.control) or len(self.labels) == 0:
            raise PlrError(f"paired predictions must cover the same non-empty test set (got {len(self.labels)}, "
                           f"{len(self.method)} and {len(self.control)} rows); rerun the evaluate stage of both runs")


def _accuracy(labels: np.ndarray, pred: np.ndarray) -> np.ndarray:
    return (labels == pred).mean(axis=-1)


def _pearson(labels: np.ndarray, pred: np.ndarray) -> np.ndarray:
    r = sps.pearsonr(pred, labels, axis=-1).statistic
    return np.nan_to_num(r, nan=0.0)  # a constant prediction has no correlation: 0, as in metrics.py


def _spearman(labels: np.ndarray, pred: np.ndarray) -> np.ndarray:
    return _pearson(sps.rankdata(labels, axis=-1), sps.rankdata(pred, axis=-1))


def _by_row(fn):
    def metric(labels: np.ndarray, pred: np.ndarray) -> np.ndarray:
        labels, pred = np.atleast_2d(labels), np.atleast_2d(pred)
        return np.array([fn(y, p) for y, p in zip(labels, pred, strict=True)])
    return metric


def _sk(name: str):
    from sklearn import metrics as skm

    if name == "macro_f1":
        return _by_row(lambda y, p: skm.f1_score(y, p, average="macro"))
    if name == "f1":
        return _by_row(lambda y, p: skm.f1_score(y, p, average="binary" if len(np.unique(y)) <= 2 else "macro"))
    if name == "mcc":
        return _by_row(skm.matthews_corrcoef)
    raise PlrError(f"no paired bootstrap for metric '{name}'; use accuracy, macro_f1, f1, mcc, pearson or spearman")


def metric_fn(name: str):
    """Metric of (labels, predictions), vectorised over leading axes (rows = bootstrap replicates)."""
    return {"accuracy": _accuracy, "pearson": _pearson, "spearman": _spearman}.get(name) or _sk(name)


@dataclass(frozen=True)
class Comparison:
    """A paired comparison's numbers (differences in points)."""

    mean: float
    per_seed: tuple[float, ...]
    low: float
    high: float
    seeds: tuple[int, ...]

    def verdict(self, kind: str) -> str:
        return verdict(self.low, self.high, kind)


def verdict(low: float, high: float, kind: str) -> str:
    """`holds` / `refuted` / `inconclusive` for a CI [low, high] in points against the claim's margin."""
    if kind not in MARGINS:
        raise PlrError(f"unknown claim kind '{kind}'; use one of: {', '.join(MARGINS)}")
    margin = MARGINS[kind]
    if low > margin:
        return "holds"
    if high < margin:
        return "refuted"
    return "inconclusive"


def compare(tasks: Sequence[Mapping[int, Paired]], metrics: Sequence[str], *, n_boot: int = 2000,
            seed: int = 0, level: float = 0.95) -> Comparison:
    """Method minus control, in points, for one task (one mapping) or pooled over several.

    Args:
        tasks: per task, seed -> that seed's paired predictions; every task needs at least one seed.
        metrics: each task's main metric.
        n_boot: bootstrap replicates.
        seed: the resampling seed.
        level: the CI's coverage.
    """
    if not tasks or any(not t for t in tasks):
        raise PlrError("a paired comparison needs at least one seed of both methods on every task")
    rng = np.random.default_rng(seed)
    per_task: list[dict[int, float]] = []
    boot = np.zeros(n_boot)
    for by_seed, name in zip(tasks, metrics, strict=True):
        fn = metric_fn(name)
        seeds = sorted(by_seed)
        per_task.append({s: float(fn(p.labels[None], p.method[None])[0] - fn(p.labels[None], p.control[None])[0])
                         for s, p in ((s, by_seed[s]) for s in seeds)})
        drawn = rng.integers(0, len(seeds), size=(n_boot, len(seeds)))  # seeds, with replacement
        replicate = np.zeros(n_boot)
        for j in range(len(seeds)):  # each drawn seed resamples its test examples afresh
            for k, s in enumerate(seeds):
                rows = np.flatnonzero(drawn[:, j] == k)
                if rows.size == 0:
                    continue
                p = by_seed[s]
                idx = rng.integers(0, len(p.labels), size=(rows.size, len(p.labels)))
                replicate[rows] += fn(p.labels[idx], p.method[idx]) - fn(p.labels[idx], p.control[idx])
        boot += replicate / len(seeds)
    boot /= len(tasks)
    alpha = (1 - level) / 2
    low, high = np.quantile(boot, [alpha, 1 - alpha])
    common = sorted(set.intersection(*(set(t) for t in per_task)))
    per_seed = [float(np.mean([t[s] for t in per_task])) for s in common]
    return Comparison(mean=100 * float(np.mean([np.mean(list(t.values())) for t in per_task])),
                      per_seed=tuple(100 * d for d in per_seed), low=100 * float(low), high=100 * float(high),
                      seeds=tuple(common))
