"""One small interface over the two kinds of adapter a run trains: plr's own LoRA branches
(dense or Partial-LoRA) and the PEFT baselines (`adapter=peft_lora`, DoRA, AdaLoRA, VeRA, SHiRA).

The stages talk to `Adapter` only: its parameter count, its tensors out and in, and what it adds
to training (`loop.Hooks`). Nothing else in a stage asks which kind it is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from torch import Tensor

from partial_lora.adapter import peft_baselines
from partial_lora.adapter.inject import adapter_state_dict, count_adapter_parameters, load_adapter_state_dict
from partial_lora.models.classifier import Classifier
from partial_lora.training.loop import Hooks


class Adapter(Protocol):
    def num_parameters(self) -> int:
        """Trainable adapter parameters (the head not counted)."""
        ...

    def state_dict(self) -> dict[str, Tensor]:
        """The adapter's tensors, whole, on CPU (what `adapter.safetensors` holds)."""
        ...

    def extra_state(self) -> dict[str, Any] | None:
        """State beyond the tensors (AdaLoRA's rank pattern), or None when there is none."""
        ...

    def load(self, tensors: Mapping[str, Tensor], extra: Mapping[str, Any] | None, source: str) -> None:
        """Put saved tensors (and extra state) back; every key and shape must match."""
        ...

    def hooks(self, validate: Callable[[], dict[str, float]]) -> Hooks:
        """`loop.fit`'s hooks: the validation, and what the adapter adds to a step."""
        ...


class PlrAdapter:
    """plr's LoRA branches in `model.net` (every kept row and column, or a compact subset)."""

    def __init__(self, model: Classifier) -> None:
        self.model = model

    def num_parameters(self) -> int:
        return count_adapter_parameters(self.model.net)["adapter"]

    def state_dict(self) -> dict[str, Tensor]:
        return adapter_state_dict(self.model.net)

    def extra_state(self) -> dict[str, Any] | None:
        return None

    def load(self, tensors: Mapping[str, Tensor], extra: Mapping[str, Any] | None, source: str) -> None:
        load_adapter_state_dict(self.model.net, tensors, source=source)

    def hooks(self, validate: Callable[[], dict[str, float]]) -> Hooks:
        return Hooks(validate=validate)


class PeftAdapter:
    """A PEFT baseline's adapter (`peft_baselines.inject_peft` made `peft`)."""

    def __init__(self, model: Classifier, peft: Any, spec: peft_baselines.PeftSpec) -> None:
        self.model, self.peft, self.spec = model, peft, spec

    def num_parameters(self) -> int:
        head = {id(p) for p in self.model.head_parameters()}
        return sum(p.numel() for p in self.model.net.parameters() if p.requires_grad and id(p) not in head)

    def state_dict(self) -> dict[str, Tensor]:
        return peft_baselines.state_dict(self.peft)

    def extra_state(self) -> dict[str, Any] | None:
        return peft_baselines.extra_state(self.peft)

    def load(self, tensors: Mapping[str, Tensor], extra: Mapping[str, Any] | None, source: str) -> None:
        peft_baselines.load_state_dict(self.peft, tensors, extra or {}, source=source)

    def hooks(self, validate: Callable[[], dict[str, float]]) -> Hooks:
        return Hooks(validate=validate, after_step=peft_baselines.step_hook(self.peft, self.spec),
                     extra_loss=peft_baselines.regularizer(self.peft, self.spec))
