"""The split policy: named source splits when given, else stratified seeded carving from train.

Fractions are of the source train split: with the defaults (test 0.2, val 0.1) a task without
its own val/test splits ends up 70/10/20. Everything is seeded by `spec.split_seed`, so the
same spec always gives identical splits, whatever the training seed.

`protocol=1k` (also called `vtab1k`) draws 800 train + 200 val examples from the train split and
keeps the test split whole. Regression labels (floats) are carved at random: there are no classes
to stratify.

With `task.group_column` (Rotten Tomatoes: the movie), every carving moves whole groups: the
groups are shuffled with `split_seed` and taken until the carved part has its size, so no group
is ever in two splits. The 1k protocol then first sets aside a validation pool of whole groups
(the val share of the rows) and draws its 800 + 200 examples, stratified, from the two pools.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import datasets
import numpy as np

from partial_lora.data.base import PROTOCOLS, Kind, TaskData, TaskSpec
from partial_lora.errors import PlrError

log = logging.getLogger(__name__)


Splits = tuple[datasets.Dataset, datasets.Dataset, datasets.Dataset]


def task_data(spec: TaskSpec, kind: Kind, splits: Mapping[str, datasets.Dataset],
              label_names: list[str]) -> TaskData:
    """Apply the split policy to a loader's standardised source splits (the last step of every loader)."""
    train, val, test = split_task(spec, splits)
    return TaskData(spec.name, kind, train, val, test, label_names, extra=eval_sets(spec, splits),
                    regression=spec.regression)


def used_splits(spec: TaskSpec) -> dict[str, str]:
    """Every source split a run of `spec` reads: config key (`test_split`, `eval_splits.<name>`) -> split.

    Only these are downloaded and prepared (SVHN's 531k-image `extra` split never is). The val
    split is unused under `protocol=1k`/`vtab1k`, which draws validation from train.
    """
    keys = {"train_split": spec.train_split}
    if spec.val_split is not None and spec.protocol not in ("1k", "vtab1k"):
        keys["val_split"] = spec.val_split
    if spec.test_split is not None:
        keys["test_split"] = spec.test_split
    keys.update({f"eval_splits.{name}": split for name, split in spec.eval_splits.items()})
    return keys


def missing_split(key: str, name: str, splits: Sequence[str]) -> PlrError:
    """The one-line error for a `task.<key>` that names no split of the dataset."""
    return PlrError(f"task.{key}='{name}' is not a split of the dataset (splits: {', '.join(splits)}); "
                    f"set task.{key}=<one of those>")


def eval_sets(spec: TaskSpec, splits: Mapping[str, datasets.Dataset]) -> dict[str, datasets.Dataset]:
    """The further evaluation sets of `spec.eval_splits` (name -> split), subsampled like test."""
    out = {}
    for name, split in spec.eval_splits.items():
        if split == spec.train_split:
            raise PlrError(f"task.eval_splits.{name}='{split}' is the training split; name a held-out split")
        ds = _named(spec, splits, f"eval_splits.{name}", split)
        out[name] = _subsample(ds, spec.max_eval_samples, "max_eval_samples", spec.split_seed)
    return out


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
    if spec.protocol not in PROTOCOLS:
        raise PlrError(f"task.protocol='{spec.protocol}' is unknown; "
                       f"set task.protocol=<one of: {', '.join(PROTOCOLS)}>")
    train = _named(spec, splits, "train_split", spec.train_split)
    for key in ("val_split", "test_split"):
        if getattr(spec, key) == spec.train_split:
            raise PlrError(f"task.{key}='{spec.train_split}' is also task.train_split, which would evaluate on "
                           f"training data; set task.{key}=null to carve it from train, or another split")
    n = len(train)
    test_n = _carved_size(spec, "test_fraction", n) if spec.test_split is None else 0
    val_n = _carved_size(spec, "val_fraction", n) if spec.val_split is None else 0
    if spec.val_max is not None:
        if spec.val_max < 1:
            raise PlrError(f"task.val_max={spec.val_max} must be a positive number of examples (or null)")
        val_n = min(val_n, spec.val_max)
    if n - test_n - val_n < 1:
        raise PlrError(f"task.val_fraction={spec.val_fraction} and task.test_fraction={spec.test_fraction} leave no "
                       f"training examples out of {n}; lower them")
    group = _group_column(spec, train)
    if spec.test_split is None:
        train, test = _carve(train, test_n, spec.split_seed, group)
    else:
        test = _named(spec, splits, "test_split", spec.test_split)
    if spec.protocol in ("1k", "vtab1k"):
        train, val = _vtab1k(spec, train, group)
    elif spec.val_split is None:
        train, val = _carve(train, val_n, spec.split_seed, group)
    else:
        val = _named(spec, splits, "val_split", spec.val_split)
    return (_subsample(train, spec.max_train_samples, "max_train_samples", spec.split_seed),
            _subsample(val, spec.max_eval_samples, "max_eval_samples", spec.split_seed),
            _subsample(test, spec.max_eval_samples, "max_eval_samples", spec.split_seed))


def _group_column(spec: TaskSpec, train: datasets.Dataset) -> str | None:
    if spec.group_column is not None and spec.group_column not in train.column_names:
        raise PlrError(f"task.group_column='{spec.group_column}' is not a column of the data (columns: "
                       f"{', '.join(train.column_names)}); set it to one of those or null")
    return spec.group_column


def _vtab1k(spec: TaskSpec, train: datasets.Dataset,
            group: str | None = None) -> tuple[datasets.Dataset, datasets.Dataset]:
    """VTAB-1k: `vtab_train` + `vtab_val` examples drawn with `split_seed` from the train split."""
    if spec.vtab_train < 1 or spec.vtab_val < 1:
        raise PlrError(f"task.vtab_train={spec.vtab_train} and task.vtab_val={spec.vtab_val} must be >= 1")
    want = spec.vtab_train + spec.vtab_val
    if len(train) < want:
        raise PlrError(f"task.protocol={spec.protocol} needs {want} training examples but the train split has "
                       f"{len(train)}; set task.protocol=full (or lower task.vtab_train / task.vtab_val)")
    if group is None:
        _, drawn = _carve(train, want, spec.split_seed) if len(train) > want else (None, train)
        return _carve(drawn, spec.vtab_val, spec.split_seed)
    rest, pool = _carve(train, round(len(train) * spec.vtab_val / want), spec.split_seed, group)
    if len(rest) < spec.vtab_train or len(pool) < spec.vtab_val:
        raise PlrError(f"task.protocol={spec.protocol} with task.group_column={group}: the groups leave "
                       f"{len(rest)} + {len(pool)} examples, fewer than {spec.vtab_train} + {spec.vtab_val}; set "
                       "task.protocol=full")
    return _draw(rest, spec.vtab_train, spec.split_seed), _draw(pool, spec.vtab_val, spec.split_seed)


def _draw(ds: datasets.Dataset, size: int, seed: int) -> datasets.Dataset:
    """Exactly `size` rows of `ds`, stratified (all of it when it has exactly that many)."""
    return ds if len(ds) == size else _carve(ds, size, seed)[1]


def _named(spec: TaskSpec, splits: Mapping[str, datasets.Dataset], key: str, name: str) -> datasets.Dataset:
    if name not in splits:
        raise missing_split(key, name, list(splits))
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


def column(ds: datasets.Dataset, name: str) -> np.ndarray:
    """One column as a numpy array, read through Arrow in one go (a `select`'s row order included).

    `np.asarray(ds[name])` walks the column row by row in `datasets` 4+, about 40x slower: it was a
    tenth of a smoke run's wall time, since every stage carves its splits again."""
    return _arrow(ds, name).to_numpy()


def cells(ds: datasets.Dataset, name: str) -> list:
    """One column as Python values (None for a null), read through Arrow like `column`: for checks
    that look at each cell's type."""
    return _arrow(ds, name).to_pylist()


def _arrow(ds: datasets.Dataset, name: str):  # -> pyarrow.ChunkedArray
    return ds.select_columns([name]).with_format("arrow")[:][name]


def _labels(ds: datasets.Dataset) -> np.ndarray:
    return column(ds, "label")


def _is_regression(labels: np.ndarray) -> bool:
    return labels.dtype.kind == "f"


def _carve(ds: datasets.Dataset, size: int, seed: int,
           group: str | None = None) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split `size` rows off `ds`, stratified by label when every class allows it.

    With `group`, whole groups are carved instead (shuffled with `seed`, taken until the carved
    rows reach `size`), so the carved part can be slightly larger than `size`.

    Returns:
        (the rest, the carved rows), each in source order.
    """
    if group is not None:
        return _carve_groups(ds, size, seed, group)
    from sklearn.model_selection import train_test_split  # here: importing sklearn takes a second or more

    idx = np.arange(len(ds))
    labels = _labels(ds)
    if _is_regression(labels):
        rest, carved = train_test_split(idx, test_size=size, random_state=seed)
        return ds.select(np.sort(rest)), ds.select(np.sort(carved))
    try:
        rest, carved = train_test_split(idx, test_size=size, random_state=seed, stratify=labels)
    except ValueError as e:
        # sklearn refuses to stratify when a class has a single member or `size` is smaller
        # than the number of classes; a random split is the best that data allows.
        log.warning("stratified split impossible (%s); splitting at random instead", e)
        rest, carved = train_test_split(idx, test_size=size, random_state=seed)
    return ds.select(np.sort(rest)), ds.select(np.sort(carved))


def _carve_groups(ds: datasets.Dataset, size: int, seed: int,
                  group: str) -> tuple[datasets.Dataset, datasets.Dataset]:
    names, inverse, counts = np.unique(column(ds, group).astype(str), return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(names))
    taken = order[:int(np.searchsorted(np.cumsum(counts[order]), size)) + 1]
    if len(taken) >= len(names):
        raise PlrError(f"task.group_column={group}: carving {size} of {len(ds)} rows would take every one of the "
                       f"{len(names)} groups; lower the fractions or set task.group_column=null")
    carved = np.isin(inverse, taken)
    return ds.select(np.flatnonzero(~carved)), ds.select(np.flatnonzero(carved))


def _subsample(ds: datasets.Dataset, limit: int | None, key: str, seed: int) -> datasets.Dataset:
    """A seeded, stratified subset of at most `limit` rows (all rows when `limit` is None)."""
    if limit is None or limit >= len(ds):
        return ds
    if limit < 1:
        raise PlrError(f"task.{key}={limit} must be a positive number of examples; set task.{key}=null to use all")
    return _carve(ds, limit, seed)[1]


def few_shot(ds: datasets.Dataset, shots: int, val_shots: int, seed: int,
             label_names: list[str] | None = None, short_classes: str = "shrink") -> tuple[list[int], list[int]]:
    """Two disjoint few-shot subsets of `ds` with `shots` and `val_shots` examples per class.

    Regression scores (STS-B) have no classes: [ours] "per class" then means per quintile of
    the score, so both subsets span the score range.

    Args:
        short_classes: what to do with a class that has fewer than `shots + val_shots`
            examples (VTAB-1k's 800 training images leave CIFAR-100 about 8 per class):
            `shrink` [ours]: split what the class has in the ratio shots : val_shots, at least
            one example for training (a class with no example is skipped), with a warning; or
            `error`.

    Returns:
        (train indices, validation indices) into `ds`, each sorted.

    Raises:
        PlrError: with `short_classes=error`, when a class has fewer than `shots + val_shots`.
    """
    if shots < 1 or val_shots < 1:
        raise PlrError(f"adapter.probe.shots and val_shots must be >= 1, got {shots} and {val_shots}")
    if short_classes not in ("error", "shrink"):
        raise PlrError(f"adapter.probe.short_classes must be error or shrink, got '{short_classes}'")
    labels = _labels(ds)
    if _is_regression(labels):
        edges = np.quantile(labels, [0.2, 0.4, 0.6, 0.8])
        labels = np.searchsorted(edges, labels, side="right")
        label_names = [f"score quintile {q + 1}" for q in range(5)]
    n_classes = len(label_names) if label_names else int(labels.max()) + 1
    rng = np.random.default_rng(seed)
    train: list[int] = []
    val: list[int] = []
    short = []
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)
        n_train, n_val = shots, val_shots
        if len(idx) < shots + val_shots:
            name = label_names[c] if label_names else str(c)
            if short_classes == "error":
                raise PlrError(f"adapter.probe.shots={shots} + val_shots={val_shots} per class is more than class "
                               f"'{name}' has in the training split ({len(idx)}); lower adapter.probe.shots/"
                               f"val_shots or set adapter.probe.short_classes=shrink")
            short.append(name)
            n_train = min(len(idx), max(1, round(len(idx) * shots / (shots + val_shots))))
            n_val = len(idx) - n_train
        perm = rng.permutation(idx)
        train += perm[:n_train].tolist()
        val += perm[n_train:n_train + n_val].tolist()
    if short:
        log.warning("few-shot probe: %d of %d classes have fewer than %d examples (e.g. '%s'); each was split "
                    "%d:%d as far as it goes (adapter.probe.short_classes=shrink)", len(short), n_classes,
                    shots + val_shots, short[0], shots, val_shots)
    if not val:
        raise PlrError("the few-shot validation set is empty (every class is too small); lower adapter.probe.shots")
    return sorted(train), sorted(val)
