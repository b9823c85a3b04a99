"""Turn the composed Hydra config into the core's plain dataclasses, validating every value.

This is where user input is checked: each bad value becomes one `PlrError` line naming the
key and the fix, raised before any work starts. The core modules never see a DictConfig.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from partial_lora.data.base import TaskSpec
from partial_lora.errors import PlrError
from partial_lora.lora import LoRAConfig
from partial_lora.models import ModelSpec
from partial_lora.train import TrainConfig


def plain(node: Any) -> Any:
    """A DictConfig/ListConfig as plain Python containers (interpolations resolved)."""
    if isinstance(node, DictConfig | ListConfig):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _build(cls: type, values: Mapping[str, Any], group: str, extra: tuple[str, ...] = ()) -> Any:
    """Instantiate a dataclass from a config group, rejecting keys it does not know."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names - set(extra))
    if unknown:
        raise PlrError(f"unknown key {group}.{unknown[0]}; known keys: {', '.join(sorted(names | set(extra)))}")
    return cls(**{k: v for k, v in values.items() if k in names})


TASK_EXTRA = ("metrics", "metric", "num_labels")
MODEL_EXTRA = ()


def task_spec(cfg: DictConfig) -> TaskSpec:
    values = plain(cfg.task)
    spec = _build(TaskSpec, values, "task", TASK_EXTRA)
    for key in ("val_fraction", "test_fraction"):
        v = getattr(spec, key)
        if not 0 <= v < 1:
            raise PlrError(f"task.{key} must be in [0, 1), got {v}; fix that override")
    return spec


def task_metrics(cfg: DictConfig) -> tuple[list[str], str]:
    """(metrics to report, metric that selects checkpoints)."""
    metrics = list(plain(cfg.task.get("metrics", ["accuracy"])))
    main = cfg.task.get("metric", metrics[0])
    if main not in metrics:
        metrics.insert(0, main)
    return metrics, main


def model_spec(cfg: DictConfig) -> ModelSpec:
    return _build(ModelSpec, plain(cfg.model), "model", MODEL_EXTRA)


def lora_config(cfg: DictConfig, spec: ModelSpec | None = None) -> LoRAConfig:
    """LoRA placement from `adapter` (rank, targets) and `model` (target sets, fused slices, head)."""
    spec = spec or model_spec(cfg)
    a = cfg.adapter
    if int(a.r) <= 0:
        raise PlrError(f"adapter.r must be a positive rank, got {a.r}; set adapter.r=8 (or any integer >= 1)")
    if float(a.alpha) <= 0:
        raise PlrError(f"adapter.alpha must be positive, got {a.alpha}; set adapter.alpha=16 for example")
    if not 0 <= float(a.dropout) < 1:
        raise PlrError(f"adapter.dropout must be in [0, 1), got {a.dropout}; fix that override")
    targets = plain(a.targets)
    if isinstance(targets, str):
        if targets not in spec.lora_targets:
            raise PlrError(f"adapter.targets='{targets}' is not a target set of model '{spec.name}'; use one of "
                           f"{sorted(spec.lora_targets)} or a list of module patterns")
        targets = spec.lora_targets[targets]
    if not targets:
        raise PlrError("adapter.targets is empty; name a target set (qv, all) or module patterns")
    return LoRAConfig(r=int(a.r), alpha=float(a.alpha), dropout=float(a.dropout), targets=tuple(targets),
                      fused={k: tuple(v) for k, v in spec.fused.items()}, exclude=tuple(spec.head_modules))


def train_config(cfg: DictConfig, **override: Any) -> TrainConfig:
    values = {**plain(cfg.trainer), **override}
    return _build(TrainConfig, values, "trainer")


def sparsity(cfg: DictConfig) -> float | str:
    """`adapter.sparsity`: a number in [0, 1) (0 = dense) or `auto`."""
    s = cfg.adapter.get("sparsity", 0.0)
    if isinstance(s, str):
        if s != "auto":
            try:
                s = float(s)
            except ValueError:
                raise PlrError(f"adapter.sparsity='{s}' must be a number in [0, 1) or auto") from None
        else:
            return "auto"
    s = float(s)
    if not 0 <= s < 1:
        raise PlrError(f"adapter.sparsity must be in [0, 1) (or auto), got {s}; 0.8 keeps 20% of rows and columns")
    return s


def validate(cfg: DictConfig) -> None:
    """Check everything a run will read, before the run dir gets any results."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise PlrError(f"{missing[0]} is required by this config; set {missing[0]}=<value> on the command line")
    spec = model_spec(cfg)
    task_spec(cfg)
    lora_config(cfg, spec)
    metrics, main = task_metrics(cfg)
    train_config(cfg)
    sparsity(cfg)
    if int(cfg.seed) < 0:
        raise PlrError(f"seed must be >= 0, got {cfg.seed}")
    method = cfg.adapter.get("method", "lora")
    if method not in ("lora", "partial"):
        raise PlrError(f"adapter.method '{method}' is unknown; use adapter=lora or adapter=partial")
