"""The run being exported: a finished run dir, its config, and its trained model rebuilt."""

from __future__ import annotations

from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from partial_lora import artifacts, config
from partial_lora.errors import PlrError, first_line
from partial_lora.export.layout import HYDRA_CONFIG
from partial_lora.spec import RunSpec
from partial_lora.training.runtime import set_seed
from partial_lora.working_set.build import Setup, setup_run
from partial_lora.working_set.trained import load_trained


def check_run(run_dir: Path) -> None:
    """A run dir with a config and a finished retrain stage, or a one-line error naming the fix."""
    if not run_dir.is_dir():
        raise PlrError(f"run dir '{run_dir}' does not exist; pass the run dir of a `plr train` run")
    if not (run_dir / HYDRA_CONFIG).is_file():
        raise PlrError(f"'{run_dir}' is not a plr run dir (no {HYDRA_CONFIG}); pass the run dir `plr train` printed")
    if not artifacts.is_done(run_dir, artifacts.RETRAIN):
        raise PlrError(f"run '{run_dir}' has no finished retrain stage; finish it first with "
                       f"`plr train run_dir={run_dir} <the run's overrides>`")


def load_config(run_dir: Path) -> DictConfig:
    """The run's `.hydra/config.yaml`, unresolved (its `${now:...}` keys are never read)."""
    path = run_dir / HYDRA_CONFIG
    try:
        cfg = OmegaConf.load(path)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise PlrError(f"cannot read {path} ({first_line(e)}); restore it from the run") from None
    if not isinstance(cfg, DictConfig) or "model" not in cfg or "adapter" not in cfg:
        raise PlrError(f"{path} is not a plr config (no model/adapter); pass the run dir `plr train` printed")
    return cfg


def load_spec(run_dir: Path) -> RunSpec:
    """The run's `RunSpec`, from its saved config (checked as `plr train` checked it)."""
    return config.validate(config.saved_run(load_config(run_dir), run_dir))


def rebuild(spec: RunSpec, run_dir: Path) -> Setup:
    """The run's trained model, exactly as the evaluate stage builds it."""
    set_seed(spec.seed)
    s = setup_run(spec, run_dir)
    load_trained(s, artifacts.stage_dir(run_dir, artifacts.RETRAIN))
    s.built.model.eval()
    return s
