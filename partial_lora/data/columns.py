"""Bring a source dataset to the standard columns: `text`/`text_pair`/`image` and an int `label`."""

from __future__ import annotations

import logging

import datasets

from partial_lora.errors import PlrError

log = logging.getLogger(__name__)

_INT_DTYPES = {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}
_STR_DTYPES = {"string", "large_string"}
_FLOAT_DTYPES = {"float16", "float32", "float64"}


def select_columns(dd: datasets.DatasetDict, mapping: dict[str, tuple[str, str]]) -> datasets.DatasetDict:
    """Keep only the mapped columns, renamed to their standard names.

    Args:
        dd: the source splits.
        mapping: standard name -> (source column, config key that names it), e.g.
            `{"text": ("sentence1", "task.text_column")}`.

    Raises:
        PlrError: a source column is missing from some split.
    """
    out = {}
    for split, ds in dd.items():
        for source, key in mapping.values():
            if source not in ds.column_names:
                raise PlrError(f"{key}='{source}' is not a column of the dataset (split '{split}', columns: "
                               f"{', '.join(ds.column_names)}); set {key}=<one of those>")
        ds = ds.select_columns([source for source, _ in mapping.values()])
        out[split] = ds.rename_columns({source: std for std, (source, _) in mapping.items() if source != std})
    return datasets.DatasetDict(out)


def _refuse_blank_ids(dd: datasets.DatasetDict, key: str) -> None:
    """Whole-number class ids with some cells blank: csv readers turn the column into floats (NaN)."""
    blank, whole = [], True
    for split, ds in dd.items():
        for i, v in enumerate(ds["label"]):
            if v is None or v != v:
                blank.append((split, i))
            elif float(v) != int(v):
                whole = False
                break
    if blank and whole:
        split, row = blank[0]
        raise PlrError(f"{key} has {len(blank)} blank cells (the first at data row {row + 1} of split {split}) among "
                       "whole-number class ids; fill them in or remove those rows")


def encode_labels(dd: datasets.DatasetDict, key: str = "task.label_column", regression: bool = False,
                  unlabelled: float | str | None = None) -> tuple[datasets.DatasetDict, list[str]]:
    """Make `label` a `ClassLabel` shared by all splits, or a float32 score, and drop unlabelled rows.

    `ClassLabel` columns keep their names; integer labels get names "0".."max"; booleans
    (PatchCamelyon) become "False"/"True"; string labels are numbered in sorted order over all
    splits, so every split uses the same mapping. With `regression`, the label becomes a
    float32 score instead (no names).

    Unlabelled rows (a hidden test label) are dropped from every split, with one warning that
    gives the count: rows whose label is null, NaN or the marker `unlabelled` (None: -1 for
    classes, none for scores; STS-B's hidden test scores are -1.0, so its YAML sets -1). A split
    left empty is refused by the split policy (`split._named`), which names the config key.

    Args:
        dd: splits with a `label` column (only the splits the run uses).
        key: the config key naming the source label column, used in messages.
        regression: the label is a score.
        unlabelled: `task.unlabelled_value`.

    Returns:
        The re-encoded splits and the label names.

    Raises:
        PlrError: labels that are neither class names nor integers (e.g. regression floats), a
            negative class id other than the marker, or no labelled row at all.
    """
    feature = next(iter(dd.values())).features["label"]
    marker = unlabelled if unlabelled is not None else (None if regression else -1)
    dtype = getattr(feature, "dtype", None)
    if regression:
        if dtype not in _FLOAT_DTYPES | _INT_DTYPES:
            raise PlrError(f"task.regression=true needs numeric scores, but {key} holds {feature}; "
                           f"set {key}=<the score column> or task.regression=false")
        return drop_unlabelled(dd, marker).cast_column("label", datasets.Value("float32")), []
    if dtype in _FLOAT_DTYPES:
        _refuse_blank_ids(dd, key)
    if not isinstance(feature, datasets.ClassLabel) and dtype not in _STR_DTYPES | _INT_DTYPES | {"bool"}:
        raise PlrError(f"{key} holds {dtype or type(feature).__name__} values, not class labels; set "
                       f"task.regression=true for a score (like STS-B), or {key}=<a column of class names or ids>")
    dd = drop_unlabelled(dd, marker)
    if isinstance(feature, datasets.ClassLabel):
        _check_ids(dd, key, len(feature.names))
        return dd, list(feature.names)
    if dtype == "bool":
        dd = dd.cast_column("label", datasets.Value("int64"))
        return dd.cast_column("label", datasets.ClassLabel(names=["False", "True"])), ["False", "True"]
    values = set().union(*(ds.unique("label") for ds in dd.values()))
    if dtype in _STR_DTYPES:
        names = sorted(values)
    else:
        _check_ids(dd, key, None)
        names = [str(i) for i in range(max(values) + 1)] if values else []
    if not names:
        raise PlrError(f"{key} has no labelled rows in any split; set {key}=<the column holding the class labels>")
    # Casting to ClassLabel maps strings through the shared sorted names (ints pass through).
    return dd.cast_column("label", datasets.ClassLabel(names=names)), names


def drop_unlabelled(dd: datasets.DatasetDict, marker: float | str | None,
                    column: str = "label") -> datasets.DatasetDict:
    """Drop the rows whose `column` is null, NaN or `marker` from every split, with one warning.

    Only splits that hold such rows are filtered (a cheap `unique` first), so a labelled split
    keeps its cache files.
    """
    def unlabelled(y: object) -> bool:
        return y is None or y != y or (marker is not None and type(y) is not bool and _same(y, marker))

    out, dropped = {}, {}
    for split, ds in dd.items():
        if any(unlabelled(v) for v in ds.unique(column)):
            kept = ds.filter(lambda ys: [not unlabelled(y) for y in ys], input_columns=column, batched=True)
            dropped[split] = f"{len(ds) - len(kept):,} of {len(ds):,} in {split}"
            ds = kept
        out[split] = ds
    if dropped:
        total = sum(len(dd[s]) - len(out[s]) for s in dropped)
        what = "null or NaN" if marker is None else f"null, NaN or {marker!r}"
        log.warning("dropped %s unlabelled rows (%s is %s): %s; they cannot be trained or scored on",
                    f"{total:,}", column, what, ", ".join(dropped.values()))
    return datasets.DatasetDict(out)


def _same(y: object, marker: float | str) -> bool:
    """`y == marker` for a number and a numeric marker, or two strings; nothing else matches."""
    if isinstance(marker, str) or isinstance(y, str):
        return isinstance(marker, str) and isinstance(y, str) and y == marker
    return y == marker


def _check_ids(dd: datasets.DatasetDict, key: str, n: int | None) -> None:
    """Class ids are in [0, n) once the unlabelled rows are gone (n None: only >= 0)."""
    for split, ds in dd.items():
        bad = sorted(v for v in ds.unique("label") if v < 0 or (n is not None and v >= n))
        if bad:
            fix = (f"if {bad[0]} marks unlabelled rows, set task.unlabelled_value={bad[0]}; else " if bad[0] < 0
                   else "")
            raise PlrError(f"{key} holds the label {bad[0]} in split '{split}', which is no class id"
                           f"{f' of its {n} classes' if n is not None else ''}; {fix}set {key}=<the column holding "
                           "the class ids>")
