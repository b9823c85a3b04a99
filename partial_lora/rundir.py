"""A run dir is a contract: one process at a time, and every stage made with the settings of this run.

- **The lock.** `plr train` holds `filelock`'s lock on `<run_dir>/.lock` for the whole run
  (rank 0 alone under a multi-process launch). A second process on the same run dir stops with
  one line naming the holder (pid, host, start time, command), read from `.lock.json`. The OS
  drops the lock when its holder dies, even by kill -9, so a killed run never leaves it stuck.
- **Fingerprints.** A stage records, when it starts, the settings that determine its output
  (`<stage>/fingerprint.json`): the resolved config, minus the keys that only change how a run
  is run or named (`FREE`), minus the keys that only later stages read (`LATER`). A rerun
  into the run dir compares its own settings with every stage that has one, finished or
  checkpointed, and refuses on any difference, listing the keys, before anything is written
  (a key that a record lacks is an option added since, and is not compared).
  So `.hydra/` is never rewritten by a refused rerun (plr writes `.hydra/` itself, after the
  check; Hydra's own writing is off, `hydra.output_subdir: null`).
- **`--rerun-from STAGE`** deletes that stage and every later one (and `results.json`), so they
  run again with the new settings; the earlier stages must still match.

Stages finished before fingerprints existed have none, and are not checked.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from omegaconf import OmegaConf

from partial_lora import artifacts as A
from partial_lora.errors import PlrError

LOCK, HOLDER = ".lock", ".lock.json"
FINGERPRINT = "fingerprint.json"
HYDRA_YAML = A.HYDRA_CONFIG.parent / "hydra.yaml"

# Keys that never change a stage's output: where and under what name a run goes, how it is
# logged, shown and scheduled, on which device it resumes. Prefixes end in "."; others are exact.
FREE = ("run_dir", "out_root", "name", "label", "from_run", "logger.", "adapter.name", "trainer.progress",
        "trainer.num_workers", "trainer.eval_batch_size", "trainer.device", "trainer.checkpoint_every",
        "trainer.compile", "trainer.strategy")
# Keys a stage does not read (only the stages after it do).
_RETRAIN_ONLY = ("retrain.", "trainer.epochs", "trainer.max_steps")
# SNIP's batches (`adapter.snip`) are read by extract, and by allocate when its search ranks with
# SNIP; SHiRA's mask (`adapter.shira`) by extract alone.
LATER: dict[str, tuple[str, ...]] = {
    A.PROBE: (*_RETRAIN_ONLY, "adapter.sparsity", "adapter.allocation.", "adapter.mask.", "adapter.match.",
              "adapter.snip.", "adapter.shira."),
    A.ALLOCATE: (*_RETRAIN_ONLY, "adapter.mask.shared_input",  # the search ranks each layer on its own
                 "adapter.shira."),
    A.EXTRACT: _RETRAIN_ONLY,
    A.RETRAIN: (),
    A.EVALUATE: (),
}


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key.startswith(p) if p.endswith(".") else key == p for p in patterns)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved config (a plain mapping) as dotted keys, the `FREE` ones left out."""
    flat = _flatten(config)
    return {k: v for k, v in flat.items() if not _matches(k, FREE)}


def fingerprint(config: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """The settings that determine `stage`'s output (JSON round-tripped, as it is stored)."""
    keep = {k: v for k, v in settings(config).items() if not _matches(k, LATER[stage])}
    return json.loads(json.dumps(keep, default=A.json_default, sort_keys=True))


def record(run_dir: Path, stage: str, config: Mapping[str, Any]) -> None:
    """Write the stage's fingerprint (when it starts, so a checkpointed stage has one too)."""
    A.write_json(A.stage_dir(run_dir, stage) / FINGERPRINT, fingerprint(config, stage))


def _recorded(run_dir: Path, stage: str) -> dict[str, Any] | None:
    path = A.stage_dir(run_dir, stage) / FINGERPRINT
    if not path.exists():
        return None
    got = A.read_json(path)
    if not isinstance(got, dict):
        raise PlrError(f"corrupt artifact {path} (not a JSON object); rerun with --rerun-from {stage}")
    return got


def made_with(run_dir: Path, stage: str) -> dict[str, Any] | None:
    """The settings `stage` of a run dir was made with: its fingerprint, or for a run dir from
    before fingerprints, the same keys taken from its `.hydra/config.yaml` (None: neither)."""
    recorded = _recorded(run_dir, stage)
    if recorded is not None:
        return recorded
    path = run_dir / A.HYDRA_CONFIG
    if not path.is_file():
        return None
    conf = OmegaConf.load(path)
    try:
        plain = OmegaConf.to_container(conf, resolve=True)
    except Exception:  # noqa: BLE001 - an interpolation that needs Hydra's runtime (${now:...}, ${hydra:...})
        plain = OmegaConf.to_container(conf, resolve=False)
    return fingerprint(plain, stage)  # type: ignore[arg-type]


def changed(theirs: Mapping[str, Any], ours: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (theirs, ours)} for the recorded keys whose value differs now.

    A key that the record lacks is not compared: it is an option added since, and a new option's
    default keeps the old behaviour (so adding an option does not invalidate every run dir).
    """
    return {k: (theirs[k], ours.get(k)) for k in sorted(theirs) if ours.get(k) != theirs[k]}


def _show(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, str) else v
    return text if len(text) <= 40 else text[:37] + "..."


def differences(run_dir: Path, config: Mapping[str, Any]) -> dict[str, dict[str, tuple[Any, Any]]]:
    """Per stage with a fingerprint: {key: (recorded, now)} for every key that differs."""
    out: dict[str, dict[str, tuple[Any, Any]]] = {}
    for stage in A.STAGES:
        theirs = _recorded(run_dir, stage)
        if theirs is not None and (diff := changed(theirs, fingerprint(config, stage))):
            out[stage] = diff
    return out


def describe(diff: Mapping[str, Mapping[str, tuple[Any, Any]]], limit: int = 6) -> str:
    """`differences`' keys as `key then -> now`, the first `limit` of them, then how many more."""
    keys: dict[str, tuple[Any, Any]] = {}
    for per in diff.values():
        keys.update(per)
    shown = ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in list(keys.items())[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check(run_dir: Path, config: Mapping[str, Any]) -> None:
    """Refuse a run dir whose stages were made with other settings.

    Raises:
        PlrError: one line with the differing keys (then and now), the stages they touch, and
            the two ways on: a new run_dir, or --rerun-from the earliest such stage.
    """
    diff = differences(run_dir, config)
    if not diff:
        return
    first = next(s for s in A.STAGES if s in diff)
    raise PlrError(f"run dir {run_dir} was made with other settings ({describe(diff)}; in {', '.join(diff)}); "
                   f"choose a new run_dir, or add --rerun-from {first} to redo {first} and every later stage "
                   "with these settings")


def rerun_from(run_dir: Path, stage: str, echo: Any = print) -> None:
    """Delete `stage` and every stage after it, and the run's results, so they run again."""
    if stage not in A.STAGES:
        raise PlrError(f"--rerun-from {stage}: no such stage; choose one of {', '.join(A.STAGES)}")
    cleared = []
    for name in A.STAGES[A.STAGES.index(stage):]:
        d = A.stage_dir(run_dir, name)
        if d.exists():
            shutil.rmtree(d)
            cleared.append(name)
    (run_dir / A.RESULTS).unlink(missing_ok=True)
    if cleared:
        echo(f"[plr] --rerun-from {stage}: cleared {', '.join(cleared)} in {run_dir}")


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
        A.write_json(run_dir / HOLDER, {"pid": os.getpid(), "host": socket.gethostname(), "user": user,
                                        "started": time.time(), "command": " ".join(sys.argv)[:300]})
        yield
    finally:
        (run_dir / HOLDER).unlink(missing_ok=True)
        lock.release()
