"""Run discovery and reading: which dirs are run dirs, and what each one says (`Run`)."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from partial_lora import artifacts
from partial_lora.errors import PlrError

HYDRA_CONFIG = artifacts.HYDRA_CONFIG
NOT_METRICS = ("_loss", "_examples")  # endings of test_* keys that are not a reportable metric


# ----------------------------------------------------------------------------------- records


@dataclass
class Run:
    """One run dir as the report sees it.

    Attributes:
        run_dir: the run dir (resolved).
        status: `complete`, `incomplete` or `failed`.
        task / label / model / r / seed: the run's identity (None when unknown).
        main_metric: the task's main metric name, without the `test_` prefix.
        metrics: reportable test metrics, keyed `test_<name>`.
        adapter_params / head_params: trainable parameters of the adapter and the head.
        reduction_pct: adapter parameters saved against dense LoRA at the same rank (0 for dense).
        missing: expected stages that have no `done` marker, in pipeline order.
        reason: why a run is not complete (empty when it is).
    """

    run_dir: Path
    status: str
    task: str | None = None
    label: str | None = None
    model: str | None = None
    r: int | None = None
    seed: int | None = None
    main_metric: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    adapter_params: int | None = None
    head_params: int | None = None
    reduction_pct: float | None = None
    missing: list[str] = field(default_factory=list)
    reason: str = ""
    members: dict[str, str] = field(default_factory=dict)  # multi-task: member task -> its main metric


# ----------------------------------------------------------------------------------- discovery


def is_run_dir(path: Path) -> bool:
    """A run dir holds `.hydra/config.yaml` (written first) or `results.json` (written last)."""
    return (path / HYDRA_CONFIG).is_file() or (path / artifacts.RESULTS).is_file()


def find_run_dirs(patterns: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Run dirs named by paths or globs, or found below them at any depth.

    Args:
        patterns: run dirs, directories that contain run dirs (e.g. a Hydra multirun root),
            `results.json` / `.hydra/config.yaml` files, or globs of any of these (`**` recurses).

    Returns:
        (the run dirs, resolved, deduplicated and sorted; the patterns that matched no run dir).
    """
    found: set[Path] = set()
    unmatched: list[str] = []
    for pattern in patterns:
        dirs = [d for hit in _expand(pattern) for d in _run_dirs_at(hit)]
        if not dirs:
            unmatched.append(pattern)
        found.update(d.resolve() for d in dirs)
    return sorted(found), unmatched


def _expand(pattern: str) -> list[Path]:
    """An existing path as itself (even with `[` in its name), anything else as a glob."""
    path = Path(pattern).expanduser()
    if path.exists():
        return [path]
    return [Path(p) for p in sorted(glob.glob(os.path.expanduser(pattern), recursive=True))]


def _run_dirs_at(path: Path) -> list[Path]:
    """The run dir a file belongs to, or the run dirs at or below a directory."""
    if path.is_file():
        if path.name == artifacts.RESULTS:
            return [path.parent]
        if path.name == HYDRA_CONFIG.name and path.parent.name == HYDRA_CONFIG.parent.name:
            return [path.parent.parent]
        return []
    out = []
    for root, dirnames, _ in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # skip .hydra, .git, ...
        if is_run_dir(Path(root)):
            out.append(Path(root))
    return out


# ----------------------------------------------------------------------------------- reading


class _Unreadable(Exception):
    """A file in a run dir exists but cannot be parsed."""


def _load_results(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / artifacts.RESULTS
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise _Unreadable(artifacts.RESULTS) from None
    if not isinstance(data, dict):
        raise _Unreadable(artifacts.RESULTS)
    return data


def _load_config(run_dir: Path) -> DictConfig | None:
    path = run_dir / HYDRA_CONFIG
    if not path.is_file():
        return None
    try:
        cfg = OmegaConf.load(path)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, OmegaConfBaseException):
        raise _Unreadable(str(HYDRA_CONFIG)) from None
    if not isinstance(cfg, DictConfig):
        raise _Unreadable(str(HYDRA_CONFIG))
    return cfg


def _select(cfg: DictConfig | None, key: str) -> Any:
    """A config value with interpolations resolved; None when absent or unresolvable.

    Hydra's `.hydra/config.yaml` keeps interpolations such as `label: ${adapter.name}`; some
    (`${now:...}`) need Hydra's resolvers, which are not registered here.
    """
    if cfg is None:
        return None
    try:
        value = OmegaConf.select(cfg, key, default=None)
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    except OmegaConfBaseException:
        return None


def _int(x: Any) -> int | None:
    try:
        return None if x is None or isinstance(x, bool) else int(x)
    except (TypeError, ValueError):
        return None


def _number(x: Any) -> float | None:
    """A JSON number as a float; None for anything else (null, strings, booleans)."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return float(x)


def expected_stages(results: dict[str, Any] | None, cfg: DictConfig | None, run_dir: Path) -> list[str]:
    """The stages this kind of run runs, in pipeline order.

    From `results.json` when present (its `stages` keys), else `pipeline.plan` of the run's
    config; with neither (or a config `plan` rejects), the stage dirs that exist.
    """
    if results is not None and isinstance(results.get("stages"), dict) and results["stages"]:
        return [s for s in artifacts.STAGES if s in results["stages"]]
    if cfg is not None:
        from partial_lora import config
        from partial_lora.pipeline.plan import stages_for

        try:  # only what decides the stages: a report reads runs whatever else their config holds
            peft = config.peft_spec(cfg)
            return stages_for(config.sparsity(cfg), config.mask_config(cfg).method,
                              config.allocation_config(cfg).allocator,
                              peft.shira_mask if peft is not None else None)
        except (PlrError, OmegaConfBaseException):
            pass
    return [s for s in artifacts.STAGES if artifacts.stage_dir(run_dir, s).is_dir()]


def _identity(results: dict[str, Any] | None, cfg: DictConfig | None) -> dict[str, Any]:
    """task, label, model, r, seed, main_metric: from results.json, else from the config.

    `label` falls back to the adapter's name (results.json written before `label` existed).
    """
    if results is not None:
        adapter = results.get("adapter") if isinstance(results.get("adapter"), dict) else {}
        ident = {"task": results.get("task"), "model": results.get("model"), "r": adapter.get("r"),
                 "seed": results.get("seed"), "main_metric": results.get("main_metric"),
                 "label": results.get("label") or adapter.get("name") or adapter.get("method")}
    else:
        ident = {"task": _select(cfg, "task.name"), "model": _select(cfg, "model.name"), "r": _select(cfg, "adapter.r"),
                 "seed": _select(cfg, "seed"), "main_metric": _select(cfg, "task.metric"),
                 "label": _select(cfg, "label") or _select(cfg, "adapter.name")}
    return {k: _int(v) if k in ("r", "seed") else (None if v is None else str(v)) for k, v in ident.items()}


def reportable_metrics(metrics: Any) -> dict[str, float]:
    """The reportable `test_*` numbers of a results.json `metrics` dict.

    Further evaluation sets are keyed `test_<set>_<metric>` (MNLI: `test_mismatched_accuracy`);
    their losses and example counts (`test_loss`, `test_mismatched_examples`, ...) are not metrics.
    """
    if not isinstance(metrics, dict):
        return {}
    return {k: float(v) for k, v in metrics.items()
            if k.startswith("test_") and not k.endswith(NOT_METRICS) and _number(v) is not None}


def read_run(run_dir: Path) -> Run:
    """A run dir's status, identity and numbers; never raises for a broken run dir."""
    unreadable = []
    try:
        results = _load_results(run_dir)
    except _Unreadable as e:
        results, unreadable = None, [*unreadable, str(e)]
    try:
        cfg = _load_config(run_dir)
    except _Unreadable as e:
        cfg, unreadable = None, [*unreadable, str(e)]
    run = Run(run_dir, "incomplete", **_identity(results, cfg),
              missing=[s for s in expected_stages(results, cfg, run_dir) if not artifacts.is_done(run_dir, s)])
    if results is not None:
        params = results.get("params") if isinstance(results.get("params"), dict) else {}
        run.metrics = reportable_metrics(results.get("metrics"))
        run.adapter_params, run.head_params = _int(params.get("adapter")), _int(params.get("head"))
        run.reduction_pct = _number(params.get("reduction_pct")) or 0.0  # None: dense LoRA
        members = results.get("member_metrics")
        if isinstance(members, dict):
            run.members = {str(k): str(v.get("main")) for k, v in members.items() if isinstance(v, dict)}
    if unreadable:
        run.status, run.reason = "failed", "unreadable " + ", ".join(unreadable)
    elif (run_dir / artifacts.ERROR).is_file():
        lines = (run_dir / artifacts.ERROR).read_text(errors="replace").strip().splitlines()
        run.status, run.reason = "failed", (lines[0][:300] if lines else artifacts.ERROR)
    elif results is None:
        run.reason = f"no {artifacts.RESULTS}"
    elif results.get("status") != "complete":
        run.reason = f"{artifacts.RESULTS} status {results.get('status')!r}"
    elif run.missing:
        run.reason = f"{artifacts.RESULTS} complete but stages not done"
    elif not run.task or not run.label:
        run.status, run.reason = "failed", f"{artifacts.RESULTS} has no task or label"
    else:
        run.status = "complete"
    return run


def with_members(run: Run) -> list[Run]:
    """A run, followed (for a complete multi-task run) by one run per member task.

    A member's run has the member's task name, the label `<label> [<multi-task name>]` and the
    member's `test_<metric>` numbers (read from the run's `test_<member>_<metric>`).
    """
    if run.status != "complete" or not run.members:
        return [run]
    out = [run]
    for name, main in run.members.items():
        prefix = f"test_{name}_"
        metrics = {f"test_{k[len(prefix):]}": v for k, v in run.metrics.items() if k.startswith(prefix)}
        out.append(Run(run.run_dir, run.status, task=name, label=f"{run.label} [{run.task}]", model=run.model, r=run.r,
                       seed=run.seed, main_metric=main, metrics=metrics, adapter_params=run.adapter_params,
                       head_params=run.head_params, reduction_pct=run.reduction_pct))
    run.metrics = {k: v for k, v in run.metrics.items()
                   if not any(k.startswith(f"test_{name}_") for name in run.members)}
    return out


def display_path(path: Path) -> str:
    """A path relative to the cwd when it is below it, else absolute."""
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
