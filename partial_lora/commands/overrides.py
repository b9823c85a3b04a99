"""`plr train`'s overrides, checked before Hydra runs: each mistake is one line, not Hydra's report.

Every argument is parsed on its own with Hydra's own override parser, so a bad one is named
(with the hint to quote a value that holds spaces or other characters the grammar does not take
bare). An argument without `=` and a deletion (`~key`) are refused: plr reads every key it
defines. An unknown group choice (`model=foo`), an unknown key (`trainer.lerning_rate=1`: the
overrides are composed once), and a `run_dir`/`out_root` that cannot be written are refused
before any work starts, as is a `run_dir` that is a file, empty (`run_dir=`), or a folder that
holds other files and no plr run (plr deletes only what it wrote, so it never writes a run into
somebody's folder).

`hydra.*` overrides that make Hydra import and run code are refused unless the command carries
`--allow-hydra-code`: callbacks, a launcher outside plr's own list (`conf/hydra/launcher`), a
sweeper, logging configs (`logging.config` builds handlers by import path), a search path or config
dir (a config found there could hold any of these), any `_target_`, and Hydra's
`--experimental-rerun` (it unpickles). Allowed: `hydra/launcher=<plr's>` and its options, the
sweep dirs, `hydra.sweeper.params`, `hydra.verbose`, `hydra.job.*` and Hydra's own logging
presets (`hydra/job_logging=disabled`); `hydra.run.dir` is refused in favour of `run_dir`, which
plr checks. `commands.train.train` runs the checks.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from partial_lora.errors import fail, first_line

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "task", "adapter", "trainer", "logger", "experiment")
ALLOW_HYDRA_CODE = "--allow-hydra-code"
# Hydra's own flags that plr passes on; the others (`--config-dir`, `--experimental-rerun` ...) need
# ALLOW_HYDRA_CODE.
SAFE_FLAGS = ("-m", "--multirun", "-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info", "--resolve",
              "-p", "--package", "--version", "-sc", "--shell-completion")
_VALUE_FLAGS = ("-c", "--cfg", "-i", "--info", "-p", "--package", "-sc", "--shell-completion")
# Hydra keys that import and run code, by prefix of the key (after + / ++ / ~).
_CODE_KEYS = ("hydra.callbacks", "hydra.sweeper", "hydra.job_logging", "hydra.hydra_logging", "hydra.searchpath",
              "hydra.launcher._target_")
_SAFE_SWEEPER_KEYS = ("hydra.sweeper.params",)  # the basic sweeper's grid: values, no import paths
_HYDRA_PRESETS = {"hydra/job_logging": ("default", "disabled", "none", "stdout"),
                  "hydra/hydra_logging": ("default", "disabled", "none", "hydra_debug")}


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _arguments(overrides: Sequence[str]) -> list[str]:
    """The overrides among train's arguments (not flags, nor the values of Hydra's flags that take one)."""
    out, skip = [], False
    for a in overrides:
        if skip:
            skip = False
            continue
        if a.startswith("-") and not a.startswith("~"):
            skip = a in _VALUE_FLAGS
            continue
        out.append(a)
    return out


def parse(overrides: Sequence[str]) -> list[Any]:
    """Each override parsed on its own by Hydra's parser (hydra.core.override_parser Override objects).

    Exits with one line naming the first that does not parse, an argument without `=`, or a `~key`
    deletion.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser, parsed = OverridesParser.create(), []
    for arg in _arguments(overrides):
        if arg.startswith("~"):
            key = arg[1:].partition("=")[0]
            fail(f"'{arg}' deletes {key}, which plr reads; set it instead ({key}=<value>, or {key}=null where the "
                 "key allows none)")
        if "=" not in arg:
            fail(f"'{arg}' is not an override; write key=value (e.g. trainer.lr=1e-3), or group=option "
                 "(e.g. model=minilm); see `plr train --help`")
        try:
            parsed.extend(parser.parse_overrides([arg]))
        except OverrideParseException as e:
            key, _, value = arg.partition("=")
            fail(f"cannot parse the override '{arg}' ({first_line(e)}); quote a value that holds spaces or other "
                 f"characters: \"{key}='{value}'\" (the double quotes are for the shell)")
    return parsed


def _key(o: Any) -> str:
    return str(o.key_or_group)


def _has_target(value: Any) -> bool:
    if isinstance(value, Mapping):
        return any(str(k) in ("_target_", "()") or _has_target(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_target(v) for v in value)
    return False


def check_hydra(overrides: Sequence[str], allow_code: bool = False) -> None:
    """Refuse `hydra.*` overrides and Hydra flags that make Hydra import and run code (see the module
    docstring), unless `allow_code` (`--allow-hydra-code`)."""
    if allow_code:
        return
    hint = f"; plr refuses Hydra settings that import and run code unless the command has {ALLOW_HYDRA_CODE}"
    for a in overrides:
        flag = a.partition("=")[0]
        if a.startswith("-") and not a.startswith("~") and flag not in SAFE_FLAGS:
            fail(f"'{a}' is a Hydra option that loads configs or pickles from elsewhere{hint}")
    launchers = group_options("hydra/launcher")
    for o in parse(overrides):
        key = _key(o)
        if key != "hydra/launcher" and str(o.package or "").startswith("hydra"):
            fail(f"'{o.input_line}' puts a config into Hydra's own settings, where Hydra may import and run it{hint}")
        if not key.startswith("hydra"):
            continue
        if key in ("hydra.run", "hydra.run.dir"):
            fail(f"'{o.input_line}' would bypass plr's checks of the run dir; set run_dir=<dir> instead")
        if key.startswith("hydra/"):
            values = [str(v) for v in o.sweep_string_iterator()] if o.is_sweep_override() else [str(o.value())]
            if key == "hydra/launcher":
                bad = [v for v in values if v not in launchers]
                if bad:
                    fail(f"unknown hydra/launcher '{bad[0]}'; choose one of plr's launchers: {', '.join(launchers)} "
                         f"(conf/hydra/launcher){hint}")
                continue
            if key in _HYDRA_PRESETS and all(v in _HYDRA_PRESETS[key] for v in values):
                continue
            fail(f"'{o.input_line}' selects a Hydra config that may import and run code{hint}")
        parts = key.split(".")
        code = (any(key == p or key.startswith(p + ".") for p in _CODE_KEYS)
                and not any(key == p or key.startswith(p + ".") for p in _SAFE_SWEEPER_KEYS))
        if code or "_target_" in parts or "()" in parts or key in ("hydra", "hydra.launcher") \
                or (not o.is_sweep_override() and _has_target(o.value())):
            fail(f"'{o.input_line}' makes Hydra import and run code{hint}")


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


@contextlib.contextmanager
def one_line_composition_errors() -> Iterator[None]:
    """Hydra's report of a config that does not compose (`trainer.lerning_rate=1`) as one line."""
    from hydra.errors import ConfigCompositionException

    try:
        yield
    except ConfigCompositionException as e:
        first = first_line(e)
        key = re.search(r"override '([^']+)'", first)
        if key:
            fail(f"unknown config key '{key[1]}'; check its spelling against `plr train --help`, or add a new key "
                 f"with +{key[1]}=<value>")
        fail(f"{first}; see `plr train --help`")
    except Exception as e:  # noqa: BLE001 - Hydra reports bad values in many exception types
        fail(f"{first_line(e) or type(e).__name__}; see `plr train --help`")


def check_keys(overrides: list[str]) -> Any:
    """Unknown config keys (`trainer.lerning_rate=1`) get one line instead of Hydra's report: a sweep's
    overrides are composed once, by their first values, before Hydra runs any job; the composed config
    (a DictConfig, without Hydra's own node) is returned.
    """
    from hydra import compose, initialize_config_module

    parsed = [o for o in parse(overrides) if not _key(o).startswith("hydra")]
    single = [f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override()
              else o.input_line for o in parsed]
    with one_line_composition_errors(), initialize_config_module("partial_lora.conf", version_base="1.3"):
        return compose("config", overrides=single)


def compose_run(app: Any, overrides: list[str]) -> Any:
    """A single run's config, Hydra's own node included, composed once by the initialized Hydra `app`
    as `@hydra.main` composes it (from the shell, with Hydra's logging configured); a config that
    does not compose is one line."""
    from hydra.types import RunMode

    with one_line_composition_errors():
        return app.compose_config("config", list(overrides), run_mode=RunMode.RUN, from_shell=True,
                                  with_log_configuration=True)


def apply_override(cfg: Any, line: str) -> None:
    """Apply the override `line` (`key=value`) to a composed config as if the command had given it: the
    value, parsed by Hydra's grammar, and what Hydra records of the overrides (`hydra.overrides.task`
    and `hydra.job.override_dirname`, which Hydra builds from them)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    parser = OverridesParser.create()
    (override,) = parser.parse_overrides([line])
    OmegaConf.update(cfg, override.key_or_group, override.value(), merge=False)
    task = [*cfg.hydra.overrides.task, line]
    cfg.hydra.overrides.task = task
    dirname = cfg.hydra.job.config.override_dirname
    lines = sorted(o.input_line for o in parser.parse_overrides(task) if o.key_or_group not in dirname.exclude_keys)
    cfg.hydra.job.override_dirname = re.sub("[=]", dirname.kv_sep, dirname.item_sep.join(lines))


def value_of(overrides: Sequence[str], key: str) -> str | None:
    """The value the overrides give `key` (unquoted by Hydra's parser; the last one wins), or None
    when none sets it or it is a sweep."""
    found = None
    for o in parse(overrides):
        if _key(o) == key:
            found = None if o.is_sweep_override() or o.value() is None else str(o.value())
    return found


def check_run_dir(value: str) -> Path:
    """A `run_dir` plr may write a run into: new, empty, or a plr run dir (to continue or redo it).

    Exits with one line for an empty value, a file, or a folder that holds other files and no plr
    run (plr deletes only what it wrote; a run written into somebody's folder would mix with it).
    Under a multi-process launch every rank makes the same check before it writes, and the job log
    (`train.log`) is not counted: the ranks start at their own pace, and one may find the log that
    another rank's Hydra has just opened there.
    """
    from partial_lora import distributed, ownership, rundir

    if not value.strip():
        fail("run_dir= is empty; name a folder (run_dir=outputs/my-run), or leave run_dir out for "
             "outputs/<name>/<time>")
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        fail(f"run_dir={value} is a file; name a new folder, or the run dir of an earlier run to continue it")
    if path.is_dir() and not ownership.is_run_dir(path):
        peers = {rundir.JOB_LOG} if distributed.launched() else set()
        first = next(iter(sorted(p.name for p in path.iterdir() if p.name not in peers)), None)
        if first is not None:
            fail(f"run_dir={value} is a folder that holds other files ({first}, ...) and no plr run; plr writes a run "
                 "into a new or empty folder, or continues one in its own run dir: choose a new run_dir")
    return path


def check_writable(overrides: list[str]) -> None:
    """`run_dir=` / `out_root=` must be creatable and writable, before any work starts."""
    for key in ("run_dir", "out_root"):
        value = value_of(overrides, key)
        if value is not None and not value.strip():
            fail(f"{key}= is empty; name a folder ({key}=outputs), or leave {key} out")
        if not value or "$" in value:
            continue
        path = Path(value).expanduser()
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as e:
            fail(f"{key}={value} cannot be written ({e.strerror or e}); choose a directory you can write to")
