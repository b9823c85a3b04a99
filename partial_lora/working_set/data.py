"""The run's task data, loaded once: the pipeline loads it before any stage (to check its identity
against the run dir), and inside `data_loaded_once` every stage's `setup` reads that one load."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import replace
from typing import Any

from partial_lora.data import TaskData, load_task
from partial_lora.data.base import TaskSpec
from partial_lora.data.verbalizer import as_choices
from partial_lora.models import multitask
from partial_lora.spec import RunSpec

# The data loaded by task inside `data_loaded_once` (the pipeline's block); None outside it. A context
# variable, not a module global: each context (a thread, a test) sees its own.
_LOADED: ContextVar[dict[str, Any] | None] = ContextVar("plr_loaded_data", default=None)


@contextmanager
def data_loaded_once() -> Iterator[None]:
    """Inside the block every stage gets the task's data from one load (the pipeline loads it first, to
    check its identity against the run dir). Nothing modifies loaded data, so the stages read the same
    rows as from their own loads; outside the block every call loads anew."""
    token = _LOADED.set(_LOADED.get() if _LOADED.get() is not None else {})
    try:
        yield
    finally:
        _LOADED.reset(token)


def _once(key: str, load: Callable[[], Any]) -> Any:
    loaded = _LOADED.get()
    if loaded is None:
        return load()
    if key not in loaded:
        loaded[key] = load()
    return loaded[key]


def load_data(run: RunSpec) -> TaskData:
    """The task's data; for a multi-task run, the union of its members' (see `load_multi`)."""
    return load_multi(run).union if run.multi else _load_one(run.parts[0].task, run.causal)


def load_multi(run: RunSpec) -> multitask.MultiTaskData:
    """Each member task's data, and their union."""
    def load() -> multitask.MultiTaskData:
        parts = [_load_one(p.task, run.causal) for p in run.parts]
        return multitask.combine(run.task, parts, [(list(p.metrics), p.main) for p in run.parts])

    return _once(repr(("multi", run.task, run.parts, run.causal)), load)


def data_identity(run: RunSpec) -> dict[str, str]:
    """What the run's data was read from, each source with its content digest (`data.identity`)."""
    parts = load_multi(run).parts if run.multi else [load_data(run)]
    return dict(sorted({k: v for d in parts for k, v in d.sources.items()}.items()))


def _load_one(spec: TaskSpec, causal: bool = False) -> TaskData:
    """One task's data; a classification task read by a causal LM becomes prompt/answer choices."""
    def load() -> TaskData:
        data = load_task(spec)  # checks task.num_labels against the data
        if causal and data.kind == "text":
            data = replace(as_choices(data, spec.prompt, spec.verbalizer), sources=data.sources)
        return data

    return _once(repr(("one", spec, causal)), load)
