"""Task and preprocessing specs shared by every loader (plain dataclasses, no Hydra)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import datasets

from partial_lora.errors import PlrError
from partial_lora.typecheck import check_seed

Kind = Literal["text", "image", "choice"]
PROTOCOLS = ("full", "1k", "vtab1k")  # 1k and vtab1k are one protocol (vtab1k: its vision name)


@dataclass(frozen=True)
class TaskSpec:
    """Everything a task YAML says about where the data is and how it is shaped.

    Attributes:
        name: the task's name (e.g. `bbc-news`), used in run dirs and reports.
        loader: key into `TASKS` (`bbc-news`, `digits`, `hf-text`, `hf-image`, `choice`).
        kind: `text`, `image` or `choice` (multiple choice for causal LMs: prompt + choices).
        path: hub dataset id or local path (file or directory) for the generic loaders.
        data_format: for local paths: `parquet`, `csv`, `json` or `imagefolder`; None infers it.
        subset: dataset config name (e.g. `sst2` of `nyu-mll/glue`).
        revision: hub revision (e.g. `refs/convert/parquet`).
        text_column / text_pair_column / image_column / label_column: source column names.
        train_split / val_split / test_split: source split names; a None val/test split is
            carved from train with a stratified, seeded split of `val_fraction`/`test_fraction`.
        val_max: at most this many carved validation rows (None: no cap). GLUE carves its
            checkpoint-selection slice from train this way and keeps dev as the test split.
        split_seed: seed of that carving (fixed per task so runs with different seeds share it).
        protocol: `full` (the splits as above) or `1k` (= `vtab1k`, the VTAB-1k shape):
            `vtab_train` + `vtab_val` examples drawn with `split_seed` from the train split
            (stratified when every class allows), the test split kept whole.
        vtab_train / vtab_val: the VTAB-1k sizes (800 + 200).
        eval_splits: further evaluation sets, name -> source split (e.g. MNLI's
            `{mismatched: validation_mismatched}`), reported as `test_<name>_<metric>`.
        regression: the label is a float score (STS-B): a one-output head, MSE loss.
        num_labels: the number of classes the task's label column must have (100 for
            FGVC-Aircraft's variants); checked when the task loads, so a column at another
            level of a label hierarchy (aircraft families: 70) fails at once. None: not checked.
        unlabelled_value: the label that marks a row without a gold label (hidden test
            labels). Such rows, and rows whose label is null or NaN, are dropped from every
            split with one warning. None: -1 for classification (the `ClassLabel` convention for
            "no label"), nothing for regression, where -1 can be a real score (STS-B sets -1).
        max_train_samples / max_eval_samples: seeded subsample after splitting (None: all).
        format: for the `choice` loader, how to read the source's rows (`boolq`, `piqa`, `siqa`,
            `hellaswag`, `winogrande`, `arc`, `obqa`): each dataset has its own schema, and the
            format turns it into the shared prompt / choices / label rows.
        response_column: for the `generation` loader, the column holding the text the model
            learns to produce after the prompt (`text_column`).
        group_column: rows that share this column's value (a movie's reviews) always land in the
            same split, so no group is in two splits; carving then draws whole groups.
        prompt: for a classification task on a causal LM, the template each text becomes, with
            `{text}` (and `{text_pair}`) in it, e.g. "Review: {text}\nSentiment:".
        verbalizer: class name -> the answer text the causal LM scores after the prompt (one per
            class), e.g. `{rotten: negative, fresh: positive}`.
        unseen_labels: a val/test label that train never has: `error` (default) or `drop` the
            rows (`data.checks`).
        bad_text: an empty, null or non-string text cell: `error` (default) or `drop` the rows.
        bad_images: an image that does not decode (truncated, corrupt, missing file): `error`
            (default) or `drop` the rows. Every image is decoded once when the task loads.
    """

    name: str
    loader: str
    kind: Kind = "text"
    path: str | None = None
    data_format: str | None = None
    subset: str | None = None
    revision: str | None = None
    text_column: str = "text"
    text_pair_column: str | None = None
    image_column: str = "image"
    label_column: str = "label"
    train_split: str = "train"
    val_split: str | None = None
    test_split: str | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    val_max: int | None = None
    split_seed: int = 0
    protocol: str = "full"
    vtab_train: int = 800
    vtab_val: int = 200
    eval_splits: Mapping[str, str] = field(default_factory=dict)
    regression: bool = False
    num_labels: int | None = None
    unlabelled_value: float | str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    format: str | None = None
    response_column: str | None = None
    group_column: str | None = None
    prompt: str | None = None
    verbalizer: Mapping[str, str] | None = None
    unseen_labels: str = "error"
    bad_text: str = "error"
    bad_images: str = "error"

    def __post_init__(self) -> None:
        check_seed("task.split_seed", self.split_seed)
        for key in ("val_fraction", "test_fraction"):
            v = getattr(self, key)
            if not 0 <= v < 1:
                raise PlrError(f"task.{key} must be in [0, 1), got {v}; fix that override")
        n = self.num_labels
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise PlrError(f"task.num_labels must be a positive number of classes (or null), got {n!r}; fix that "
                           "override")
        u = self.unlabelled_value
        if u is not None and (isinstance(u, bool) or not isinstance(u, int | float | str)):
            raise PlrError(f"task.unlabelled_value must be a number, a string or null, got {u!r}; "
                           "e.g. task.unlabelled_value=-1")


@dataclass
class TaskData:
    """A loaded task with standardised columns.

    Every split has `label` (int in [0, num_labels), or a float score for regression) and either
    `text` (plus `text_pair` for sentence pairs) or `image` (a PIL image). `extra` holds further
    evaluation sets by name (MNLI mismatched). `sources` is the data's identity: each data file
    (or content-addressed source) the load read, with its digest (`data.identity`).
    """

    name: str
    kind: Kind
    train: datasets.Dataset
    val: datasets.Dataset
    test: datasets.Dataset
    label_names: list[str] = field(default_factory=list)
    extra: dict[str, datasets.Dataset] = field(default_factory=dict)
    regression: bool = False
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        """Outputs of the head: the number of classes, or 1 for a regression score."""
        return 1 if self.regression else len(self.label_names)


@dataclass(frozen=True)
class ImagePreprocess:
    """How a model wants its images: taken from the model's own processor / timm config."""

    size: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bilinear"
    crop_pct: float = 1.0  # eval: resize to size / crop_pct, then center-crop to size
