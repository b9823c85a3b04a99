"""`plr`: the command line. The only module with a `@hydra.main`.

    plr train [overrides]        compose conf/ and run the pipeline (Hydra; -m for sweeps)
    plr train --help             config groups and the composed config
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from partial_lora import artifacts as A
from partial_lora.errors import PlrError

CONF_DIR = Path(__file__).resolve().parent / "conf"
GROUPS = ("model", "task", "adapter", "trainer", "logger", "experiment")

USAGE = """usage: plr <command> [args]

commands:
  train [overrides]   run probe → allocate → extract → retrain → evaluate (Hydra overrides; -m for sweeps)
                      e.g.  plr train model=minilm task=bbc-news adapter=lora seed=1
  train --help        list config groups, their options and the composed config

run `plr train --help` for the config groups."""


def fail(message: str, code: int = 2) -> None:
    """Print one error line and exit non-zero (a traceback only with HYDRA_FULL_ERROR=1)."""
    print(f"plr: error: {message}", file=sys.stderr)
    sys.exit(code)


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_choices(overrides: list[str]) -> None:
    """Unknown group choices (model=foo) get one line instead of Hydra's multi-line report."""
    for arg in overrides:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.partition("=")
        key = key.lstrip("+~")
        if key not in GROUPS or value in ("", "null"):
            continue
        values = value.split(",") if not value.startswith(("[", "choice(", "range(", "glob(")) else []
        for v in values:
            if v not in group_options(key):
                fail(f"unknown {key} '{v}'; choose one of: {', '.join(group_options(key))}")


def _fresh(run_dir: Path) -> bool:
    return not any(A.stage_dir(run_dir, s).exists() for s in A.STAGES)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def _train(cfg: DictConfig) -> float | None:
    from partial_lora import config as C
    from partial_lora.stages import format_results, run_pipeline
    from partial_lora.tracking import make_tracker

    import datasets

    datasets.disable_progress_bars()  # "Map/Filter" bars on every load would drown the training bar
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    fresh = _fresh(run_dir)
    try:
        C.validate(cfg)
        A.write_run_info(run_dir)
        tracker = make_tracker(str(cfg.logger.kind), run_dir=run_dir, name=f"{cfg.name}-s{cfg.seed}",
                               config=OmegaConf.to_container(cfg, resolve=True),
                               **{k: v for k, v in OmegaConf.to_container(cfg.logger, resolve=True).items() if k != "kind"})
        try:
            results = run_pipeline(cfg, run_dir, tracker)
        finally:
            if tracker is not None:
                tracker.finish()
    except PlrError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if fresh and not any(A.is_done(run_dir, s) for s in A.STAGES):
            # Nothing of value was written: leave no half-made run dir behind.
            shutil.rmtree(run_dir, ignore_errors=True)
        fail(str(e))
        return None
    print(format_results(results))
    return results["metrics"].get(f"test_{results['main_metric']}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        check_choices(rest)
        sys.argv = ["plr train", *rest]
        _train()
        return 0
    fail(f"unknown command '{cmd}'; run `plr --help` for the commands")
    return 2


if __name__ == "__main__":
    sys.exit(main())
