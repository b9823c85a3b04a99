"""`Classifier`: a backbone behind the one call convention every stage uses, `logits = model(batch)`.

It also gives the training loss of its output (`loss_fn`: cross-entropy, or MSE for a one-output
regression head), its head's parameters and tensors, and keeps a frozen backbone's batch norms
in eval mode. `backbones.build_model` builds one; `causal_lm.CausalLM` subclasses it and
`multitask.MultiTask` wraps one behind the same calls.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from partial_lora import distributed
from partial_lora.errors import PlrError


class Classifier(nn.Module):
    """A backbone `net` with one call convention: `logits = model(batch)`.

    Adapters are injected into `net`, so layer ids are the backbone's own module names.
    """

    def __init__(self, net: nn.Module, family: str, head_modules: Sequence[str]) -> None:
        super().__init__()
        self.net = net
        self.family = family
        self.head_modules = list(head_modules)
        self.frozen_norm = False  # set by build_model from ModelSpec.frozen_norm

    def train(self, mode: bool = True) -> "Classifier":
        """`nn.Module.train`, except that with `frozen_norm` the backbone's batch norms stay in eval mode."""
        super().train(mode)
        if mode and self.frozen_norm:
            for name, m in self.net.named_modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
                        name == h or name.startswith(h + ".") for h in self.head_modules):
                    m.eval()
        return self

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        if self.family == "timm":
            return self.net(batch["pixel_values"])
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return self.net(**inputs).logits

    def loss(self, out: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        """The training loss of a forward's output: cross-entropy, or MSE for a 1-output head."""
        return loss_fn(out, batch["labels"])

    def loss_units(self, batch: Mapping[str, Tensor]) -> int | None:
        """How many units `loss` is a mean over in `batch`, when they are not its rows (None: a
        per-row mean). Data parallel weighs each process's mean loss by its share of them."""
        return None

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for n in self.head_modules for p in self.net.get_submodule(n).parameters()]

    def head_state_dict(self) -> dict[str, Tensor]:
        """Head tensors keyed by their names in `net` (e.g. `classifier.weight`)."""
        return {f"{n}.{k}": distributed.full(v.detach()).cpu().clone() for n in self.head_modules  # FSDP: gathered
                for k, v in self.net.get_submodule(n).state_dict().items()}

    def load_head_state_dict(self, state: Mapping[str, Tensor], source: str = "head") -> None:
        own = self.head_state_dict()
        if set(own) != set(state) or any(own[k].shape != state[k].shape for k in own):
            raise PlrError(f"{source} does not fit this model's head (another model or label count?); "
                           "rerun the stage that wrote it")
        for n in self.head_modules:
            for k, v in self.net.get_submodule(n).state_dict(keep_vars=True).items():
                distributed.assign(v, state[f"{n}.{k}"])  # FSDP: this process's shard of it


def loss_fn(logits: Tensor, labels: Tensor) -> Tensor:
    if logits.shape[-1] == 1:  # regression head (STS-B)
        return nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float())
    return nn.functional.cross_entropy(logits.float(), labels)
