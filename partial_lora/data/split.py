"""The split policy: named source splits when given, else stratified seeded carving from train.

Fractions are of the source train split: with the defaults (test 0.2, val 0.1) a task without
its own val/test splits ends up 70/10/20. Everything is seeded by `spec.split_seed`, so the
same spec always gives identical splits, whatever the training seed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import datasets
import numpy as np
from sklearn.model_selection import train_test_split

from partial_lora.data.base import TaskSpec
from partial_lora.errors import PlrError

log = logging.getLogger(__name__)


Splits = tuple[datasets.Dataset, datasets.Dataset, datasets.Dataset]


def split_task(spec: TaskSpec, splits: Mapping[str, datasets.Dataset]) -> Splits:
    """Choose or carve train/val/test, then subsample them.

    Args:
        spec: the task; uses the split names, fractions, seed and sample caps.
        splits: the source splits by name, each with an int `label` column.

    Returns:
        (train, val, test).

    Raises:
        PlrError: an unknown or empty split name, or fractions that leave no training data.
    """
    train = _named(spec, splits, "train_split", spec.train_split)
    for key in ("val_split", "test_split"):
        if getattr(spec, key) == spec.train_split:
            raise PlrError(f"task.{key}='{spec.train_split}' is also task.train_split, which would evaluate on "
                           f"training data; set task.{key}=null to carve it from train, or another split")
    n = len(train)
    test_n = _carved_size(spec, "test_fraction", n) if spec.test_split is None else 0
    val_n = _carved_size(spec, "val_fraction", n) if spec.val_split is None else 0
    if n - test_n - val_n < 1:
        raise PlrError(f"task.val_fraction={spec.val_fraction} and task.test_fraction={spec.test_fraction} leave no "
                       f"training examples out of {n}; lower them")
    if spec.test_split is None:
        train, test = _carve(train, test_n, spec.split_seed)
    else:
        test = _named(spec, splits, "test_split", spec.test_split)
    if spec.val_split is None:
        train, val = _carve(train, val_n, spec.split_seed)
    else:
        val = _named(spec, splits, "val_split", spec.val_split)
    return (_subsample(train, spec.max_train_samples, "max_train_samples", spec.split_seed),
            _subsample(val, spec.max_eval_samples, "max_eval_samples", spec.split_seed),
            _subsample(test, spec.max_eval_samples, "max_eval_samples", spec.split_seed))


def _named(spec: TaskSpec, splits: Mapping[str, datasets.Dataset], key: str, name: str) -> datasets.Dataset:
    if name not in splits:
        raise PlrError(f"task.{key}='{name}' is not a split of the dataset (splits: {', '.join(splits)}); "
                       f"set task.{key}=<one of those>")
    if len(splits[name]) == 0:
        fix = "another split" if key == "train_split" else "null to carve it from train"
        raise PlrError(f"task.{key}='{name}' has no labelled examples (e.g. a GLUE test split, labelled -1); "
                       f"set task.{key}={fix}")
    return splits[name]


def _carved_size(spec: TaskSpec, key: str, n: int) -> int:
    fraction = getattr(spec, key)
    if not 0 < fraction < 1:
        raise PlrError(f"task.{key}={fraction} must be between 0 and 1 (exclusive); set task.{key}=<e.g. 0.1>")
    return max(1, round(fraction * n))


def _labels(ds: datasets.Dataset) -> np.ndarray:
    return np.asarray(ds["label"])


def _carve(ds: datasets.Dataset, size: int, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split `size` rows off `ds`, stratified by label when every class allows it.

    Returns:
        (the rest, the carved rows), each in source order.
    """
    idx = np.arange(len(ds))
    labels = _labels(ds)
    try:
        rest, carved = train_test_split(idx, test_size=size, random_state=seed, stratify=labels)
    except ValueError as e:
        # sklearn refuses to stratify when a class has a single member or `size` is smaller
        # than the number of classes; a random split is the best that data allows.
        log.warning("stratified split impossible (%s); splitting at random instead", e)
        rest, carved = train_test_split(idx, test_size=size, random_state=seed)
    return ds.select(np.sort(rest)), ds.select(np.sort(carved))


def _subsample(ds: datasets.Dataset, limit: int | None, key: str, seed: int) -> datasets.Dataset:
    """A seeded, stratified subset of at most `limit` rows (all rows when `limit` is None)."""
    if limit is None or limit >= len(ds):
        return ds
    if limit < 1:
        raise PlrError(f"task.{key}={limit} must be a positive number of examples; set task.{key}=null to use all")
    return _carve(ds, limit, seed)[1]


def few_shot(ds: datasets.Dataset, shots: int, val_shots: int, seed: int,
             label_names: list[str] | None = None) -> tuple[list[int], list[int]]:
    """Two disjoint few-shot subsets of `ds` with `shots` and `val_shots` examples per class.

    Returns:
        (train indices, validation indices) into `ds`, each sorted.

    Raises:
        PlrError: when a class has fewer than `shots + val_shots` examples.
    """
    if shots < 1 or val_shots < 1:
        raise PlrError(f"adapter.probe.shots and val_shots must be >= 1, got {shots} and {val_shots}")
    labels = _labels(ds)
    n_classes = len(label_names) if label_names else int(labels.max()) + 1
    rng = np.random.default_rng(seed)
    train: list[int] = []
    val: list[int] = []
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < shots + val_shots:
            name = label_names[c] if label_names else str(c)
            raise PlrError(f"adapter.probe.shots={shots} + val_shots={val_shots} per class is more than class "
                           f"'{name}' has in the training split ({len(idx)}); lower adapter.probe.shots/val_shots")
        perm = rng.permutation(idx)
        train += perm[:shots].tolist()
        val += perm[shots:shots + val_shots].tolist()
    return sorted(train), sorted(val)
