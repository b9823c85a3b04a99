"""Generated local copies of the real datasets, in each one's Hub schema, for offline tests.

Each writer makes the directory layout `hf download --repo-type dataset --local-dir` gives
(parquet files named `<split>-00000-of-00001.parquet`), with the real column names, label
features and split names, and small random contents. The loaders then run exactly the code
they run on the real data.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import datasets
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str) -> ModuleType:
    """Import `experiments/<name>.py` (a script, not a package module) for testing."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# name -> (text columns, label names or None for a float score, split names)
GLUE: dict[str, tuple[tuple[str, ...], list[str] | None, tuple[str, ...]]] = {
    "cola": (("sentence",), ["unacceptable", "acceptable"], ("train", "validation", "test")),
    "sst2": (("sentence",), ["negative", "positive"], ("train", "validation", "test")),
    "mrpc": (("sentence1", "sentence2"), ["not_equivalent", "equivalent"], ("train", "validation", "test")),
    "qqp": (("question1", "question2"), ["not_duplicate", "duplicate"], ("train", "validation", "test")),
    "stsb": (("sentence1", "sentence2"), None, ("train", "validation", "test")),
    "mnli": (("premise", "hypothesis"), ["entailment", "neutral", "contradiction"],
             ("train", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched")),
    "qnli": (("question", "sentence"), ["entailment", "not_entailment"], ("train", "validation", "test")),
    "rte": (("sentence1", "sentence2"), ["entailment", "not_entailment"], ("train", "validation", "test")),
}

WORDS = "the a cat dog sat ran on under mat tree big small red blue quickly slowly house river".split()


def _sentence(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(4, 12))))


def write_glue(root: Path, task: str, sizes: dict[str, int] | None = None, seed: int = 0) -> Path:
    """`root/<task>/<split>-00000-of-00001.parquet` as in `nyu-mll/glue`; test labels are -1.

    Returns:
        `root` (what `task.path` points at; the task's folder is found from `task.subset`).
    """
    columns, names, splits = GLUE[task]
    rng = np.random.default_rng(seed)
    label = datasets.Value("float32") if names is None else datasets.ClassLabel(names=names)
    features = datasets.Features({**{c: datasets.Value("string") for c in columns}, "label": label,
                                  "idx": datasets.Value("int32")})
    out = root / task
    out.mkdir(parents=True, exist_ok=True)
    for split in splits:
        n = (sizes or {}).get(split, 120 if split == "train" else 30)
        if split.startswith("test"):
            labels = [-1.0 if names is None else -1] * n
        elif names is None:
            labels = np.round(rng.uniform(0, 5, n), 2).astype(np.float32).tolist()
        else:
            labels = (np.arange(n) % len(names)).tolist()
        rows = {**{c: [_sentence(rng) for _ in range(n)] for c in columns}, "label": labels, "idx": list(range(n))}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(out / f"{split}-00000-of-00001.parquet")
    return root


# name -> (layout folder, image column, label column, label classes (0: bool), splits, extra columns)
# Real schemas on the Hub (see conf/task/<name>.yaml for the ids); sizes here are tiny.
VISION: dict[str, tuple[str, str, str, int, tuple[str, ...], tuple[str, ...]]] = {
    "cifar100": ("cifar100", "img", "fine_label", 100, ("train", "test"), ("coarse_label",)),
    "caltech101": ("data", "image", "label", 102, ("train", "test"), ()),
    "dtd": ("data", "image", "label", 47, ("train", "test"), ()),
    "flowers102": ("data", "image", "label", 102, ("train", "validation", "test"), ()),
    "pets": ("data", "image", "label", 37, ("train", "test"), ("image_id", "label_cat_dog")),
    "svhn": ("cropped_digits", "image", "label", 10, ("train", "test", "extra"), ()),
    "eurosat": ("data", "image", "label", 10, ("train", "validation", "test"), ("image_id",)),
    "resisc45": ("data", "image", "label", 45, ("train", "validation", "test"), ("image_id",)),
    "cifar10": ("plain_text", "img", "label", 10, ("train", "test"), ()),
    "cars": ("data", "image", "label", 196, ("train", "test"), ()),
    "aircraft": ("data", "image", "label", 100, ("train", "val", "test"), ()),
    "food101": ("data", "image", "label", 101, ("train", "validation"), ()),
    "sun397": ("data", "image", "label", 397, ("train", "test"), ()),
    "gtsrb": ("data", "image", "label", 43, ("train", "test"), ()),
    "mnist": ("mnist", "image", "label", 10, ("train", "test"), ()),
    "camelyon": ("data", "image", "label", 2, ("train", "validation", "test"), ()),
}


def write_vision(root: Path, task: str, sizes: dict[str, int] | None = None, seed: int = 0,
                 classes_used: int = 4) -> Path:
    """A local copy of a vision dataset in its Hub layout: `root/<folder>/<split>-00000-of-00001.parquet`.

    Labels cycle over the first `classes_used` classes of the real `ClassLabel` (so stratified
    splits work on tiny sizes); images are small random RGB (grayscale for MNIST).

    Returns:
        `root`, the folder `task.path` points at.
    """
    from PIL import Image

    folder, image_col, label_col, n_classes, splits, extra = VISION[task]
    rng = np.random.default_rng(seed)
    names = [f"class_{i}" for i in range(n_classes)]
    label = datasets.ClassLabel(names=names)
    feats = {image_col: datasets.Image(), label_col: label}
    for col in extra:
        feats[col] = datasets.Value("string") if col == "image_id" else datasets.ClassLabel(names=["a", "b"])
    out = root / folder
    out.mkdir(parents=True, exist_ok=True)
    if task == "svhn":  # the other config of the repo, which task.subset=cropped_digits must skip
        (root / "full_numbers").mkdir(exist_ok=True)
        (root / "full_numbers" / "README.txt").write_text("another config")
    mode, channels = ("L", 1) if task == "mnist" else ("RGB", 3)
    for split in splits:
        n = (sizes or {}).get(split, 60 if split == "train" else 20)
        pixels = rng.integers(0, 256, (n, 12, 12, channels), dtype=np.uint8)
        rows = {image_col: [Image.fromarray(p.squeeze(-1) if channels == 1 else p, mode) for p in pixels],
                label_col: [i % min(classes_used, n_classes) for i in range(n)]}
        for col in extra:
            rows[col] = [f"{split}_{i}" for i in range(n)] if col == "image_id" else [i % 2 for i in range(n)]
        ds = datasets.Dataset.from_dict(rows, features=datasets.Features(feats))
        ds.to_parquet(out / f"{split}-00000-of-00001.parquet")
    return root
