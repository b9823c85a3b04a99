"""The only module that knows the run dir's file names and formats.

Tensors go to `.safetensors`, everything else to JSON; no pickle is ever loaded, and the typed
readers check what they read (a damaged file is one line naming it and the stage that remakes it). Every write
is atomic (temporary file in the same directory, then `os.replace`; a whole folder, such as an
export or a fetched cache entry, through `atomic_dir`), and a stage counts as
finished only once its `done` marker exists, so a killed run never leaves a half-written
artifact that a rerun would trust.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from partial_lora import distributed
from partial_lora.errors import PlrError, first_line

if TYPE_CHECKING:
    from partial_lora.adapter.masks import Keep
    from partial_lora.allocation.allocators import Allocation

STAGES = ("probe", "allocate", "extract", "retrain", "evaluate")
PROBE, ALLOCATE, EXTRACT, RETRAIN, EVALUATE = STAGES  # each stage's folder (and its module's NAME)

ADAPTER = "adapter.safetensors"  # LoRA factors, compact shapes, keyed `{layer_id}.lora_A/B`
PEFT_STATE = "peft.json"         # PEFT baselines: what the adapter needs besides tensors (AdaLoRA ranks)
HEAD = "head.safetensors"        # classification head, keyed by its module names
INIT = "init.safetensors"        # probe: the adapter's initial values (for rewinding)
FEWSHOT = "fewshot.json"         # probe: few-shot train/val indices into the training split
ALLOCATION = "allocation.json"   # allocate: per-layer keep ratios and how each was found
ALLOCATION_PNG = "allocation.png"
MASKS = "masks.safetensors"      # extract: `{layer_id}.rows` / `.cols` (int64), element masks if any
MASKS_JSON = "masks.json"        # extract: model, method, per-layer shapes and counts
METRICS = "metrics.json"         # the numbers a stage returns
PREDICTIONS = "predictions.parquet"  # evaluate: one row per evaluated example (split, index, label, prediction, score)
CURVE = "metrics.jsonl"          # per-step / per-epoch log
DONE = "done"                    # marker: the stage finished and all its files are complete
RESULTS = "results.json"         # everything the report needs, at the run dir's top
ERROR = "error.txt"              # why a job of a sweep failed (the sweep went on); removed on rerun
GIT, ENV = "git.json", "env.json"
HYDRA_CONFIG = Path(".hydra") / "config.yaml"        # the composed run config (as Hydra writes it; see rundir)
HYDRA_OVERRIDES = Path(".hydra") / "overrides.yaml"  # the command-line overrides
HYDRA_YAML = Path(".hydra") / "hydra.yaml"          # the Hydra settings of the run (plr writes it)

VERSIONED = ("plr", "torch", "torchvision", "transformers", "datasets", "timm", "peft", "hydra-core",
             "omegaconf", "safetensors", "accelerate", "wandb", "numpy", "scikit-learn")


UMASK = os.umask(0o022)
os.umask(UMASK)  # read the process umask (os.umask can only be read by setting it)


def stage_dir(run_dir: Path, stage: str) -> Path:
    return run_dir / stage


def is_done(run_dir: Path, stage: str) -> bool:
    return (stage_dir(run_dir, stage) / DONE).exists()


def mark_done(run_dir: Path, stage: str, metrics: Mapping[str, Any]) -> None:
    """Write the stage's metrics, then its marker (the marker is always last)."""
    write_json(stage_dir(run_dir, stage) / METRICS, metrics)
    _atomic_write_bytes(stage_dir(run_dir, stage) / DONE, b"")


def clear_done(run_dir: Path, stage: str) -> None:
    (stage_dir(run_dir, stage) / DONE).unlink(missing_ok=True)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path next to `path` that replaces it when the block ends without error.

    Under a multi-process launch only rank 0 writes: the other ranks get a scratch path that
    is thrown away.
    """
    if not distributed.is_main():
        with tempfile.TemporaryDirectory() as scratch:
            yield Path(scratch) / path.name
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes owner-only files; give the usual permissions
    try:
        yield Path(tmp)
        # Some writers replace the file (safetensors writes a fresh 0600 one): set the mode again,
        # so tensors and JSON of a run dir share the umask's mode (a cluster group can read both).
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: Path, *, replace: bool, busy: str = "") -> Iterator[Path]:
    """A temporary folder next to `path` that takes its place, whole, when the block ends without
    error (files and folders get the umask's modes); on an error nothing of it remains.

    An existing `path` is moved aside and deleted after the rename. Without `replace`, a `path`
    that is not empty by then raises PlrError(`busy`), and an empty one is replaced.
    """
    import shutil

    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        staged = work / "new"
        staged.mkdir()
        yield staged
        for p in [staged, *staged.rglob("*")]:  # temporary folders are created owner-only
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~UMASK)
        if path.exists():
            if not replace and path.is_dir() and any(path.iterdir()):
                raise PlrError(busy or f"{path} is not empty")
            os.replace(path, work / "old")
        os.replace(staged, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_bytes(path: Path, data: bytes) -> None:
    _atomic_write_bytes(path, data)


def write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n").encode())


def json_default(o: Any) -> Any:
    """`json.dumps(default=...)` for numpy/torch scalars and paths."""
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_predictions(path: Path, rows: Mapping[str, Any]) -> None:
    """A table of per-example predictions (columns of equal length) as parquet, written atomically."""
    import pandas as pd

    with atomic_path(path) as tmp:
        pd.DataFrame(dict(rows)).to_parquet(tmp, index=False)


def read_predictions(run_dir: Path) -> Any:
    """The evaluate stage's per-example predictions of a run (a pandas DataFrame)."""
    import pandas as pd

    path = stage_dir(run_dir, EVALUATE) / PREDICTIONS
    if not path.exists():
        raise PlrError(f"missing artifact {path}; rerun the evaluate stage (plr train ... run_dir={run_dir})")
    try:
        return pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise PlrError(f"corrupt artifact {path} ({type(e).__name__}); delete evaluate/done and rerun") from None


def _rerun_hint(path: Path) -> str:
    """How to remake a corrupt artifact: rerun its stage (named by its folder) and the later ones."""
    stage = path.parent.name
    if stage in STAGES:
        return f"remake it with `plr resume {path.parent.parent} --rerun-from {stage}`"
    return "delete it and rerun the run"


def read_json(path: Path) -> Any:
    if not path.exists():
        raise PlrError(f"missing artifact {path}; rerun the stage that writes it")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlrError(f"corrupt artifact {path} ({e.msg if hasattr(e, 'msg') else e}); {_rerun_hint(path)}") from None


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata=dict(metadata or {}))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise PlrError(f"missing artifact {path}; rerun the stage that writes it")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise PlrError(f"corrupt artifact {path} ({first_line(e)}); {_rerun_hint(path)}") from None


def git_info() -> dict[str, Any]:
    """Commit and dirty flag of the code that runs (None outside a git checkout)."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain") if sha else None
    return {"sha": sha, "dirty": bool(status) if status is not None else None}


def env_info() -> dict[str, Any]:
    versions = {}
    for pkg in VERSIONED:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "python": sys.version.split()[0], "platform": platform.platform(), "argv": sys.argv,
        "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "threads": torch.get_num_threads(),  # the CPU threads the run used (`plr study --jobs N` splits the cores)
        "packages": versions,
    }


def write_run_info(run_dir: Path) -> None:
    """git.json and env.json, written before any work starts."""
    write_json(run_dir / GIT, git_info())
    write_json(run_dir / ENV, env_info())


# ------------------------------------------------------------------------------ typed readers



def read_allocation(run_dir: Path) -> Allocation:
    """The allocate stage's per-layer keep ratios, checked: a damaged or foreign file (no layers, a
    ratio that is no finite number) is one line naming it and how to remake it."""
    import math

    from partial_lora.allocation.allocators import Allocation

    path = stage_dir(run_dir, ALLOCATE) / ALLOCATION
    raw = read_json(path)
    try:
        alloc = Allocation.from_json(raw)
        bad = next((la.name for la in alloc.layers if isinstance(la.ratio, bool)
                    or not isinstance(la.ratio, int | float) or not math.isfinite(la.ratio)), None)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        what = f"no '{e.args[0]}'" if isinstance(e, KeyError) else first_line(e) or type(e).__name__
        raise PlrError(f"corrupt artifact {path} ({what}); {_rerun_hint(path)}") from None
    if bad is not None or not alloc.layers:
        what = f"layer '{bad}' has no keep ratio" if bad is not None else "no layers"
        raise PlrError(f"corrupt artifact {path} ({what}); {_rerun_hint(path)}")
    return alloc


def write_masks(run_dir: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str],
                layers: Mapping[str, Mapping[str, Any]], **info: Any) -> None:
    """The extract stage's masks: `{layer_id}.rows` / `.cols` (int64) and, for element masks,
    `.mask_B` / `.mask_A` (uint8) in `masks.safetensors`; `meta` (model, method, granularity), `info`
    and the per-layer shapes and counts in `masks.json`, which `read_masks` checks against the model.
    With `adapter.mask.shared_input`, `info` has `input_groups`: lists of layer ids that read one
    input tensor and keep nested column sets (`read_input_groups`)."""
    d = stage_dir(run_dir, EXTRACT)
    save_tensors(d / MASKS, tensors, meta)
    write_json(d / MASKS_JSON, {**meta, **info, "layers": layers})


def read_masks(run_dir: Path, model_name: str) -> tuple[Keep, Keep]:
    """(kept rows/cols by layer, element masks (B, A) by layer) of a run, checked against the model."""
    d = stage_dir(run_dir, EXTRACT)
    info = read_json(d / MASKS_JSON)
    if info.get("model") != model_name:
        raise PlrError(f"{d / MASKS} was made for model '{info.get('model')}', not '{model_name}'; "
                       "rerun extract (or point from_run at a run of this model)")
    t = load_tensors(d / MASKS)
    keep, element = {}, {}
    for lid in info["layers"]:
        try:
            keep[lid] = (t[f"{lid}.rows"], t[f"{lid}.cols"])
        except KeyError:
            raise PlrError(f"{d / MASKS} lacks layer '{lid}' (truncated or foreign file); rerun extract") from None
        if f"{lid}.mask_A" in t:
            element[lid] = (t[f"{lid}.mask_B"].bool(), t[f"{lid}.mask_A"].bool())
    return keep, element


def read_shira_masks(run_dir: Path, model_name: str) -> dict[str, torch.Tensor]:
    """The SHiRA entries plr drew in the extract stage (`adapter.shira.mask`): `{module}.entries`, (2, k)
    int64 row and column indices, by module name; checked against the model."""
    d = stage_dir(run_dir, EXTRACT)
    info = read_json(d / MASKS_JSON)
    if info.get("model") != model_name or info.get("granularity") != "shira":
        raise PlrError(f"{d / MASKS} holds no SHiRA masks of model '{model_name}' (it has {info.get('granularity')} "
                       f"masks of '{info.get('model')}'); rerun extract")
    t = load_tensors(d / MASKS)
    try:
        return {lid: t[f"{lid}.entries"] for lid in info["layers"]}
    except KeyError:
        raise PlrError(f"{d / MASKS} lacks a layer that masks.json lists (truncated or foreign file); "
                       "rerun extract") from None


def read_input_groups(run_dir: Path) -> list[list[str]]:
    """The extract stage's input groups (`adapter.mask.shared_input`): layer ids that read one input
    tensor; [] for masks made without the option (and for masks files from before it)."""
    path = stage_dir(run_dir, EXTRACT) / MASKS_JSON
    groups = read_json(path).get("input_groups") or []
    if not isinstance(groups, list) or not all(isinstance(g, list) and all(isinstance(x, str) for x in g)
                                               for g in groups):
        raise PlrError(f"corrupt artifact {path}: input_groups must be lists of layer ids; rerun extract")
    return groups
