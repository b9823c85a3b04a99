"""The export folder: which out dirs are safe to fill, and writing it whole (`artifacts.atomic_dir`).

An out dir must be new or empty; with `--force` it may also hold an earlier plr export (only the
files an export writes), which is replaced. Anything else is refused even with `--force`: a folder
with other files, the working folder or one above it, a run dir, a folder inside one or holding
one. plr deletes only what it wrote.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from partial_lora import artifacts
from partial_lora.errors import PlrError
from partial_lora.export.layout import CARD, CONFIG, HYDRA_CONFIG, LAYERS, MASKS, MERGED, PEFT_CONFIG, PEFT_WEIGHTS

EXPORT_FILES = (PEFT_CONFIG, PEFT_WEIGHTS, MASKS, LAYERS, CONFIG, CARD, MERGED)  # what an export writes


def _is_run_dir(path: Path) -> bool:
    return (path / HYDRA_CONFIG).exists() or (path / artifacts.RESULTS).exists() or any(
        artifacts.is_done(path, s) for s in artifacts.STAGES)


def check_out_dir(out_dir: Path, run_dir: Path, force: bool) -> None:
    """Refuse a file, a non-empty folder (unless `force`), and, even with `force`, any folder that
    is a run dir, lies inside one or holds one: replacing it would delete a run's artifacts."""
    if out_dir.exists() and not out_dir.is_dir():
        raise PlrError(f"out dir '{out_dir}' is a file; choose a folder path")
    target, run = out_dir.resolve(), run_dir.resolve()
    if target == run or target in run.parents:
        raise PlrError(f"out dir '{out_dir}' would hold or replace the run dir itself; choose another folder")
    here = Path.cwd().resolve()
    if target == here or target in here.parents:
        raise PlrError(f"out dir '{out_dir}' is the working folder or holds it; choose a new folder for the export")
    inside = next((p for p in (target, *target.parents) if _is_run_dir(p)), None)
    if inside is not None:
        raise PlrError(f"out dir '{out_dir}' lies inside the run dir '{inside}', whose artifacts an export must never "
                       "replace; choose a folder outside any run dir")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise PlrError(f"out dir '{out_dir}' is not empty; choose a new folder or pass --force to replace the "
                           "earlier export in it")
        held = next((p.parent for p in target.rglob("results.json")), None) or next(
            (p.parent.parent for p in target.rglob(str(HYDRA_CONFIG))), None)
        if held is not None:
            raise PlrError(f"out dir '{out_dir}' holds the run dir '{held}'; --force would delete it, so choose "
                           "another folder")
        other = sorted(p.name for p in out_dir.iterdir() if p.name not in EXPORT_FILES)
        if other or not (out_dir / PEFT_CONFIG).is_file() or not (out_dir / LAYERS).is_file():
            shown = f" ({other[0]}{', ...' if len(other) > 1 else ''})" if other else ""
            raise PlrError(f"out dir '{out_dir}' holds files that are not a plr export{shown}; --force replaces only "
                           "an earlier export, never other files: choose a new or empty folder")


def write_folder(out_dir: Path, force: bool, fill: Callable[[Path], list[str]]) -> list[str]:
    """Run `fill` on a temporary folder next to `out_dir`, then rename it into place (`artifacts.atomic_dir`)."""
    # Resolved: `..` or `.` as given have no name to rename the new folder to (os.replace failed on them).
    busy = f"out dir '{out_dir}' is not empty; choose a new folder or pass --force to replace the earlier export in it"
    with artifacts.atomic_dir(out_dir.resolve(), replace=force, busy=busy) as tmp:
        return fill(tmp)
