"""The export folder: which out dirs are safe to fill, and writing it whole (`artifacts.atomic_dir`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from partial_lora import artifacts as A
from partial_lora.errors import PlrError
from partial_lora.export.layout import HYDRA_CONFIG


def _is_run_dir(path: Path) -> bool:
    return (path / HYDRA_CONFIG).exists() or (path / A.RESULTS).exists() or any(
        A.is_done(path, s) for s in A.STAGES)


def check_out_dir(out_dir: Path, run_dir: Path, force: bool) -> None:
    """Refuse a file, a non-empty folder (unless `force`), and, even with `force`, any folder that
    is a run dir, lies inside one or holds one: replacing it would delete a run's artifacts."""
    if out_dir.exists() and not out_dir.is_dir():
        raise PlrError(f"out dir '{out_dir}' is a file; choose a folder path")
    target, run = out_dir.resolve(), run_dir.resolve()
    if target == run or target in run.parents:
        raise PlrError(f"out dir '{out_dir}' would hold or replace the run dir itself; choose another folder")
    inside = next((p for p in (target, *target.parents) if _is_run_dir(p)), None)
    if inside is not None:
        raise PlrError(f"out dir '{out_dir}' lies inside the run dir '{inside}', whose artifacts an export must never "
                       "replace; choose a folder outside any run dir")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise PlrError(f"out dir '{out_dir}' is not empty; choose a new folder or pass --force to replace it")
        held = next((p.parent for p in target.rglob("results.json")), None) or next(
            (p.parent.parent for p in target.rglob(str(HYDRA_CONFIG))), None)
        if held is not None:
            raise PlrError(f"out dir '{out_dir}' holds the run dir '{held}'; --force would delete it, so choose another "
                           "folder")


def _write(out_dir: Path, force: bool, fill: Callable[[Path], list[str]]) -> list[str]:
    """Run `fill` on a temporary folder next to `out_dir`, then rename it into place (`artifacts.atomic_dir`)."""
    with A.atomic_dir(out_dir, replace=force, busy=f"out dir '{out_dir}' is not empty; choose a new folder or pass "
                                                    "--force to replace it") as tmp:
        return fill(tmp)
