"""`plr train`: the overrides checked (`overrides`), a single run's config composed once with its
multi-task members and run as Hydra runs a job (`_run_once`), Hydra's own app for its flags
(`--help`, `--cfg`) and sweeps (`-m`). The pipeline validates the config once and checks the run dir
once (`pipeline.runner.run_pipeline`).

A failed or interrupted `plr train` removes what it wrote itself and nothing else: the command makes
an `ownership.Claim` on the run dir before anything is created (the default `outputs/<name>/<time>` is
resolved once and applied as `run_dir=`, so the claim and Hydra agree on it), and the run settles it:
kept when a stage finished or checkpointed (resumable), undone otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from partial_lora import artifacts, distributed, ownership, rundir
from partial_lora.commands import Parser
from partial_lora.commands.overrides import (
    ALLOW_HYDRA_CODE,
    apply_override,
    check_choices,
    check_hydra,
    check_keys,
    check_run_dir,
    check_writable,
    compose_run,
    parse,
    value_of,
)
from partial_lora.errors import Interrupted, PlrError, first_line, full_error, one_line_errors

HELP_FLAGS = ("--help", "-h", "--cfg", "-c", "--info", "-i", "--hydra-help")


@dataclass
class Train:
    """One `plr train` command, and what its job (or each job of a sweep) shares: no module state.

    Attributes:
        rerun_from: `--rerun-from STAGE`: that stage and the later ones run again.
        claim: what this command may delete on failure (only what it created; `ownership.Claim`).
        members: a multi-task run's member task configs, composed at the edge with the run's config.
        failures: the run dirs of a sweep's jobs that failed (the sweep goes on).
    """

    rerun_from: str | None = None
    claim: ownership.Claim | None = None
    members: list[DictConfig] | None = None
    failures: list[str] = field(default_factory=list)

    def claim_of(self, run_dir: Path, sweeping: bool) -> ownership.Claim | None:
        """The command's claim, if it is on this run dir (a single run, on the main process)."""
        if sweeping or self.claim is None or not distributed.is_main():
            return None
        return self.claim if self.claim.run_dir.resolve() == run_dir.resolve() else None

    def job(self, cfg: DictConfig) -> float | None:
        """One run of the command, inside Hydra's job (its run dir, logging and `HydraConfig`)."""
        import datasets

        datasets.disable_progress_bars()  # "Map/Filter" bars on every load would drown the training bar
        logging.getLogger("matplotlib").setLevel(logging.WARNING)
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        sweeping = HydraConfig.get().mode == RunMode.MULTIRUN
        claim = self.claim_of(run_dir, sweeping)
        with one_line_errors():  # also inside Hydra's app (sweeps), whose own report is many lines
            try:
                with ownership.locked(run_dir) if distributed.is_main() else contextlib.nullcontext():
                    return self._locked(cfg, run_dir, claim, sweeping)
            except PlrError as e:  # the run dir is in use (or the run failed, settled already): touch nothing
                if claim is not None and not claim.settled:
                    claim.keep()
                if not sweeping or full_error():
                    raise
                self.failures.append(str(run_dir))
                print(f"plr: error: {e} (the sweep goes on)", file=sys.stderr)
                return None

    def _locked(self, cfg: DictConfig, run_dir: Path, claim: ownership.Claim | None, sweeping: bool) -> float | None:
        from partial_lora.pipeline.results import format_results
        from partial_lora.pipeline.runner import run_pipeline
        from partial_lora.tracking import make_tracker

        (run_dir / artifacts.ERROR).unlink(missing_ok=True)

        def checked(spec: Any) -> Any:  # the run dir is checked: record the run, open its tracker
            if distributed.is_main():
                _write_hydra(run_dir, cfg)
            artifacts.write_run_info(run_dir)
            return None if not distributed.is_main() else make_tracker(  # under torchrun rank 0 alone logs
                str(cfg.logger.kind), run_dir=run_dir, name=f"{spec.name}-s{spec.seed}", config=dict(spec.settings),
                **{k: v for k, v in OmegaConf.to_container(cfg.logger, resolve=True).items() if k != "kind"})

        try:
            results = run_pipeline(cfg, run_dir, members=self.members, rerun_from=self.rerun_from, on_checked=checked)
        except KeyboardInterrupt as e:  # Ctrl-C: one line, the way back, exit 130 (the shell's code for SIGINT)
            resumable = _settle(run_dir, claim)
            if full_error():
                raise
            if not resumable:  # nothing to resume from: what this run wrote is gone, and only that
                print("plr: interrupted before any stage finished or checkpointed; removed what this run had written "
                      "(nothing else)", file=sys.stderr)
            else:
                where = e.where() if isinstance(e, Interrupted) else "start-up"
                print(f"plr: interrupted at {where}; resume with `plr resume {run_dir}`", file=sys.stderr)
            sys.exit(130)
        except Exception as e:
            if not sweeping:
                _settle(run_dir, claim)  # a bug's traceback too: no half-made run dir for the next command to trip on
            if full_error() or not sweeping:
                raise  # a PlrError: one line, from the error handler
            # One failed job must not end a sweep of many: record why in the run dir (the report
            # lists it), say so, and go on to the next job. The sweep exits non-zero at the end.
            message = str(e) if isinstance(e, PlrError) else f"{type(e).__name__}: {e}"
            artifacts.write_text(run_dir / artifacts.ERROR,
                                 message + "\n" + ("" if isinstance(e, PlrError) else traceback.format_exc()))
            if distributed.is_main() and not (run_dir / artifacts.HYDRA_CONFIG).exists():
                _write_hydra(run_dir, cfg)  # so `plr report` lists the failed job with its settings
            self.failures.append(str(run_dir))
            print(f"plr: error: {first_line(message) or type(e).__name__} (run dir {run_dir}; "
                  "the sweep goes on)", file=sys.stderr)
            return None
        print(format_results(results))
        return results["metrics"].get(f"test_{results['main_metric']}")


def _settle(run_dir: Path, claim: ownership.Claim | None) -> bool:
    """After a failure: keep the run dir when a stage finished or checkpointed (it can be resumed),
    else remove what this command created (`ownership.Claim`). Returns whether it is resumable."""
    resumable = any(rundir.resumable(run_dir, s) for s in artifacts.STAGES)
    if claim is not None and resumable:
        claim.keep()
    elif claim is not None:
        claim.undo(holding_lock=True)
    return resumable


def _hydra_app(command: Train) -> Any:
    """Hydra's own app around the command's job: for Hydra's flags (help, `--cfg`) and sweeps (`-m`)."""
    return hydra.main(config_path="pkg://partial_lora.conf", config_name="config", version_base="1.3")(command.job)


def _write_hydra(run_dir: Path, cfg: DictConfig) -> None:
    """`.hydra/` as Hydra writes it (config.yaml, hydra.yaml, overrides.yaml), once the run dir is checked."""
    hc = HydraConfig.get()
    artifacts.write_text(run_dir / artifacts.HYDRA_CONFIG, OmegaConf.to_yaml(cfg))
    artifacts.write_text(run_dir / artifacts.HYDRA_YAML, OmegaConf.to_yaml(OmegaConf.create({"hydra": hc})))
    artifacts.write_text(run_dir / artifacts.HYDRA_OVERRIDES,
                         OmegaConf.to_yaml(OmegaConf.create(list(hc.overrides.task))))


def _take_flag(args: list[str], flag: str) -> tuple[list[str], bool]:
    """`args` without `flag`, and whether it was there."""
    return [a for a in args if a != flag], flag in args


_BARE = re.compile(r"[\w./\-]+")


def _pin_run_dir(overrides: list[str], cfg: DictConfig) -> tuple[Path | None, str | None]:
    """The run dir this command writes (checked by `overrides.check_run_dir`), and the override
    `run_dir=<it>` that fixes the default (`${out_root}/${name}/${now:...}`) resolved here once, so
    Hydra uses the folder that the claim was made on (None when the overrides give it already).
    (None, None) when it cannot be known before Hydra runs (a value Hydra's grammar cannot carry bare
    or quoted, an interpolation Hydra alone resolves)."""
    given = value_of(overrides, "run_dir")
    if given is not None and "${" not in given:
        return check_run_dir(given), None
    try:
        resolved = str(OmegaConf.select(cfg, "run_dir", throw_on_resolution_failure=True))
    except Exception:  # noqa: BLE001 - e.g. ${hydra:...}: Hydra alone resolves it; no claim, nothing deleted
        return None, None
    if not _BARE.fullmatch(resolved):
        if "'" in resolved or "\\" in resolved or "${" in resolved:
            return None, None
        return check_run_dir(resolved), f"run_dir='{resolved}'"
    return check_run_dir(resolved), f"run_dir={resolved}"


def _take_rerun_from(args: list[str]) -> tuple[list[str], str | None]:
    """train's arguments without `--rerun-from STAGE` (or `--rerun-from=STAGE`), and the stage."""
    out, stage, i = [], None, 0
    while i < len(args):
        a = args[i]
        if a == "--rerun-from" or a.startswith("--rerun-from="):
            value = a.partition("=")[2] if "=" in a else (args[i + 1] if i + 1 < len(args) else "")
            i += 1 if "=" in a else 2
            if value not in artifacts.STAGES:
                raise PlrError(f"--rerun-from takes a stage, one of {', '.join(artifacts.STAGES)}; got '{value}'")
            stage = value
            continue
        out.append(a)
        i += 1
    return out, stage


def _check_launch(overrides: list[str]) -> None:
    if distributed.launched() and value_of(overrides, "run_dir") is None:
        raise PlrError(f"under a multi-process launch (WORLD_SIZE={distributed.world_size()}) every process must write "
                       "to the same run dir; add run_dir=<dir> to the command")


@one_line_errors()
def train(rest: list[str]) -> int:
    """`plr train`: the overrides checked, the config composed once and validated once (in the pipeline),
    the run dir claimed and checked once; Hydra's own app for its flags and for sweeps."""
    rest, rerun_from = _take_rerun_from(rest)
    rest, allow_code = _take_flag(rest, ALLOW_HYDRA_CODE)
    check_hydra(rest, allow_code)
    parse(rest)
    check_choices(rest)
    command = Train(rerun_from=rerun_from)
    try:
        if any(a.startswith("-") for a in rest):
            _run_hydra_app(command, rest)
        else:
            _run_once(command, rest)
    except BaseException:
        if command.claim is not None and not command.claim.settled:
            command.claim.undo()  # a failure before the run took its lock (Hydra's start-up, a refused check)
        raise
    if command.failures:
        failed = command.failures
        print(f"plr: error: {len(failed)} run(s) of the sweep failed (each has {artifacts.ERROR}): "
              f"{', '.join(failed[:3])}{', ...' if len(failed) > 3 else ''}", file=sys.stderr)
        return 1
    return 0


def _run_once(command: Train, overrides: list[str]) -> None:
    """A single run: its config composed once (with Hydra's node), its multi-task members with it, the
    run dir pinned and claimed, then the job run as Hydra's own `run` runs it (`run_job`: the run dir,
    logging to train.log, `HydraConfig`, callbacks), on that one composed config."""
    from hydra import initialize_config_module
    from hydra._internal.callbacks import Callbacks
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import run_job
    from hydra.types import HydraContext

    from partial_lora import config

    with initialize_config_module("partial_lora.conf", version_base="1.3", job_name="train"):
        app = GlobalHydra.instance().hydra
        assert app is not None
        cfg = compose_run(app, overrides)
        command.members = config.member_tasks(cfg) if config.is_multi(cfg) else None
        _check_launch(overrides)
        pinned: list[str] = []
        if distributed.is_main():  # rank 0 alone: under torchrun the others would find the run dir rank 0 is making
            run_dir, line = _pin_run_dir(overrides, cfg)
            if line is not None:
                apply_override(cfg, line)
                pinned.append(line)
            command.claim = ownership.Claim(run_dir) if run_dir is not None else None
        check_writable([*overrides, *pinned])
        if cfg.hydra.mode is None:
            cfg.hydra.mode = RunMode.RUN
        callbacks = Callbacks(cfg)
        callbacks.on_run_start(config=cfg, config_name="config")
        ret = run_job(hydra_context=HydraContext(config_loader=app.config_loader, callbacks=callbacks),
                      task_function=command.job, config=cfg, job_dir_key="hydra.run.dir", job_subdir_key=None,
                      configure_logging=True)
        callbacks.on_run_end(config=cfg, config_name="config", job_return=ret)
        _ = ret.return_value  # a failed job's exception, raised again


def _run_hydra_app(command: Train, rest: list[str]) -> None:
    """Hydra's flags (`--help`, `--cfg` ...) and sweeps (`-m`): Hydra's own app. A sweep's overrides are
    composed once first (by their first values) so that a mistake is one line before any job starts."""
    if not any(a in HELP_FLAGS for a in rest):
        cfg = check_keys(rest)
        _check_launch(rest)
        if not any(a in ("-m", "--multirun") for a in rest) and distributed.is_main():
            run_dir, line = _pin_run_dir(rest, cfg)
            rest = rest + ([line] if line is not None else [])
            command.claim = ownership.Claim(run_dir) if run_dir is not None else None
        check_writable(rest)
    sys.argv = ["plr train", *rest]
    _hydra_app(command)()


def train_parser() -> argparse.ArgumentParser:
    """`plr train`'s arguments, for `plr --help` (`plr train --help` is Hydra's: the config groups, their
    options and the composed config)."""
    parser = Parser(prog="plr train", description="Run probe → allocate → extract → retrain → evaluate on the "
                    "config composed from conf/ and the overrides, e.g. `plr train model=minilm task=bbc-news "
                    "adapter=lora seed=1`.")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Hydra overrides (group=option, key=value)")
    parser.add_argument("-m", "--multirun", action="store_true", help="a sweep: one run per value of key=a,b")
    parser.add_argument("--rerun-from", choices=artifacts.STAGES, metavar="STAGE", help="redo STAGE and every later "
                        "stage of run_dir=DIR with these settings (a run dir made with other settings is otherwise "
                        "refused)")
    parser.add_argument(ALLOW_HYDRA_CODE, action="store_true", help="let hydra.* overrides that import and run "
                        "code through (callbacks, other launchers, sweepers, logging configs, --config-dir)")
    return parser
