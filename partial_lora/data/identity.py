"""The identity of a task's data: a content digest of every data file a load reads.

A loader notes what it reads (`note_file` for a local file, `note` for a source that is already
content-addressed, such as a Hub file URL that names its commit) inside `recording()`, which
`registry.load_task` opens around each load; the task's `TaskData.sources` maps each source to its
digest. Each stage's fingerprint holds them (`rundir`), so a rerun or resume after a data file
changed is refused, naming the file, instead of training the later stages on other data than the
earlier ones. A source is named where it does not depend on the machine: a file under `task.path`
by `task.path` and its place in it (`data/train.csv`), a fetched table by its `fetch:` reference, the
built-in corpora by name; so a run dir moved with its data to another folder still matches.

The digest is BLAKE2b (16 bytes) of the file's bytes, read in 4 MiB blocks, once per load and
file; it reads each file once at disk speed (see the README for the measured cost).

`content_cache_dir` keys `datasets`' cache of local files by their content. `datasets` keys it by
path and modification time, so a file edited with its size and mtime kept (a copy with
`cp -p`, `touch -r`, a coarse-clock file system) was read back from the stale cache; under a
folder named by the digest, a cached copy always holds the bytes the file holds now.
"""

from __future__ import annotations

import contextvars
import hashlib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path, PurePath

import datasets

_BLOCK = 4 << 20
_SEEN: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("plr_data_sources", default=None)


def digest_file(path: str | Path) -> str:
    """BLAKE2b-128 of a file's bytes, as hex."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def digest_text(parts: Iterable[str]) -> str:
    """BLAKE2b-128 of strings (e.g. several digests), as hex."""
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()


@contextmanager
def recording() -> Iterator[dict[str, str]]:
    """Collect what the loads inside the block read: {source: digest}."""
    seen: dict[str, str] = {}
    token = _SEEN.set(seen)
    try:
        yield seen
    finally:
        _SEEN.reset(token)


def note(source: str, digest: str) -> None:
    """Record a source that is identified without reading it (a Hub URL with its commit, a cache entry)."""
    seen = _SEEN.get()
    if seen is not None:
        seen[source] = digest


def note_file(path: str | Path) -> str:
    """Digest a local data file (once per recording) and record it; returns the digest."""
    key = str(Path(path).resolve())
    seen = _SEEN.get()
    if seen is not None and key in seen:
        return seen[key]
    digest = digest_file(key)
    note(key, digest)
    return digest


def is_local(path: str) -> bool:
    return "://" not in path and Path(path).is_file()


def named(sources: Mapping[str, str], path: str | None) -> dict[str, str]:
    """`sources` with each local file under `path` (a task's `task.path`) named by `path` and its place in it."""
    if not path or "://" in path or ":" in path.split("/")[0]:
        return dict(sorted(sources.items()))
    root = Path(path).expanduser().resolve()
    out = {}
    for key, digest in sources.items():
        p = Path(key)
        if p.is_absolute() and (p == root or root in p.parents):
            key = path if p == root else str(PurePath(path) / p.relative_to(root))
        out[key] = digest
    return dict(sorted(out.items()))


def content_cache_dir(files: Iterable[str]) -> str:
    """`datasets`' cache folder for a load of these local files, named by their content (and paths)."""
    files = sorted(files)
    key = digest_text([f"{f}={note_file(f)}" for f in files])
    return str(Path(datasets.config.HF_DATASETS_CACHE).expanduser() / "plr-by-content" / key)


def note_files(files: Mapping[str, Iterable[str]] | Iterable[str]) -> None:
    """Record every file of a split -> files mapping (or a list): local ones by content, URLs as they are."""
    paths = [f for fs in files.values() for f in fs] if isinstance(files, Mapping) else list(files)
    for f in paths:
        f = str(f)
        if is_local(f):
            note_file(f)
        else:
            note(f, f)  # a Hub file URL names its commit (hf://datasets/<repo>@<sha>/...)


def current() -> dict[str, str]:
    """What the open recording has noted so far (empty outside one)."""
    return dict(_SEEN.get() or {})
