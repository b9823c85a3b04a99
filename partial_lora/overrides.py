"""`plr train`'s overrides, checked before Hydra runs: each mistake is one line, not Hydra's report.

An unknown group choice (`model=foo`), an unknown key (`trainer.lerning_rate=1`: the overrides
are composed once) and a `run_dir`/`out_root` that cannot be written are refused before any work
starts. `cli.main` runs the checks.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from partial_lora.errors import fail, first_line


CONF_DIR = Path(__file__).resolve().parent / "conf"
GROUPS = ("model", "task", "adapter", "trainer", "logger", "experiment")


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


def check_keys(overrides: list[str]) -> None:
    """Unknown config keys (`trainer.lerning_rate=1`) get one line instead of Hydra's report.

    The overrides are composed once (a sweep by its first value) before Hydra runs anything.
    """
    from hydra import compose, initialize_config_module
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import ConfigCompositionException, OverrideParseException

    args = [a for a in overrides if not a.startswith("-") and "=" in a and not a.lstrip("+~").startswith("hydra")]
    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except OverrideParseException as e:
        fail(f"cannot parse the overrides ({first_line(e)}); write them as key=value")
        return
    single = [f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override()
              else o.input_line for o in parsed]
    try:
        with initialize_config_module("partial_lora.conf", version_base="1.3"):
            compose("config", overrides=single)
    except ConfigCompositionException as e:
        first = first_line(e)
        key = re.search(r"override '([^']+)'", first)
        if key:
            fail(f"unknown config key '{key[1]}'; check its spelling against `plr train --help`, or add a new key "
                 f"with +{key[1]}=<value>")
        fail(f"{first}; see `plr train --help`")
    except Exception as e:  # noqa: BLE001 - Hydra reports bad values in many exception types
        fail(f"{first_line(e) or type(e).__name__}; see `plr train --help`")


def check_writable(overrides: list[str]) -> None:
    """`run_dir=` / `out_root=` must be creatable and writable, before any work starts."""
    for arg in overrides:
        key, _, value = arg.partition("=")
        if key not in ("run_dir", "out_root") or not value or "$" in value:
            continue
        path = Path(value).expanduser()
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as e:
            fail(f"{key}={value} cannot be written ({e.strerror or e}); choose a directory you can write to")
