"""Experiment trackers (the `logger` config group): `none` or `wandb`.

Logging never kills a run: if wandb cannot start (no API key for online mode, no network, bad
entity) the run goes on with local files only, after one warning.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from partial_lora.errors import first_line


class Tracker(Protocol):
    def log(self, values: Mapping[str, Any], step: int | None = None) -> None: ...

    def finish(self) -> None: ...


class WandbTracker:
    def __init__(self, run: Any) -> None:
        self.run = run

    def log(self, values: Mapping[str, Any], step: int | None = None) -> None:
        try:
            self.run.log(dict(values))
        except Exception as e:  # noqa: BLE001 - a tracker hiccup must not end training
            warnings.warn(f"wandb log failed ({type(e).__name__}); continuing with local metrics only", stacklevel=2)

    def finish(self) -> None:
        try:
            self.run.finish()
        except Exception:  # noqa: BLE001
            pass


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def make_tracker(kind: str, *, run_dir: Path, name: str, config: Mapping[str, Any], project: str = "plr",
                 entity: str | None = None, mode: str = "online", tags: list[str] | None = None) -> Tracker | None:
    """Start a tracker, or return None (local files only) when it is off or cannot start."""
    if kind == "none":
        return None
    if kind != "wandb":
        from partial_lora.errors import PlrError

        raise PlrError(f"unknown logger '{kind}'; use logger=none or logger=wandb")
    mode = os.environ.get("WANDB_MODE", mode)
    if mode == "disabled":
        return None
    if mode == "online" and not _has_wandb_key():
        warnings.warn("wandb: no API key (WANDB_API_KEY or `wandb login`); logging offline to the run dir "
                      "instead (sync later with `wandb sync`)", stacklevel=2)
        mode = "offline"
    try:
        import wandb

        run = wandb.init(project=project, entity=entity, name=name, config=dict(config), dir=str(run_dir),
                         mode=mode, tags=tags or None, reinit="finish_previous")
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"wandb could not start ({type(e).__name__}: {first_line(e)}); "
                      "continuing with local metrics only", stacklevel=2)
        return None
    return WandbTracker(run)
