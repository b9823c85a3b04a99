"""The trained adapter and head a stage writes (probe, retrain) and a later stage reads back."""

from __future__ import annotations

from pathlib import Path

from partial_lora import artifacts
from partial_lora.spec import RunSpec
from partial_lora.working_set.build import Setup


def save_trained(s: Setup, out: Path, spec: RunSpec) -> None:
    """Write a stage's trained adapter and head (probe, retrain)."""
    meta = {"model": spec.model.name, "task": spec.task}
    assert s.adapter is not None
    artifacts.save_tensors(out / artifacts.ADAPTER, s.adapter.state_dict(), meta)
    extra = s.adapter.extra_state()
    if extra is not None:
        artifacts.write_json(out / artifacts.PEFT_STATE, extra)
    artifacts.save_tensors(out / artifacts.HEAD, s.built.model.head_state_dict(), meta)


def load_trained(s: Setup, src: Path) -> None:
    """Load the adapter and head that `save_trained` wrote into `src` (allocate, evaluate)."""
    assert s.adapter is not None
    extra = artifacts.read_json(src / artifacts.PEFT_STATE) if (src / artifacts.PEFT_STATE).exists() else None
    s.adapter.load(artifacts.load_tensors(src / artifacts.ADAPTER), extra, source=str(src / artifacts.ADAPTER))
    s.built.model.load_head_state_dict(artifacts.load_tensors(src / artifacts.HEAD), source=str(src / artifacts.HEAD))
