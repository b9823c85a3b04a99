"""`from_run`: another run's probe, and its allocation, reused when they were made with this run's settings."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from partial_lora import artifacts, rundir
from partial_lora.errors import PlrError
from partial_lora.spec import RunSpec


def reuse_from_run(spec: RunSpec, run_dir: Path, stages: list[str], echo: Callable[[str], None],
                   data: dict[str, str] | None = None) -> None:
    """Copy another run's probe (when its settings are this run's) and its allocation (when the
    allocation settings match too) into this run dir."""
    assert spec.from_run is not None
    settings = spec.settings
    src = Path(spec.from_run).expanduser()
    finished = artifacts.is_done(src, artifacts.PROBE) or artifacts.is_done(src, artifacts.ALLOCATE)
    if not (src / artifacts.HYDRA_CONFIG).exists() and not finished:
        raise PlrError(f"from_run={src} is not a plr run dir (no .hydra/config.yaml and no finished probe or "
                       "allocate stage); point from_run at a run dir")
    if src.resolve() == run_dir.resolve():
        return
    for name in (artifacts.PROBE, artifacts.ALLOCATE):
        if name not in stages or artifacts.is_done(run_dir, name) or not artifacts.is_done(src, name):
            continue
        if name == artifacts.ALLOCATE:
            theirs = artifacts.read_json(artifacts.stage_dir(src, name) / artifacts.ALLOCATION).get("settings")
            theirs = rundir.resolved_allocation(theirs) if isinstance(theirs, dict) else theirs
            ours = rundir.allocation_settings(spec)
            if theirs != ours or not artifacts.is_done(run_dir, artifacts.PROBE) and artifacts.PROBE in stages:
                diff = sorted(k for k in set(ours) | set(theirs or {}) if (theirs or {}).get(k) != ours.get(k))
                echo(f"[plr] from_run: allocation settings differ ({', '.join(diff) or 'the probe'}); allocating again")
                continue
        if name == artifacts.PROBE:
            keys = ("model.name", "task.name", "adapter.r", "adapter.targets", "seed")
            for key, value in (rundir.saved_values(src, keys) or {}).items():
                if value != rundir.lookup(settings, key):
                    raise PlrError(f"from_run={src} has {key}={value}, this run {rundir.lookup(settings, key)}; its "
                                   f"probe does not apply (use a run with the same {key})")
            theirs = rundir.made_with(src, name)
            diff = rundir.changed(theirs, rundir.fingerprint(settings, name, data)) if theirs is not None else {}
            if diff:  # e.g. other probe shots or learning rate, or other data: the probe is not this run's
                echo(f"[plr] from_run: probe settings differ ({', '.join(diff)}); probing again")
                continue
        shutil.copytree(artifacts.stage_dir(src, name), artifacts.stage_dir(run_dir, name), dirs_exist_ok=True)
        rundir.record(run_dir, name, settings, data)  # valid for this run's settings
        echo(f"[plr] from_run: reusing {name} from {src}")
