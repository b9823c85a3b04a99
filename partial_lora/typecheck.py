"""Config values checked against type annotations, never coerced.

`check_type` refuses a value whose type is not the annotated one in one line (1.5 is no int,
"3" no number, true no number; an int is a float), and a non-finite number (nan, inf, -inf, also
inside a list or mapping) in any field: one rule for every float plr reads, applied where the
value is read, so `trainer.epochs=inf` or `adapter.allocation.budget=nan` never reach a loop or a
comparison that a NaN silently passes. `from_values` makes a dataclass from a config group's values
that way, refusing keys it does not know. Nothing here knows plr's config.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from partial_lora.errors import PlrError

_KIND = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}
_PLURAL = {int: "whole numbers", float: "numbers", bool: "true/false values", str: "strings"}


def _fits(value: Any, hint: Any) -> bool:
    """Whether a config value has the annotated type. Never coerces: 1.5 is no int, "3" no number,
    true no number; an int is a float (widening loses nothing)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list, Sequence, collections.abc.Sequence) or hint in (tuple, list):
        if not isinstance(value, list | tuple):
            return False
        inner = [a for a in args if a is not Ellipsis]
        return not inner or all(_fits(v, inner[0]) for v in value)
    if origin in (dict, Mapping, collections.abc.Mapping) or hint is dict:
        if not isinstance(value, Mapping):
            return False
        return len(args) < 2 or all(_fits(v, args[1]) for v in value.values())
    return True  # nested dataclasses: checked where they are read


def _describe(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args) + (" (or null)" if type(None) in typing.get_args(hint) else "")
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    if typing.get_origin(hint) in (dict, collections.abc.Mapping):
        return "a mapping" + (f" to {_PLURAL.get(args[1], _describe(args[1]))}" if len(args) == 2 and args[1] is not Any
                              else "")
    if typing.get_origin(hint) in (tuple, list, collections.abc.Sequence):
        return "a list" + (f" of {_PLURAL.get(args[0], _describe(args[0]))}" if args and args[0] is not Ellipsis
                           else "")
    return _KIND.get(hint, getattr(hint, "__name__", str(hint)))


def non_finite(value: Any) -> float | None:
    """The first nan or infinite float in a value (searched through lists and mappings), or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else value
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return next((bad for v in value if (bad := non_finite(v)) is not None), None)
    return None


def check_type(key: str, value: Any, hint: Any, fix: str = "fix that override") -> None:
    """Refuse a value of the wrong type, or a non-finite number, in one line (a wrong type is
    refused, never coerced).

    Raises:
        PlrError: names the key, the value, the expected type, and an example.
    """
    if not _fits(value, hint):
        got = "a string" if isinstance(value, str) else type(value).__name__
        raise PlrError(f"{key}={value!r} must be {_describe(hint)}, got {got}; {fix}")
    bad = non_finite(value)
    if bad is not None:
        what = "is not a finite number" if isinstance(value, float) else f"holds {bad!r}, which is not a finite number"
        raise PlrError(f"{key}={value!r} {what}; give {key} a finite value (plr refuses nan and inf in every setting)")


def from_values(cls: type, values: Mapping[str, Any], group: str, extra: tuple[str, ...] = (),
                fix: str = "fix that override") -> Any:
    """Instantiate a dataclass from a config group, rejecting keys it does not know, keys it needs and
    lacks, and values of the wrong type (checked against the field annotations)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names - set(extra))
    if unknown:
        raise PlrError(f"unknown key {group}.{unknown[0]}; known keys: {', '.join(sorted(names | set(extra)))}"
                       + ("" if fix == "fix that override" else f"; {fix}"))
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise PlrError(f"{group} has no {missing[0]}: give {group}.{missing[0]}; {fix}")
    hints = typing.get_type_hints(cls)
    for k, v in values.items():
        if k in names:
            check_type(f"{group}.{k}", v, hints[k], fix)
    return cls(**{k: v for k, v in values.items() if k in names})


MAX_SEED = 2**32 - 1  # numpy's seed range; torch's and Python's take it too, with room for derived seeds


def check_seed(key: str, value: object) -> None:
    """A seed is a whole number in [0, MAX_SEED]."""
    check_type(key, value, int)
    if not 0 <= int(value) <= MAX_SEED:  # type: ignore[call-overload]
        raise PlrError(f"{key} must be in [0, {MAX_SEED}], got {value}; e.g. {key}=0")
