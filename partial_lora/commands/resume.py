"""`plr resume`: a stopped or killed run continued with its own recorded plr settings. Only the
entries of `.hydra/overrides.yaml` that are plr settings are kept (Hydra's, flags are left out), so a
run dir from someone else runs no code."""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import OmegaConf

from partial_lora import artifacts
from partial_lora.commands import Parser
from partial_lora.commands.train import train
from partial_lora.errors import PlrError, one_line_errors


def resume_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="plr resume", description="Continue a stopped or killed run where it stopped: finished "
                    "stages are skipped, an interrupted probe or retrain resumes from its last checkpoint (the same "
                    "as `plr train <its overrides> run_dir=RUN_DIR`).")
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("--rerun-from", choices=artifacts.STAGES, metavar="STAGE",
                        help=f"redo this stage and every later one ({', '.join(artifacts.STAGES)})")
    return parser


@one_line_errors()
def resume(argv: list[str]) -> int:
    """`plr resume RUN_DIR`: rerun `plr train` with the run's own overrides into its run dir."""
    args = resume_parser().parse_args(argv)
    run_dir = args.run_dir
    overrides_file = run_dir / artifacts.HYDRA_OVERRIDES
    if not overrides_file.is_file():
        raise PlrError(f"{run_dir} is not a plr run dir (no {overrides_file.relative_to(run_dir)}); pass the run dir "
                       "of a `plr train` run")
    try:
        overrides = OmegaConf.to_container(OmegaConf.load(overrides_file))
    except Exception as e:  # noqa: BLE001 - a damaged file: say which
        raise PlrError(f"{overrides_file} is unreadable ({type(e).__name__}); resume with `plr train <the overrides> "
                       f"run_dir={run_dir}`") from None
    if not isinstance(overrides, list):
        raise PlrError(f"{overrides_file} holds no list of overrides; resume with `plr train <the overrides> "
                       f"run_dir={run_dir}`")
    kept, left_out = _plr_settings([str(o) for o in overrides])
    if left_out:
        print(f"[plr] resume: left out {len(left_out)} entr{'y' if len(left_out) == 1 else 'ies'} of {overrides_file} "
              f"that {'is' if len(left_out) == 1 else 'are'} not a plr setting ({_short(left_out[0])}"
              f"{', ...' if len(left_out) > 1 else ''}): a run dir's files never run code", flush=True)
    again = ["--rerun-from", args.rerun_from] if args.rerun_from else []
    print(f"[plr] resume: plr train {' '.join([*kept, f'run_dir={run_dir}', *again])}", flush=True)
    return train([*kept, f"run_dir={run_dir}", *again])


def _plr_settings(entries: list[str]) -> tuple[list[str], list[str]]:
    """(plr's own overrides, the rest) of a recorded `.hydra/overrides.yaml`: an override of a plr key
    or group is kept; Hydra's settings (which Hydra never records there), flags, and anything that
    does not parse as one override are left out, and so are run_dir / out_root (the run dir is given)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser, kept, left = OverridesParser.create(), [], []
    for entry in entries:
        try:
            parsed = parser.parse_overrides([entry]) if "=" in entry and not entry.startswith("-") else []
        except OverrideParseException:
            parsed = []
        key = str(parsed[0].key_or_group) if len(parsed) == 1 else ""
        if key in ("run_dir", "out_root"):
            continue
        if not key or key.startswith("hydra") or str(parsed[0].package or "").startswith("hydra"):
            left.append(entry)
        else:
            kept.append(entry)
    return kept, left


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
