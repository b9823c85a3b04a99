"""Open the splits a task uses: from a Hugging Face Hub id or a local file/directory.

Only the splits a run reads (`split.used_splits`: train, val, test and the extra evaluation
sets) are downloaded and prepared. The data files of the others (SVHN's 531k-image `extra`,
the seven corruption splits of `tanganke/stanford_cars` and `tanganke/gtsrb`) are never read:
`datasets` resolves every split's files without reading them, and we build from the used
splits' files only.

A Hub repo whose revision still holds a loading script (datasets >= 4 refuses those:
"Dataset scripts are no longer supported") is read from the Hub's own parquet conversion,
revision `refs/convert/parquet` (`<config>/<split>/0000.parquet`), with one log line saying so.
The config folder is `task.subset` when the conversion has it, else its only config (a script's
`plain_text` is often converted as `default`). A partial conversion (`<config>/partial-<split>`,
what the Hub writes for large datasets) is refused: it would silently truncate the data.

A local directory in one of the Hub's own layouts keeps the Hub's split names exactly:
`<split>-00000-of-00001.parquet` files (what `hf download --local-dir` gives, e.g. MNLI's
`validation_matched`) or `<split>/0000.parquet` folders (the `refs/convert/parquet` branch).
`datasets`' own inference would fold `validation_matched` and `validation_mismatched` into one
`validation` split, so those layouts are mapped explicitly. Any other directory (e.g.
`train.csv` + `test.csv`, or an image folder) is handed to `datasets` as is. Failures become
one-line `PlrError`s.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import datasets

from partial_lora.data import identity
from partial_lora.data.base import TaskSpec
from partial_lora.data.split import used_splits
from partial_lora.data.split_files import (
    EXTENSIONS,
    Files,
    build_splits,
    check_splits,
    converted_layout,
    hub_layout_splits,
    prepare_files,
    prepare_splits,
)
from partial_lora.errors import PlrError, first_line
from partial_lora.fetch.hub import check_local_path, load_from_hub, looks_local

log = logging.getLogger(__name__)

FORMATS = ("parquet", "csv", "json", "imagefolder")
CONVERTED = "refs/convert/parquet"  # the Hub's parquet conversion of every public dataset repo
_SCRIPT = re.compile(r"Dataset scripts are no longer supported, but found (?P<file>\S+)")


# --- the only two calls that ask the Hub (tests point them at local layouts) ------------------


def hub_builder(repo: str, name: str | None, revision: str | None, data_files: Files | None = None,
                features: datasets.Features | None = None, config_id: str | None = None) -> datasets.DatasetBuilder:
    """The `datasets` builder of a Hub repo: resolves its configs and every split's data files
    (reading the card and the file list, no data). With `data_files`, a builder of those files
    only, prepared into the cache entry `config_id`.

    Raises:
        RuntimeError: "Dataset scripts are no longer supported" when the revision holds one.
    """
    extra = {"config_id": config_id} if config_id else {}
    return datasets.load_dataset_builder(repo, name, revision=revision, data_files=data_files, features=features,
                                         **extra)


def hub_files(repo: str, revision: str) -> list[str]:
    """The paths of every file in a Hub dataset repo at `revision`."""
    from huggingface_hub import HfApi

    return HfApi().list_repo_files(repo, repo_type="dataset", revision=revision)


# --- loading --------------------------------------------------------------------------------


def load_source(spec: TaskSpec) -> datasets.DatasetDict:
    """The splits of `spec.path` that the run uses (`split.used_splits`), with the source's own
    column names and features. The other splits are not downloaded, prepared or read.

    Raises:
        PlrError: no `task.path`, a missing local path, an unreadable local dataset, a split name
            the dataset lacks, a partial parquet conversion, or a hub id that is neither cached
            nor reachable.
    """
    if not spec.path:
        raise PlrError(f"task '{spec.name}' (loader {spec.loader}) needs a dataset; "
                       f"set task.path=<hub id or local path>")
    if spec.data_format is not None and spec.data_format not in FORMATS:
        raise PlrError(f"task.data_format='{spec.data_format}' is not supported; set task.data_format=<one of: "
                       f"{', '.join(FORMATS)}> or null to infer it")
    wanted = used_splits(spec)
    if looks_local(spec.path):
        return _load_local(spec, check_local_path(spec.path, what="dataset", key="task.path"), wanted)
    # Offline, `load_from_hub` makes the load cache-only (datasets has no local_files_only).
    return load_from_hub(lambda local_files_only: _load_hub(spec, wanted, local_files_only), spec.path,
                         what="dataset", key="task.path")


def _load_hub(spec: TaskSpec, wanted: Mapping[str, str], cached: bool) -> datasets.DatasetDict:
    """A Hub repo at `task.revision`, or its parquet conversion when that revision holds a loading script.

    With `cached` (no Hub), the used splits come from what an earlier online load prepared: our
    own cache entry of exactly these splits, else `datasets`' entry of the whole config.
    """
    repo = spec.path
    assert repo is not None
    splits = list(dict.fromkeys(wanted.values()))
    if cached:
        for converted in (False, True):
            found = _load_cached(repo, cache_id(spec, splits, converted), splits)
            if found is not None:
                return found
    try:
        builder = hub_builder(repo, spec.subset, spec.revision)
    except RuntimeError as e:
        script = _SCRIPT.search(str(e))
        if script is None:
            raise
        if spec.revision == CONVERTED:
            raise PlrError(f"dataset '{repo}' holds a loading script ({script['file']}) even at revision "
                           f"{CONVERTED}; download its data where it is published and set task.path=<local dir>") from e
        return _load_converted(spec, wanted, script["file"])
    where = f"dataset '{repo}'" + (f" (revision {spec.revision})" if spec.revision else "")

    def rebuild(files: Files, features: datasets.Features | None, _cache_dir: str | None) -> datasets.DatasetBuilder:
        return hub_builder(repo, builder.config.name, spec.revision, files, features, cache_id(spec, splits, False))

    return prepare_splits(builder, rebuild, wanted, where)


def cache_id(spec: TaskSpec, splits: Sequence[str], converted: bool) -> str:
    """The `datasets` cache entry (config id) of a Hub load restricted to `splits`.

    Ours, so an offline rerun finds it (`_load_cached`); the entry's hash folder is the repo's
    commit, so two revisions never share one.
    """
    parts = ["plr", spec.subset or "default", *(["converted"] if converted else []), "+".join(splits)]
    return re.sub(r'[<>:/\\|?*"]', "_", "-".join(parts))


def _load_cached(repo: str, config_id: str, splits: Sequence[str]) -> datasets.DatasetDict | None:
    """The newest prepared copy of cache entry `config_id` of `repo`, or None (no Hub is asked)."""
    from datasets.naming import camelcase_to_snakecase
    from datasets.packaged_modules.cache.cache import Cache

    *namespace, name = repo.split("/")
    name = camelcase_to_snakecase(name)
    root = Path(datasets.config.HF_DATASETS_CACHE).expanduser() / "___".join([*namespace, name]) / config_id
    found = sorted((d for d in root.glob("*/*") if (d / datasets.config.DATASET_INFO_FILENAME).is_file()),
                   key=lambda d: d.stat().st_mtime)
    if not found:
        return None
    version, hash_ = found[-1].parts[-2:]
    builder = Cache(repo_id=repo, dataset_name=name, config_name=config_id, version=version, hash=hash_)
    if not set(splits) <= set(builder.info.splits or {}):
        return None
    return build_splits(builder, splits)


def _load_converted(spec: TaskSpec, wanted: Mapping[str, str], script: str) -> datasets.DatasetDict:
    """The used splits of `refs/convert/parquet`, read as per-split data files of one config folder."""
    repo = spec.path
    assert repo is not None
    configs = converted_layout(hub_files(repo, CONVERTED))
    if not configs:
        raise PlrError(f"dataset '{repo}' holds a loading script ({script}), which datasets {datasets.__version__} "
                       f"no longer runs, and has no parquet conversion at {CONVERTED}; download its data and set "
                       "task.path=<local dir>")
    config = _converted_config(spec, configs)
    where = f"the parquet conversion of '{repo}' ({CONVERTED}, config {config})"
    check_splits(wanted, list(configs[config]), where)
    splits = list(dict.fromkeys(wanted.values()))
    mapped = "" if spec.subset in (None, config) else f" (task.subset='{spec.subset}' is converted as '{config}')"
    log.warning("dataset '%s'%s holds a loading script (%s), which datasets %s no longer runs; reading the Hub's "
                "parquet conversion instead: revision %s, config %s%s, splits %s", repo,
                f" at revision {spec.revision}" if spec.revision else "", script, datasets.__version__, CONVERTED,
                config, mapped, ", ".join(splits))
    builder = hub_builder(repo, None, CONVERTED, {s: configs[config][s] for s in splits},
                          config_id=cache_id(spec, splits, converted=True))
    return build_splits(builder, splits)


def _converted_config(spec: TaskSpec, configs: Mapping[str, Files]) -> str:
    """`task.subset` if the conversion has that config folder, else its only (or `default`) one."""
    if spec.subset in configs:
        return spec.subset
    if len(configs) == 1:
        return next(iter(configs))
    if spec.subset is None and "default" in configs:
        return "default"
    raise PlrError(f"task.subset={spec.subset!r} is not a config of the parquet conversion of '{spec.path}' "
                   f"({CONVERTED}; configs: {', '.join(configs)}); set task.subset=<one of those>")


def _load_local(spec: TaskSpec, path: Path, wanted: Mapping[str, str]) -> datasets.DatasetDict:
    """Load a local file (one `train` split) or directory (splits as laid out, else inferred by
    `datasets`); a failure is one line naming the file (`datasets`' own log lines are held back)."""
    with _held_logs() as logs:
        try:
            return _read_local(spec, path, wanted)
        except PlrError:
            raise
        except Exception as e:  # noqa: BLE001 - datasets raises FileNotFoundError, ValueError, ArrowInvalid...
            raise _read_error(spec, path, e, logs) from None


@contextmanager
def _held_logs() -> Iterator[list[str]]:
    """`datasets`' log records during the block, collected instead of printed (a failed read is reported
    once, in plr's line; the records may name the file)."""
    logger = logging.getLogger("datasets")
    records: list[str] = []

    class Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    saved = logger.handlers[:], logger.propagate
    logger.handlers, logger.propagate = [Hold(logging.WARNING)], False
    try:
        yield records
    finally:
        logger.handlers, logger.propagate = saved


def _read_error(spec: TaskSpec, path: Path, e: Exception, logs: Sequence[str]) -> PlrError:
    """One line for a local dataset that `datasets` could not read: the file and column when known."""
    chain = _chain(e)
    cause = next((c for c in chain if isinstance(c, UnicodeDecodeError)), None)
    if cause is not None:
        return PlrError(f"task.path='{spec.path}' is not UTF-8 text (it holds the byte "
                        f"{cause.object[cause.start]:#04x}); re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8 IN > "
                        "OUT")
    texts = [str(c) for c in chain] + list(logs)
    columns = next((m for t in texts if (m := _COLUMNS.search(t))), None)
    if columns is not None:
        return PlrError(f"the data files of task.path='{spec.path}' do not share their columns: {columns['file']} has "
                        f"{columns['new']} and lacks {columns['missing']}, which the file read first has; give every "
                        "split file the same columns (task.text_column, task.label_column)")
    inner = next((c for c in reversed(chain) if first_line(c) and not first_line(c).startswith(
        "An error occurred while generating")), e)
    first = first_line(inner) or type(inner).__name__
    if _SCRIPT.search(first):
        _refuse_script_only(spec, path, force=True)
    read = [f for f in identity.current() if identity.is_local(f)]
    named = [f for f in read if any(f in t for t in texts)]
    culprit = named[0] if named else next((m["file"] for t in texts if (m := _NAMED.search(t))), None)
    culprit = culprit or (read[0] if len(read) == 1 else _failing_file(read))
    if culprit is None and len(read) > 1:  # each file reads on its own: they disagree with each other
        return PlrError(f"the data files of task.path='{spec.path}' do not agree on their columns' types "
                        f"({type(inner).__name__}: {first}); give every split file the same columns with values of "
                        "the same type (e.g. every label a whole number, or every one a decimal)")
    what = f"{culprit} of task.path='{spec.path}'" if culprit else f"the dataset at task.path='{spec.path}'"
    return PlrError(f"could not read {what} ({type(inner).__name__}: {first}); fix or replace that file, point "
                    "task.path at parquet/csv/json files or a folder of them (or an image folder), and set "
                    "task.data_format if the format cannot be inferred")


def _failing_file(files: Sequence[str]) -> str | None:
    """The first of `files` that `datasets` cannot read on its own (tried only after a load failed, in a
    scratch cache), or None."""
    import tempfile

    for f in files:
        fmt = EXTENSIONS.get(Path(f).suffix.lower())
        if fmt is None:
            continue
        with tempfile.TemporaryDirectory() as scratch:
            try:
                datasets.load_dataset_builder(fmt, data_files=[f], cache_dir=scratch).download_and_prepare()
            except Exception:  # noqa: BLE001 - any failure names this file
                return f
    return None


_COLUMNS = re.compile(r"there are \d+ new columns \((?P<new>.*?)\) and \d+ missing columns \((?P<missing>.*?)\)"
                      r".*?generating data using\s+(?P<file>[^\s,]+)", re.S)
_NAMED = re.compile(r"(?:from|file) '(?P<file>[^']+)'")


def _read_local(spec: TaskSpec, path: Path, wanted: Mapping[str, str]) -> datasets.DatasetDict:
    fmt = spec.data_format
    where = f"the dataset at task.path='{spec.path}'"
    if path.is_file():
        if path.stat().st_size == 0:
            raise PlrError(f"task.path='{spec.path}' is an empty file (0 bytes); point task.path at the data")
        if fmt == "imagefolder":
            raise PlrError(f"task.data_format=imagefolder needs a folder, but task.path='{spec.path}' is a file; "
                           f"set task.path=<the folder holding train/, test/ ...>")
        fmt = fmt or EXTENSIONS.get(path.suffix.lower())
        if fmt is None:
            raise PlrError(f"task.path='{spec.path}' is a file of unknown format; use a "
                           f"{'/'.join(EXTENSIONS)} file or set task.data_format=<one of: parquet, csv, json>")
        return prepare_files(fmt, {"train": [str(path)]}, wanted, where)
    name = spec.subset
    if name and (path / name).is_dir():
        # `hf download ... --local-dir DIR` keeps one subfolder per config (e.g. glue/sst2/).
        path, name = path / name, None
    layout = hub_layout_splits(path) if fmt in (None, "parquet", "csv", "json") and not name else None
    if layout is not None and fmt in (None, layout[0]):
        return prepare_files(layout[0], layout[1], wanted, where)
    _refuse_script_only(spec, path)
    if fmt is None:
        builder = datasets.load_dataset_builder(str(path), name)

        def rebuild(files: Files, features: datasets.Features | None, cache: str | None) -> datasets.DatasetBuilder:
            return datasets.load_dataset_builder(str(path), builder.config.name, data_files=files,
                                                 features=features, cache_dir=cache)

        return prepare_splits(builder, rebuild, wanted, where, local=True)
    if name:
        raise PlrError(f"task.subset='{name}' is not a subfolder of '{path}'; set task.subset=null or "
                       f"task.path=<the folder holding that config's files>")
    packaged = fmt

    def rebuild_packaged(files: Files, features: datasets.Features | None,
                         cache: str | None) -> datasets.DatasetBuilder:
        return datasets.load_dataset_builder(packaged, data_files=files, features=features, cache_dir=cache)

    return prepare_splits(datasets.load_dataset_builder(fmt, data_dir=str(path)), rebuild_packaged, wanted, where,
                          local=True)


def _chain(e: BaseException) -> list[BaseException]:
    """`e` and the exceptions behind it (datasets wraps the reader's error in DatasetGenerationError)."""
    out: list[BaseException] = []
    while e is not None and all(e is not seen for seen in out):
        out.append(e)
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return out


def _refuse_script_only(spec: TaskSpec, path: Path, force: bool = False) -> None:
    """A local copy of a script-only repo (a `<name>.py` and no data files): say how to get its data."""
    scripts = sorted(p.name for p in path.glob("*.py"))
    if not scripts or (not force and any(f.suffix.lower() in EXTENSIONS for f in path.rglob("*"))):
        return
    raise PlrError(f"task.path='{spec.path}' holds a loading script ({scripts[0]}), which datasets "
                   f"{datasets.__version__} no longer runs; download the Hub's parquet conversion instead "
                   f"(hf download <id> --repo-type dataset --revision {CONVERTED} --local-dir DIR) and set "
                   "task.path=DIR")
