"""The trained adapter and head a stage writes (probe, retrain) and a later stage reads back."""

from __future__ import annotations

from pathlib import Path

from partial_lora import artifacts as A
from partial_lora.spec import RunSpec
from partial_lora.working_set.build import Setup

def save_trained(s: Setup, out: Path, spec: RunSpec) -> None:
    """Write a stage's trained adapter and head (probe, retrain)."""
    meta = {"model": spec.model.name, "task": spec.task}
    assert s.adapter is not None
    A.save_tensors(out / A.ADAPTER, s.adapter.state_dict(), meta)
    extra = s.adapter.extra_state()
    if extra is not None:
        A.write_json(out / A.PEFT_STATE, extra)
    A.save_tensors(out / A.HEAD, s.built.model.head_state_dict(), meta)


def load_trained(s: Setup, src: Path) -> None:
    """Load the adapter and head that `save_trained` wrote into `src` (allocate, evaluate)."""
    assert s.adapter is not None
    extra = A.read_json(src / A.PEFT_STATE) if (src / A.PEFT_STATE).exists() else None
    s.adapter.load(A.load_tensors(src / A.ADAPTER), extra, source=str(src / A.ADAPTER))
    s.built.model.load_head_state_dict(A.load_tensors(src / A.HEAD), source=str(src / A.HEAD))
