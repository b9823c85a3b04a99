"""A study suite is a YAML file: a model, its tasks, seeds and arms, and the overrides every run starts from.

    plr study --suite vtab                 a built-in suite: partial_lora/study/suites/vtab.yaml
    plr study --suite path/to/mine.yaml    a suite of your own

The keys (each file's comments say what its values are and where they come from):

    model: minilm                  the model config of every run (model=...), and the runs' <model> folder
    tasks:                         a task config name, or a mapping for a task of your own:
      - rt-polarity                  {name: mine, overrides: [task=hf-text, task.path=/data/mine.csv]}
      - {name: bbc-news, recipe: []}   a task's own recipe replaces the suite's `recipe`
      - {name: vader-tweets, tune: "retrain.lr=1e-3,2e-3,5e-3"}   a task's own grid replaces the suite's `tune`
    seeds: [0, 1, 2]
    arms: [head, lora, partial]    arms of partial_lora/study/arms.py ARMS (default: every arm)
    recipe: [experiment=offline-minilm]   overrides of every run, before the task's and the arm's
    arm_overrides: {partial: [adapter.allocation.tau=0.8]}   added to that arm's runs
    out: outputs/study             the study folder when --out is not given (default outputs/study-<name>)
    tune: retrain.lr=2e-3,5e-3,1e-2   a tuning grid, as `--tune` takes it (study/grid.py; --tune overrides it,
                                   on every task)
    variant: {name: p25elem, set: [adapter.mask.granularity=element, ...]}
                                   a reading of Partial-LoRA, as `--variant NAME --set KEY=VALUE ...` give it
                                   (study/plan.py; --variant overrides it): its arms run as <arm>@<name>

A file is checked once where it is read (a wrong type is refused, never coerced; an unknown key,
arm or task config is one line) and becomes a frozen `Suite`. The files live beside this module,
not in conf/: they are not a Hydra group that `plr train` composes; `plr study` turns each
(task, arm, seed) into `plr train` overrides.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from partial_lora.errors import PlrError, first_line
from partial_lora.study import grid
from partial_lora.study.arms import ARMS, VARIANT_ARMS
from partial_lora.typecheck import check_type, from_values

CONF = Path(__file__).resolve().parents[1] / "conf"
SUITE_DIR = Path(__file__).resolve().parent / "suites"
# What `plr study` runs when no suite is named: the offline suites, on the CPU.
OFFLINE = ("minilm", "efficientnet-lite0", "gemma3-270m")
TASK_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,59}")
VARIANT_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,39}")


@dataclass(frozen=True)
class SuiteTask:
    """One task of a suite: its name (the run dirs' <task> folder) and the overrides that select it."""

    name: str
    overrides: tuple[str, ...]
    recipe: tuple[str, ...] | None = None  # None: the suite's recipe
    tune: grid.Tune | None = None          # None: the suite's grid


@dataclass(frozen=True)
class Variant:
    """A named reading of Partial-LoRA: the overrides its arms add (`<arm>@<name>` run dirs)."""

    name: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Suite:
    """A checked suite file."""

    name: str
    model: str
    tasks: tuple[SuiteTask, ...]
    seeds: tuple[int, ...]
    arms: tuple[str, ...]
    recipe: tuple[str, ...] = ()
    arm_overrides: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    out: Path | None = None
    source: Path | None = None
    tune: grid.Tune | None = None
    variant: Variant | None = None

    def task(self, name: str) -> SuiteTask:
        return next(t for t in self.tasks if t.name == name)

    def recipe_of(self, task: SuiteTask) -> tuple[str, ...]:
        return self.recipe if task.recipe is None else task.recipe

    @property
    def folder(self) -> Path:
        """The study folder of this suite when --out is not given."""
        return self.out if self.out is not None else Path(f"outputs/study-{self.name}")


@dataclass
class _File:
    """The keys of a suite file, as typed (checked with `typecheck`, never coerced)."""

    model: str
    tasks: list[str | dict[str, Any]]
    seeds: list[int]
    arms: list[str] | None = None
    recipe: list[str] = field(default_factory=list)
    arm_overrides: dict[str, list[str]] = field(default_factory=dict)
    out: str | None = None
    tune: str | None = None
    variant: dict[str, Any] | None = None


@dataclass
class _Variant:
    name: str
    set: list[str]


@dataclass
class _Task:
    name: str
    overrides: list[str] | None = None
    recipe: list[str] | None = None
    tune: str | None = None


def builtin() -> list[str]:
    """The built-in suites' names (partial_lora/study/suites/*.yaml)."""
    return sorted(p.stem for p in SUITE_DIR.glob("*.yaml"))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _overrides(where: str, values: Sequence[str]) -> tuple[str, ...]:
    bad = [o for o in values if "=" not in o or o.startswith("=")]
    if bad:
        raise PlrError(f"{where}: '{bad[0]}' is not an override (key=value); fix the suite file")
    return tuple(values)


def _task(where: str, raw: str | dict[str, Any]) -> SuiteTask:
    if isinstance(raw, str):
        if raw not in _options("task"):
            raise PlrError(f"{where}: no task config '{raw}'; choose one of {', '.join(_options('task'))}, or give "
                           f"a task of your own as {{name: {raw}, overrides: [task=hf-text, task.path=...]}}")
        return SuiteTask(raw, (f"task={raw}",))
    if "name" not in raw:
        raise PlrError(f"{where}: a task given as a mapping needs a name (name: mine, overrides: [...]); "
                       "fix the suite file")
    t = from_values(_Task, raw, f"{where}", fix="fix the suite file")
    if not TASK_NAME.fullmatch(t.name):
        raise PlrError(f"{where}.name '{t.name}' must be 1-60 lowercase letters, digits, '_', '.' or '-' (it names "
                       "the task's run dirs); fix the suite file")
    if t.overrides is None and t.name not in _options("task"):
        raise PlrError(f"{where}: no task config '{t.name}'; give its overrides (overrides: [task=hf-text, "
                       "task.path=...]) or name a task config; fix the suite file")
    overrides = _overrides(f"{where}.overrides", t.overrides) if t.overrides is not None else (f"task={t.name}",)
    recipe = None if t.recipe is None else _overrides(f"{where}.recipe", t.recipe)
    try:
        tune = None if t.tune is None else grid.parse(t.tune, where=f"{where}.tune:")
    except PlrError as e:
        raise PlrError(f"{e}; fix the suite file") from None
    return SuiteTask(t.name, overrides, recipe, tune)


def parse(values: Mapping[str, Any], name: str, source: Path | None = None) -> Suite:
    """A suite from a file's values.

    Raises:
        PlrError: an unknown key, a value of the wrong type, an unknown arm or model, a task that is no
            task config and gives no overrides, a task named twice, no tasks or no seeds.
    """
    where = f"suite {source if source is not None and source.parent != SUITE_DIR else name}"
    if not isinstance(values, Mapping):
        raise PlrError(f"{where}: the file must hold a mapping (model:, tasks:, seeds:, ...); fix the suite file")
    missing = [k for k in ("model", "tasks", "seeds") if k not in values]
    if missing:
        raise PlrError(f"{where}: no {missing[0]}: a suite names its model, tasks and seeds; fix the suite file")
    f = from_values(_File, values, where, fix="fix the suite file")
    for i, t in enumerate(f.tasks):  # the list's items are checked one by one, so the message names one
        check_type(f"{where}.tasks[{i}]", t, str | dict[str, Any], fix="fix the suite file")
    if f.model not in _options("model"):
        raise PlrError(f"{where}: no model config '{f.model}'; choose one of {', '.join(_options('model'))}")
    if not f.tasks or not f.seeds:
        raise PlrError(f"{where}: give at least one task and one seed; fix the suite file")
    if any(s < 0 for s in f.seeds):
        raise PlrError(f"{where}.seeds must be >= 0, got {f.seeds}; fix the suite file")
    tasks = tuple(_task(f"{where}.tasks[{i}]", t) for i, t in enumerate(f.tasks))
    names = [t.name for t in tasks]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise PlrError(f"{where}: task '{twice[0]}' is listed twice; give each task its own name")
    arms = tuple(f.arms) if f.arms is not None else tuple(ARMS)
    for arm in [*arms, *f.arm_overrides]:
        if arm not in ARMS:
            raise PlrError(f"{where}: unknown arm '{arm}'; choose from: {', '.join(ARMS)}")
    if not arms:
        raise PlrError(f"{where}: arms is empty; list at least one of {', '.join(ARMS)} (or leave arms out for all)")
    extra = {a: _overrides(f"{where}.arm_overrides.{a}", o) for a, o in f.arm_overrides.items()}
    try:
        tune = None if f.tune is None else grid.parse(f.tune, where=f"{where}.tune:")
    except PlrError as e:
        raise PlrError(f"{e}; fix the suite file") from None
    variant = None if f.variant is None else _variant(f"{where}.variant", f.variant, arms)
    return Suite(name, f.model, tasks, tuple(f.seeds), arms, _overrides(f"{where}.recipe", f.recipe), extra,
                 None if f.out is None else Path(f.out), source, tune, variant)


def _variant(where: str, raw: dict[str, Any], arms: Sequence[str]) -> Variant:
    v = from_values(_Variant, raw, where, fix="fix the suite file")
    if not VARIANT_NAME.fullmatch(v.name):
        raise PlrError(f"{where}.name '{v.name}' must be 1-40 lowercase letters, digits, '_', '.' or '-' (it names "
                       "the variant's run dirs, <arm>@<name>); fix the suite file")
    if not v.set:
        raise PlrError(f"{where}.set is empty: a variant is its overrides (set: [key=value, ...]); fix the suite file")
    if not any(a in VARIANT_ARMS for a in arms):
        raise PlrError(f"{where}: none of the suite's arms takes a variant; list one of {', '.join(VARIANT_ARMS)} "
                       "in arms, or drop the variant")
    return Variant(v.name, _overrides(f"{where}.set", v.set))


def load(name_or_path: str) -> Suite:
    """A built-in suite by name, or a suite file by path (anything ending in .yaml/.yml).

    Raises:
        PlrError: no such suite or file, a file that is not YAML, or a suite that does not check.
    """
    from omegaconf import OmegaConf

    is_path = name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path
    path = Path(name_or_path).expanduser() if is_path else SUITE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        if is_path:
            raise PlrError(f"no suite file {path}; give the path of a suite YAML (see `plr study --help`)")
        raise PlrError(f"unknown suite '{name_or_path}'; choose one of {', '.join(builtin())}, or give a suite "
                       "file: --suite path/to/mine.yaml")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:  # noqa: BLE001 - a YAML or interpolation error: one line, with the file
        raise PlrError(f"suite file {path} does not read as YAML ({first_line(e) or type(e).__name__}); "
                       "fix it") from None
    return parse(raw, path.stem, source=path)  # type: ignore[arg-type]
