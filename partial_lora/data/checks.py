"""Degenerate data, refused when the task loads, before any stage runs or is marked done.

- A classifier needs at least two classes in its training split.
- A label in a validation or test split that the training split never has cannot be learnt,
  and silently scores as a miss: an error, or with `task.unseen_labels=drop` those rows are
  dropped with one warning.
- A text cell that is empty, null/NaN or not a string (a numeric column read as text) is an
  error naming the split and the row, or with `task.bad_text=drop` such rows are dropped with one
  warning.
- A regression target that is not a finite number (inf) is an error naming the split and the
  row (null/NaN targets count as unlabelled and were dropped before).
- An image that does not decode (truncated, corrupt, or a path that is gone) is an error naming
  its file (or split and row), or with `task.bad_images=drop` such rows are dropped with one
  warning. Each split is decoded once per process (keyed by its fingerprint): the first stage
  pays for it, not a training step after hours.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable

import datasets
import numpy as np

from partial_lora.data.base import TaskData, TaskSpec
from partial_lora.data.split import cells, column
from partial_lora.errors import PlrError, first_line

log = logging.getLogger(__name__)

POLICIES = ("error", "drop")
TEXT_COLUMNS = ("text", "text_pair")


Split = tuple[str, str | None, datasets.Dataset]  # (name in messages, extra set's key or None, rows)


def _splits(data: TaskData, train: bool = True) -> list[Split]:
    """The splits to check: train (unless `train=False`), val, test and the extra evaluation sets."""
    own = [(n, None, getattr(data, n)) for n in ("train", "val", "test") if train or n != "train"]
    return own + [(f"extra '{k}'", k, v) for k, v in data.extra.items()]


def _replace(data: TaskData, name: str, extra: str | None, ds: datasets.Dataset) -> None:
    if extra is None:
        setattr(data, name, ds)
    else:
        data.extra[extra] = ds


def _bad_text(v: object) -> str | None:
    """Why a text cell is unusable, or None."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "empty (null)"
    if not isinstance(v, str):
        return f"not text ({type(v).__name__} {v!r})"
    if not v.strip():
        return "empty"
    return None


def _check_text(data: TaskData, policy: str, key: Callable[[str], str]) -> None:
    for name, extra, ds in _splits(data):
        for col in (c for c in TEXT_COLUMNS if c in ds.column_names):
            bad = [(i, why) for i, v in enumerate(cells(ds, col)) if (why := _bad_text(v)) is not None]
            if not bad:
                continue
            if policy == "error":
                i, why = bad[0]
                raise PlrError(f"{key(col)} of split '{name}' row {i} is {why} ({len(bad)} such rows); fix the data, "
                               "or set task.bad_text=drop to drop those rows")
            drop = {i for i, _ in bad}
            log.warning("dropped %d rows of split '%s' whose %s is empty, null or not text (task.bad_text=drop)",
                        len(drop), name, key(col))
            ds = ds.select([i for i in range(len(ds)) if i not in drop])
            _replace(data, name, extra, ds)


_DECODED: dict[str, list[tuple[int, dict | None, str]]] = {}  # split fingerprint -> its bad rows (this process)


def _bad_image(cell: dict) -> str | None:
    """Why an image cell (`{"bytes", "path"}`, undecoded) does not decode, or None."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"]) as im:
            im.draft("RGB", (64, 64))  # JPEG: decode at a reduced scale (still reads every byte)
            im.load()
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return f"{type(e).__name__}: {first_line(e)}"
    return None


def _check_images(data: TaskData, policy: str) -> None:
    for name, extra, ds in _splits(data):
        if "image" not in ds.column_names or not isinstance(ds.features["image"], datasets.Image):
            continue
        if ds._fingerprint not in _DECODED:
            cells = ds.cast_column("image", datasets.Image(decode=False))["image"]
            _DECODED[ds._fingerprint] = [(i, c, why) for i, c in enumerate(cells)
                                         if (why := "empty (null)" if c is None else _bad_image(c)) is not None]
        bad = _DECODED[ds._fingerprint]
        if not bad:
            continue
        if policy == "error":
            i, cell, why = bad[0]
            where = f"'{cell['path']}'" if cell and cell.get("path") else f"of split '{name}' row {i}"
            raise PlrError(f"image {where} does not decode ({why}; {len(bad)} such rows in split '{name}'); "
                           "fix or remove the file, or set task.bad_images=drop to drop those rows")
        drop = {i for i, _, _ in bad}
        log.warning("dropped %d rows of split '%s' whose image does not decode (task.bad_images=drop)", len(drop), name)
        _replace(data, name, extra, ds.select([i for i in range(len(ds)) if i not in drop]))


def _check_scores(data: TaskData, spec: TaskSpec) -> None:
    """A regression target must be a finite number: an inf would pass the loss as inf and the
    correlations as 0 (a constant), so the run would finish with a meaningless score."""
    for name, _, ds in _splits(data):
        labels = np.asarray(column(ds, "label"), dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(labels))
        if len(bad):
            raise PlrError(f"task.label_column='{spec.label_column}' of split '{name}' row {int(bad[0])} is "
                           f"{float(labels[bad[0]])} ({len(bad)} such row{'s' if len(bad) > 1 else ''}); a regression "
                           "target must be a finite number: "
                           "fix or drop those rows")


def check(data: TaskData, spec: TaskSpec) -> TaskData:
    """Refuse (or, where the task says so, drop) degenerate data; returns the data to use.

    Raises:
        PlrError: one class in train, labels absent from train in an evaluation split, an
            unusable text cell, or an image that does not decode (each naming the fix).
    """
    for what, value in (("task.unseen_labels", spec.unseen_labels), ("task.bad_text", spec.bad_text),
                        ("task.bad_images", spec.bad_images)):
        if value not in POLICIES:
            raise PlrError(f"{what} must be error or drop, got '{value}'")
    if data.kind == "text":
        columns = {"text": spec.text_column, "text_pair": spec.text_pair_column or "text_pair"}
        _check_text(data, spec.bad_text, lambda c: f"task.{c}_column='{columns[c]}'")
    if data.kind == "image":
        _check_images(data, spec.bad_images)
    if data.regression:
        _check_scores(data, spec)
    if data.regression or data.kind not in ("text", "image"):
        return data
    seen = set(data.train.unique("label"))
    names = data.label_names
    if len(seen) < 2:
        only = ", ".join(names[int(i)] for i in sorted(seen)) or "none"
        raise PlrError(f"the training split of task '{spec.name}' has {len(seen)} class ({only}); a classifier needs "
                       f"at least 2: check task.label_column='{spec.label_column}' or the data")
    for name, extra, ds in _splits(data, train=False):
        unseen = sorted(set(ds.unique("label")) - seen)
        if not unseen:
            continue
        keep = np.isin(column(ds, "label"), sorted(seen))
        rows = int((~keep).sum())
        shown = ", ".join(names[int(i)] for i in unseen[:3]) + (", ..." if len(unseen) > 3 else "")
        if spec.unseen_labels == "error":
            raise PlrError(f"split '{name}' of task '{spec.name}' has {rows} rows with labels the training split "
                           f"never has ({shown}); fix the splits, or set task.unseen_labels=drop to drop those rows")
        log.warning("dropped %d rows of split '%s' with labels absent from train (%s; task.unseen_labels=drop)",
                    rows, name, shown)
        _replace(data, name, extra, ds.select(np.flatnonzero(keep)))
    for name, _, ds in _splits(data):
        if len(ds) == 0:
            raise PlrError(f"split '{name}' of task '{spec.name}' is empty after dropping rows; fix the data")
    return data
