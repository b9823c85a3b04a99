"""A tuning grid of the study (`plr study --tune KEY=V1,V2,...`, or a suite's `tune:`): what it is, how its
runs are named, and the rule that chooses a value.

    plr study --suite fair-minilm --tune retrain.lr=2e-3,5e-3,1e-2,2e-2,5e-2

For each (task, arm) every value runs on the **choice seed** (the suite's smallest seed: 0 in every
built-in suite; `--seeds` narrows the seeds run at the choice, never the seed that makes it), the
value whose run scores best on the validation split (`val_<main metric>` of its results.json, never
a test number) is chosen, ties going to the smaller value, and the suite's other seeds run at it.
The chosen value's run on the choice seed is one of its runs (it is not run again).

A tuned run's arm dir is the arm's own dir and the setting, `<arm dir>+<key>+<value>`:
`partial+retrain.lr+0.01/seed0`, `partial@p25elem+retrain.lr+0.01/seed2`. The arm's own dir (no
`+`) keeps the suite's shared setting, so every claim reads at both. Values are written in Python's
shortest form of the number (`5e-3` and `0.005` are one value, `0.005`). Why `+`: the dir name is a
value of Hydra overrides (`run_dir=`, `label=`), where `~` and `=` do not parse unquoted, and the
ledger keeps it as a path in the repository, where `:` breaks a Windows checkout; arm, variant and
key names hold no `+`. The `head` arm is not tuned: it trains no adapter, and its head learns at
the rate every arm's head shares.

This module reads no run; `study.choice` reads the grid's runs and makes the choice.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from partial_lora.errors import PlrError

SEP = "+"                # <arm dir>+<key>+<value>
CHOICE = "{choice}"      # the value in a run that waits on the choice (its dir is known once the grid finished)
KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
# Keys the study sets itself on every run: a grid over them would mean another study.
STUDY_KEYS = ("seed", "run_dir", "label", "from_run", "model", "task", "experiment", "out_root", "name")
EXAMPLE_GRID = "retrain.lr=2e-3,5e-3,1e-2,2e-2,5e-2"
EXAMPLE = f"--tune {EXAMPLE_GRID}"


@dataclass(frozen=True)
class Tune:
    """A checked grid: the key and its values, each in its canonical text, smallest first."""

    key: str
    values: tuple[str, ...]

    @property
    def text(self) -> str:
        return f"{self.key}={','.join(self.values)}"


def _number(text: str) -> int | float | None:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        x = float(text)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def canonical(x: int | float) -> str:
    """A value as its run dir and override write it: Python's shortest text of the number."""
    return str(x) if isinstance(x, int) else repr(float(x))


def is_rate(key: str) -> bool:
    """A learning rate (or a factor of one): it must be positive."""
    return "lr" in key.rsplit(".", 1)[-1]


def parse(text: str, where: str = "--tune") -> Tune | None:
    """`KEY=V1,V2,...` as a `Tune` (`none`: no tuning).

    Raises:
        PlrError: not KEY=V1,...; a key the study sets itself; no value; a value that is not a number,
            or not positive for a learning rate; a value given twice.
    """
    text = text.strip()
    if text == "none":
        return None
    key, eq, rest = text.partition("=")
    key = key.strip()
    if not eq or not KEY.fullmatch(key):
        raise PlrError(f"{where} '{text}' is not KEY=V1,V2,... (a config key and its values), e.g. {EXAMPLE}")
    if key in STUDY_KEYS:
        raise PlrError(f"{where} {key}: the study sets {key} itself; tune a training setting, e.g. {EXAMPLE}")
    items = [v.strip() for v in rest.split(",")]
    if not any(items):
        raise PlrError(f"{where} {key}= lists no value; give two or more, e.g. {EXAMPLE}")
    if "" in items:
        raise PlrError(f"{where} {key}={rest}: an empty value between commas; list numbers, e.g. {EXAMPLE}")
    numbers = []
    for item in items:
        x = _number(item)
        if x is None:
            raise PlrError(f"{where} {key}: '{item}' is not a number; the grid's values are numbers, e.g. {EXAMPLE}")
        if is_rate(key) and x <= 0:
            raise PlrError(f"{where} {key}: {item} is not a positive learning rate; give values above 0")
        numbers.append(x)
    seen: dict[float, str] = {}
    for item, x in zip(items, numbers):
        if float(x) in seen:
            raise PlrError(f"{where} {key}: {item} is listed twice (as {seen[float(x)]} too); give each value once")
        seen[float(x)] = item
    return Tune(key, tuple(canonical(x) for x in sorted(numbers)))


def dir_name(arm_dir: str, key: str, value: str) -> str:
    """The arm dir of a tuned run: `partial+retrain.lr+0.01`."""
    return f"{arm_dir}{SEP}{key}{SEP}{value}"


def split(name: str) -> tuple[str, str | None, str | None]:
    """An arm dir -> (its untuned arm dir, the tuned key or None, the value or None)."""
    parts = name.split(SEP, 2)  # a value may hold a '+' (1e+20); an arm, variant or key does not
    if len(parts) < 3:
        return name, None, None
    return parts[0], parts[1], parts[2]


def edge(values: Iterable[str], value: str | None) -> str | None:
    """'lowest' or 'highest' when `value` is the grid's smallest or largest of `values` (a value beyond it was not
    tried, and might score better), else None (a value inside the grid, no value, or a one-value grid)."""
    ordered = sorted(values, key=float)
    if value is None or len(ordered) < 2:
        return None
    return "lowest" if value == ordered[0] else "highest" if value == ordered[-1] else None


def choose(scores: Mapping[str, float | None]) -> str | None:
    """The value with the best validation score, ties to the smaller value (None: no value scored)."""
    best: tuple[float, str] | None = None
    for value in sorted(scores, key=float):
        score = scores[value]
        if score is None or (isinstance(score, float) and math.isnan(score)):
            continue
        if best is None or score > best[0]:
            best = (score, value)
    return None if best is None else best[1]
