"""Which files hold which split, and a `datasets` builder of only the splits a run uses.

The Hub names each file's split in two layouts: `<split>-00000-of-00001.parquet` files (what
`hf download --local-dir` gives) and `<split>/0000.parquet` folders (its `refs/convert/parquet`
branch); `hub_layout_splits` and `converted_layout` read them, keeping the split names exactly.
`prepare_splits` and `prepare_files` download and prepare the used splits only, once `check_splits`
has refused a missing split or a partial conversion. Local files are first checked for being
empty or a header without rows (named, in one line), then prepared into a cache folder named by
their content (`identity.content_cache_dir`), so an edited file is never read back from a stale
cache; `build_splits` records what it read in the task's data identity.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import datasets

from partial_lora.data import identity
from partial_lora.data.split import missing_split
from partial_lora.errors import PlrError

EXTENSIONS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}
_SHARD = re.compile(r"^(?P<split>\w+?)-\d{5}-of-\d{5}$")  # train-00000-of-00001
_NUMBERED = re.compile(r"^\d+$")                           # <split>/0000.parquet
_PARTIAL = "partial-"

Files = dict[str, list[str]]
# (the used splits' files, the source's features, a cache dir or None) -> a builder of only those files
Rebuild = Callable[[Files, datasets.Features | None, str | None], datasets.DatasetBuilder]


def hub_layout_splits(path: Path) -> tuple[str, dict[str, list[str]]] | None:
    """(format, split -> files) when every data file under `path` names its split the Hub's way.

    Returns None for any other layout (then `datasets` infers the splits).
    """
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in EXTENSIONS
                   and not any(part.startswith(".") for part in f.relative_to(path).parts))
    formats = {EXTENSIONS[f.suffix.lower()] for f in files}
    if not files or len(formats) != 1:
        return None
    splits: dict[str, list[str]] = {}
    shard_dirs: set[Path] = set()
    for f in files:
        m = _SHARD.match(f.stem)
        if m:
            split = m["split"]
            shard_dirs.add(f.parent)
        elif _NUMBERED.match(f.stem) and f.parent != path:
            split = f.parent.name
        else:
            return None
        splits.setdefault(split, []).append(str(f))
    if len(shard_dirs) > 1:  # shards in several folders: several configs (set task.subset) or a custom layout
        return None
    first = {"train": 0, "validation": 1, "test": 2}
    return formats.pop(), dict(sorted(splits.items(), key=lambda kv: (first.get(kv[0], 3), kv[0])))


def converted_layout(paths: Sequence[str]) -> dict[str, Files]:
    """config -> split folder -> parquet files, from the file list of a `refs/convert/parquet` branch.

    Split folders keep their names, so a partial conversion shows as `partial-<split>`.
    """
    configs: dict[str, Files] = {}
    for p in sorted(paths):
        parts = p.split("/")
        if len(parts) == 3 and parts[2].endswith(".parquet"):
            configs.setdefault(parts[0], {}).setdefault(parts[1], []).append(p)
    return configs


def check_splits(wanted: Mapping[str, str], available: Sequence[str], where: str) -> None:
    """Every used split exists, and none of them is a partial conversion."""
    for key, split in wanted.items():
        if split in available and not split.startswith(_PARTIAL):
            continue
        if _PARTIAL + split in available or split.startswith(_PARTIAL):
            split = split.removeprefix(_PARTIAL)
            raise PlrError(f"{where} holds only part of split '{split}' (folder {_PARTIAL}{split}: the Hub converts "
                           f"only the first part of a large dataset), and using it would silently truncate the data; "
                           f"download the full dataset and set task.path=<local dir>")
        raise missing_split(key, split, available)


def prepare_splits(builder: datasets.DatasetBuilder, rebuild: Rebuild, wanted: Mapping[str, str],
                   where: str, local: bool = False) -> datasets.DatasetDict:
    """Download and prepare only the used splits of a resolved builder.

    When the builder knows more splits than the run uses, a second builder of just their data
    files is made (keeping the source's features, e.g. `ClassLabel` names from the dataset card);
    its cache entry is its own, so it never mixes with a full copy. A `local` source's files are
    checked and always rebuilt into a cache folder named by their content.
    """
    files = {str(split): list(paths) for split, paths in (builder.config.data_files or {}).items()}
    available = list(files) or [str(split) for split in builder.info.splits or {}]
    if available:
        check_splits(wanted, available, where)
    splits = list(dict.fromkeys(wanted.values()))
    used = {s: files[s] for s in splits if s in files}
    if local and used:
        check_files(used)
        builder = rebuild(used, builder.info.features,
                          identity.content_cache_dir(f for fs in used.values() for f in fs))
    elif files and set(files) != set(splits):
        builder = rebuild(used, builder.info.features, None)
    return build_splits(builder, splits)


def build_splits(builder: datasets.DatasetBuilder, splits: Sequence[str]) -> datasets.DatasetDict:
    files = builder.config.data_files or {}
    if files:
        identity.note_files({s: files[s] for s in splits if s in files})
    else:  # a prepared cache entry (offline Hub load): its folder is named by the repo's commit
        identity.note(f"{getattr(builder, 'repo_id', None) or builder.dataset_name} ({builder.config_id})",
                      Path(builder.cache_dir).name)
    builder.download_and_prepare()
    return datasets.DatasetDict({s: builder.as_dataset(split=s) for s in splits})


def prepare_files(fmt: str, files: Mapping[str, list[str]], wanted: Mapping[str, str],
                  where: str) -> datasets.DatasetDict:
    """A packaged builder (`parquet`, `csv`, ...) on the used splits' local files of a known layout,
    prepared into a cache folder named by their content."""
    check_splits(wanted, list(files), where)
    splits = list(dict.fromkeys(wanted.values()))
    used = {s: list(files[s]) for s in splits}
    check_files(used)
    cache = identity.content_cache_dir(f for fs in used.values() for f in fs)
    return build_splits(datasets.load_dataset_builder(fmt, data_files=used, cache_dir=cache), splits)


def check_files(files: Mapping[str, Sequence[str]]) -> None:
    """Every local data file holds rows: an empty file or a CSV/JSON Lines file without a row is named.

    Raises:
        PlrError: the file, the split it holds, and what is wrong with it.
    """
    for split, paths in files.items():
        for f in paths:
            path = Path(f)
            if "://" in f or not path.is_file():
                continue
            if path.stat().st_size == 0:
                raise PlrError(f"{f} (split {split}) is an empty file (0 bytes); fill it or remove it")
            suffix = path.suffix.lower()
            if suffix in (".csv", ".jsonl", ".json") and not _has_rows(path, header=suffix == ".csv"):
                what = "a header and no rows" if suffix == ".csv" else "no rows"
                raise PlrError(f"{f} (split {split}) holds {what}; add its rows or remove the file")


def _has_rows(path: Path, header: bool) -> bool:
    """Whether a text table has a non-blank line (after its header line); reads only until it finds one."""
    with open(path, "rb") as f:
        lines = (line for line in f if line.strip())
        if header and next(lines, None) is None:
            return False
        return next(lines, None) is not None
