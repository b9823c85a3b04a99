"""Who may touch a run dir: one process at a time (the lock); a failed command deletes only what it made.

- **The lock.** `plr train` holds `filelock`'s lock on `<run_dir>/.lock` for the whole run
  (rank 0 alone under a multi-process launch); `plr study` holds its study folder the same way.
  A second process on the same folder stops with one line naming the holder (pid, host, start
  time, command), read from `.lock.json`. The OS drops the lock when its holder dies, even by
  kill -9, so a killed run never leaves it stuck.
- **Only what it made.** A failed or interrupted run removes what it wrote itself and nothing else
  (`Claim`): the files and folders that were not there when the command started, unless a
  finished stage or a checkpoint makes the run resumable, in which case all stays. A folder that
  holds other files and no plr run (`is_run_dir`) is refused as a run dir before anything starts.

The settings a run dir was made with (its stages' fingerprints) are `rundir`'s.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from partial_lora import artifacts
from partial_lora.errors import PlrError

LOCK, HOLDER = ".lock", ".lock.json"


def _holder(run_dir: Path) -> str:
    try:
        h = json.loads((run_dir / HOLDER).read_text())
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(h["started"])))
        return f"pid {h['pid']} on {h['host']} (user {h.get('user', '?')}), started {started}: {h.get('command', '?')}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its holder file is missing or unreadable)"


@contextmanager
def locked(run_dir: Path, what: str = "run dir", other: str = "choose another run_dir") -> Iterator[None]:
    """Hold the run dir's lock for the block (`what`/`other`: how the refusal names the folder and the
    way out; `plr study` holds its study folder the same way).

    Raises:
        PlrError: another process holds it (named, with pid, host and start time).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / LOCK), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise PlrError(f"{what} {run_dir} is in use by {_holder(run_dir)}; wait for it to finish, stop it, or "
                       f"{other}") from None
    try:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = "?"
        artifacts.write_json(run_dir / HOLDER, {"pid": os.getpid(), "host": socket.gethostname(), "user": user,
                                                "started": time.time(), "command": " ".join(sys.argv)[:300]})
        yield
    finally:
        (run_dir / HOLDER).unlink(missing_ok=True)
        lock.release()


def is_run_dir(path: Path) -> bool:
    """Whether a folder is (or was begun as) a plr run dir: its `.hydra/`, lock, results or a stage folder."""
    return any((path / name).exists() for name in (".hydra", LOCK, artifacts.RESULTS, *artifacts.STAGES))


def _entries(root: Path) -> set[str]:
    """Every file, folder and link under `root`, as paths relative to it (links are not followed)."""
    out: set[str] = set()
    for top, dirs, files in os.walk(root):
        rel = Path(top).relative_to(root)
        out.update(str(rel / n) for n in (*dirs, *files))
    return out


REWRITTEN = (str(artifacts.HYDRA_CONFIG), str(artifacts.HYDRA_YAML), str(artifacts.HYDRA_OVERRIDES), artifacts.GIT,
             artifacts.ENV)


class Claim:
    """What a `plr train` command may delete: only what it created.

    Made before the command creates anything (`commands.train.train`): it records whether the run dir existed,
    which of its parent folders did not, and every entry under it. `undo` removes, deepest first,
    the files and links that were not there then and the folders that were not there then and
    are empty by now; then the run dir and the parents it created, if empty. The files a run
    rewrites when it starts (`.hydra/*.yaml`, git.json, env.json) get their earlier bytes back; a
    log is appended to, not restored. It never removes a
    folder with content it did not make, never follows a link, and never uses rmtree. `keep`
    settles the claim without removing anything (a resumable run, or a run dir in use by another
    process).
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.existed = run_dir.is_dir()
        self.before = _entries(run_dir) if self.existed else set()
        self.made = [p for p in (run_dir, *run_dir.parents) if not p.exists()]  # deepest first
        # The files a run rewrites whole when it starts (small): put back as they were by `undo`.
        self.saved = {rel: (run_dir / rel).read_bytes() for rel in REWRITTEN if (run_dir / rel).is_file()}
        self.settled = False

    def keep(self) -> None:
        self.settled = True

    def undo(self, *, holding_lock: bool = False) -> list[str]:
        """Remove what this command created (see the class); returns what it removed, relative to the run dir.

        Without `holding_lock` it takes the run dir's lock first, and removes nothing if another
        process holds it (the new entries may be that process's).
        """
        if self.settled:
            return []
        self.settled = True
        if not self.run_dir.is_dir():
            return self._remove_made()
        if holding_lock:
            return self._remove_new() + self._remove_made()
        lock = FileLock(str(self.run_dir / LOCK), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            return []
        try:
            removed = self._remove_new()
        finally:
            lock.release()
        if (self.run_dir / LOCK).exists() and LOCK not in self.before:
            (self.run_dir / LOCK).unlink(missing_ok=True)
            removed.append(LOCK)
        return removed + self._remove_made()

    def _remove_new(self) -> list[str]:
        for rel, data in self.saved.items():
            path = self.run_dir / rel
            if not path.is_file() or path.read_bytes() != data:
                artifacts.write_bytes(path, data)
        removed = []
        for rel in sorted(_entries(self.run_dir) - self.before, key=lambda r: (-len(Path(r).parts), r)):
            path = self.run_dir / rel
            try:
                if path.is_dir() and not path.is_symlink():
                    path.rmdir()  # emptied by now unless it holds something it had before (then kept)
                else:
                    path.unlink()
                removed.append(rel)
            except OSError:
                continue
        return removed

    def _remove_made(self) -> list[str]:
        removed = []
        for folder in self.made:
            if not folder.exists():
                continue
            try:
                folder.rmdir()
                removed.append(str(folder))
            except OSError:
                break  # not empty (or gone): its parents are not ours to clear either
        return removed
