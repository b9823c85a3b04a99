"""`hf-image`: image classification from the Hub, local parquet files or an image folder."""

from __future__ import annotations

import datasets

from partial_lora.data.base import TaskData, TaskSpec
from partial_lora.data.columns import encode_labels, select_columns
from partial_lora.data.source import load_source
from partial_lora.data.split import task_data
from partial_lora.errors import PlrError


def load_hf_image(spec: TaskSpec) -> TaskData:
    """Load an image task with columns `image` (decoded lazily to PIL) and `label`."""
    mapping = {"image": (spec.image_column, "task.image_column"), "label": (spec.label_column, "task.label_column")}
    dd, label_names = encode_labels(select_columns(load_source(spec), mapping), unlabelled=spec.unlabelled_value)
    dd = _as_images(dd, spec.image_column)
    return task_data(spec, "image", dd, label_names)


def _as_images(dd: datasets.DatasetDict, source: str) -> datasets.DatasetDict:
    """Give `image` the `Image` feature, so rows decode to PIL images on access.

    Parquet written without Hugging Face metadata stores images as a plain
    `{"bytes", "path"}` struct (or a path string); both cast to `Image`.
    """
    feature = next(iter(dd.values())).features["image"]
    if isinstance(feature, datasets.Image):
        return dd
    if (isinstance(feature, dict) and {"bytes", "path"} >= set(feature)) or getattr(feature, "dtype", None) == "string":
        return dd.cast_column("image", datasets.Image())
    raise PlrError(f"task.image_column='{source}' does not hold images ({feature}); "
                   f"set task.image_column=<a column of images or image paths>")
