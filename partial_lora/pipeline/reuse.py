"""`from_run`: another run's probe, and its allocation, reused when they were made with this run's settings."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from partial_lora import artifacts as A
from partial_lora import rundir as RD
from partial_lora.errors import PlrError
from partial_lora.spec import RunSpec

def reuse_from_run(spec: RunSpec, run_dir: Path, stages: list[str], echo: Callable[[str], None],
                   data: dict[str, str] | None = None) -> None:
    """Copy another run's probe (when its settings are this run's) and its allocation (when the
    allocation settings match too) into this run dir."""
    assert spec.from_run is not None
    settings = spec.settings
    src = Path(spec.from_run).expanduser()
    if not (src / A.HYDRA_CONFIG).exists() and not A.is_done(src, A.PROBE) and not A.is_done(src, A.ALLOCATE):
        raise PlrError(f"from_run={src} is not a plr run dir (no .hydra/config.yaml and no finished probe or "
                       "allocate stage); point from_run at a run dir")
    if src.resolve() == run_dir.resolve():
        return
    for name in (A.PROBE, A.ALLOCATE):
        if name not in stages or A.is_done(run_dir, name) or not A.is_done(src, name):
            continue
        if name == A.ALLOCATE:
            theirs = A.read_json(A.stage_dir(src, name) / A.ALLOCATION).get("settings")
            theirs = RD.resolved_allocation(theirs) if isinstance(theirs, dict) else theirs
            ours = RD.allocation_settings(spec)
            if theirs != ours or not A.is_done(run_dir, A.PROBE) and A.PROBE in stages:
                diff = sorted(k for k in set(ours) | set(theirs or {}) if (theirs or {}).get(k) != ours.get(k))
                echo(f"[plr] from_run: allocation settings differ ({', '.join(diff) or 'the probe'}); allocating again")
                continue
        if name == A.PROBE:
            keys = ("model.name", "task.name", "adapter.r", "adapter.targets", "seed")
            for key, value in (RD.saved_values(src, keys) or {}).items():
                if value != RD.lookup(settings, key):
                    raise PlrError(f"from_run={src} has {key}={value}, this run {RD.lookup(settings, key)}; its probe "
                                   f"does not apply (use a run with the same {key})")
            theirs = RD.made_with(src, name)
            diff = RD.changed(theirs, RD.fingerprint(settings, name, data)) if theirs is not None else {}
            if diff:  # e.g. other probe shots or learning rate, or other data: the probe is not this run's
                echo(f"[plr] from_run: probe settings differ ({', '.join(diff)}); probing again")
                continue
        shutil.copytree(A.stage_dir(src, name), A.stage_dir(run_dir, name), dirs_exist_ok=True)
        RD.record(run_dir, name, settings, data)  # valid for this run's settings
        echo(f"[plr] from_run: reusing {name} from {src}")
