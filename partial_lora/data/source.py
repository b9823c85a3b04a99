"""Open the raw splits of a generic task: a Hugging Face Hub id or a local file/directory.

A local directory in one of the Hub's own layouts keeps the Hub's split names exactly:
`<split>-00000-of-00001.parquet` files (what `hf download --local-dir` gives, e.g. MNLI's
`validation_matched`) or `<split>/0000.parquet` folders (the `refs/convert/parquet` branch).
`datasets`' own inference would fold `validation_matched` and `validation_mismatched` into one
`validation` split, so those layouts are mapped explicitly. Any other directory (e.g.
`train.csv` + `test.csv`, or an image folder) is handed to `datasets` as is. Failures become
one-line `PlrError`s.
"""

from __future__ import annotations

import re
from pathlib import Path

import datasets

from partial_lora.data.base import TaskSpec
from partial_lora.errors import PlrError
from partial_lora.hub import check_local_path, load_from_hub, looks_local

FORMATS = ("parquet", "csv", "json", "imagefolder")
_EXTENSIONS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}
_SHARD = re.compile(r"^(?P<split>\w+?)-\d{5}-of-\d{5}$")  # train-00000-of-00001
_NUMBERED = re.compile(r"^\d+$")                           # <split>/0000.parquet


def hub_layout_splits(path: Path) -> tuple[str, dict[str, list[str]]] | None:
    """(format, split -> files) when every data file under `path` names its split the Hub's way.

    Returns None for any other layout (then `datasets` infers the splits).
    """
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in _EXTENSIONS
                   and not any(part.startswith(".") for part in f.relative_to(path).parts))
    formats = {_EXTENSIONS[f.suffix.lower()] for f in files}
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


def load_source(spec: TaskSpec) -> datasets.DatasetDict:
    """All splits of `spec.path`, with the source's own column names and features.

    Raises:
        PlrError: no `task.path`, a missing local path, an unreadable local dataset, or a hub
            id that is neither cached nor reachable.
    """
    if not spec.path:
        raise PlrError(f"task '{spec.name}' (loader {spec.loader}) needs a dataset; "
                       f"set task.path=<hub id or local path>")
    if spec.data_format is not None and spec.data_format not in FORMATS:
        raise PlrError(f"task.data_format='{spec.data_format}' is not supported; set task.data_format=<one of: "
                       f"{', '.join(FORMATS)}> or null to infer it")
    if looks_local(spec.path):
        return _load_local(spec, check_local_path(spec.path, what="dataset", key="task.path"))
    path = spec.path

    def load(local_files_only: bool) -> datasets.DatasetDict:
        # Offline, `load_from_hub` makes the load cache-only (datasets has no local_files_only).
        return datasets.load_dataset(path, spec.subset, revision=spec.revision)

    return load_from_hub(load, path, what="dataset", key="task.path")


def _load_local(spec: TaskSpec, path: Path) -> datasets.DatasetDict:
    """Load a local file (one `train` split) or directory (splits inferred by `datasets`)."""
    fmt = spec.data_format
    try:
        if path.is_file():
            if fmt == "imagefolder":
                raise PlrError(f"task.data_format=imagefolder needs a folder, but task.path='{spec.path}' is a file; "
                               f"set task.path=<the folder holding train/, test/ ...>")
            fmt = fmt or _EXTENSIONS.get(path.suffix.lower())
            if fmt is None:
                raise PlrError(f"task.path='{spec.path}' is a file of unknown format; use a "
                               f"{'/'.join(_EXTENSIONS)} file or set task.data_format=<one of: parquet, csv, json>")
            return datasets.load_dataset(fmt, data_files=str(path))
        name = spec.subset
        if name and (path / name).is_dir():
            # `hf download ... --local-dir DIR` keeps one subfolder per config (e.g. glue/sst2/).
            path, name = path / name, None
        layout = hub_layout_splits(path) if fmt in (None, "parquet", "csv", "json") and not name else None
        if layout is not None and fmt in (None, layout[0]):
            return datasets.load_dataset(layout[0], data_files=layout[1])
        if fmt is None:
            return datasets.load_dataset(str(path), name)
        if name:
            raise PlrError(f"task.subset='{name}' is not a subfolder of '{path}'; set task.subset=null or "
                           f"task.path=<the folder holding that config's files>")
        return datasets.load_dataset(fmt, data_dir=str(path))
    except PlrError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises FileNotFoundError, ValueError, ArrowInvalid...
        first = str(e).splitlines()[0] if str(e) else ""
        raise PlrError(f"could not read the dataset at task.path='{spec.path}' ({type(e).__name__}: {first}); "
                       f"point task.path at a parquet/csv/json file or a folder of them (or an image folder), "
                       f"and set task.data_format if the format cannot be inferred") from e
