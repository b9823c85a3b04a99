"""Which stages a run runs, in order, from its sparsity, masks, allocator and adapter."""

from __future__ import annotations

from partial_lora import artifacts
from partial_lora.allocation.allocators import NEEDS_PROBE
from partial_lora.spec import RunSpec


def plan(spec: RunSpec) -> list[str]:
    """The stages a run runs, in order (see `stages_for`); a SHiRA whose mask plr draws
    (`adapter.shira.mask`) runs extract (the mask), retrain and evaluate."""
    return stages_for(spec.sparsity, spec.mask.method, spec.allocation.allocator,
                      spec.peft.shira_mask if spec.peft is not None else None)


def stages_for(sp: float | str, mask_method: str, allocator: str, shira_mask: str | None = None) -> list[str]:
    """The stages of a run with this sparsity, mask method and allocator, in order.

    Dense LoRA (sparsity 0): retrain, evaluate. Uniform sparsity (a number): allocate, extract,
    retrain, evaluate, with no probe unless the masks need one (probe_magnitude).
    `sparsity=auto`: all five, the probe only when the allocator or masks read it. A SHiRA whose
    mask plr draws (`shira_mask`): extract (the mask), retrain, evaluate.
    """
    if shira_mask is not None:
        return [artifacts.EXTRACT, artifacts.RETRAIN, artifacts.EVALUATE]
    if sp == 0:
        return [artifacts.RETRAIN, artifacts.EVALUATE]
    needs_probe = mask_method == "probe_magnitude" or (sp == "auto" and allocator in NEEDS_PROBE)
    sparse = [artifacts.ALLOCATE, artifacts.EXTRACT, artifacts.RETRAIN, artifacts.EVALUATE]
    return ([artifacts.PROBE] if needs_probe else []) + sparse
