"""Bring a source dataset to the standard columns: `text`/`text_pair`/`image` and an int `label`."""

from __future__ import annotations

import datasets

from partial_lora.errors import PlrError

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


def encode_labels(dd: datasets.DatasetDict, key: str = "task.label_column",
                  regression: bool = False) -> tuple[datasets.DatasetDict, list[str]]:
    """Make `label` a `ClassLabel` shared by all splits and drop unlabelled rows.

    `ClassLabel` columns keep their names; integer labels get names "0".."max"; booleans
    (PatchCamelyon) become "False"/"True"; string labels are numbered in sorted order over all
    splits, so every split uses the same mapping. With `regression`, the label becomes a
    float32 score instead (no names) and rows without a score are dropped.

    Unlabelled rows (label -1 or null, e.g. every row of a GLUE test split) are dropped from
    every split: they cannot be trained or scored on. A split left empty is reported by the
    split policy only if the task actually uses it.

    Args:
        dd: splits with a `label` column.
        key: the config key naming the source label column, used in messages.

    Returns:
        The re-encoded splits and the label names.

    Raises:
        PlrError: labels that are neither class names nor integers (e.g. regression floats).
    """
    feature = next(iter(dd.values())).features["label"]
    if regression:
        return _as_scores(dd, feature, key), []
    if isinstance(feature, datasets.ClassLabel):
        return _drop_unlabelled(dd), list(feature.names)
    dtype = getattr(feature, "dtype", None)
    if dtype == "bool":
        dd = dd.cast_column("label", datasets.Value("int64"))
        return dd.cast_column("label", datasets.ClassLabel(names=["False", "True"])), ["False", "True"]
    values = set().union(*(ds.unique("label") for ds in dd.values())) - {None}
    if dtype in _STR_DTYPES:
        names = sorted(values)
    elif dtype in _INT_DTYPES:
        labelled = [v for v in values if v >= 0]
        names = [str(i) for i in range(max(labelled) + 1)] if labelled else []
    else:
        raise PlrError(f"{key} holds {dtype or type(feature).__name__} values, not class labels; set "
                       f"task.regression=true for a score (like STS-B), or {key}=<a column of class names or ids>")
    if not names:
        raise PlrError(f"{key} has no labelled rows in any split; set {key}=<the column holding the class labels>")
    dd = _drop_unlabelled(dd)
    # Casting to ClassLabel maps strings through the shared sorted names (ints pass through).
    return dd.cast_column("label", datasets.ClassLabel(names=names)), names


def _as_scores(dd: datasets.DatasetDict, feature: object, key: str) -> datasets.DatasetDict:
    """Float32 scores; rows whose score is null or NaN are dropped."""
    if getattr(feature, "dtype", None) not in _FLOAT_DTYPES | _INT_DTYPES:
        raise PlrError(f"task.regression=true needs numeric scores, but {key} holds {feature}; "
                       f"set {key}=<the score column> or task.regression=false")
    dd = dd.cast_column("label", datasets.Value("float32"))
    return datasets.DatasetDict({split: ds.filter(lambda ys: [y is not None and y == y for y in ys],
                                                  input_columns="label", batched=True)
                                 for split, ds in dd.items()})


def _drop_unlabelled(dd: datasets.DatasetDict) -> datasets.DatasetDict:
    """Filter rows whose label is null or negative, touching only splits that have such rows."""
    out = {}
    for split, ds in dd.items():
        if any(v is None or (isinstance(v, int) and v < 0) for v in ds.unique("label")):
            ds = ds.filter(lambda ys: [y is not None and not (isinstance(y, int) and y < 0) for y in ys],
                           input_columns="label", batched=True)
        out[split] = ds
    return datasets.DatasetDict(out)
