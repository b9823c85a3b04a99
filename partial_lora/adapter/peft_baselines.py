"""PEFT-backed baselines: LoRA, DoRA, AdaLoRA, VeRA and SHiRA from the `peft` library.

The method is PEFT's; plr supplies the data, the training loop, the metrics and the report, so
a baseline differs from plr's own adapters only in the adapter itself. The adapter is injected
in place into the backbone (`get_peft_model`), on the same layers plr's LoRA would adapt; the
classification head stays trainable next to it.

Per-method options (`adapter.peft.*`) go to the PEFT config as they are. Defaults [ours]:
- `peft_lora`, `dora`: `r`, `alpha`, `dropout` as for plr's LoRA (`dora` sets `use_dora`).
- `adalora`: starts at `init_r` = 1.5·r and prunes to an average of `target_r` = r; the budget
  schedule (`tinit`, `tfinal`) is given as fractions of the run's steps (`tinit_frac` 0.1,
  `tfinal_frac` 0.2). AdaLoRA's orthogonality regulariser (weight `orth_reg_weight`, PEFT's
  default 0.5) is added to the loss, as PEFT's own forward would.
- `vera`: `r` = 256 (the VeRA paper's GLUE setting) unless `adapter.peft.r` says otherwise.
- `shira`: `r` sets the number of trainable entries to that of a rank-r LoRA (PEFT's meaning).

SHiRA at a matched budget (`adapter.shira.mask`, [ours]): `adapter=shira_random` (Random Masking:
random entries at the same density in every layer) and `adapter=shira_snip` (SHiRA's SNIP mask:
each layer's entries with the largest |W0 ⊙ ∂L/∂W0|). plr draws the mask in the extract stage
at the parameter target of `adapter.match` (`shira_counts`: exactly the target, split over the
layers at one density) and gives it to PEFT's SHiRA layers (`set_shira_masks`). Not through
`ShiraConfig.mask_fn`: PEFT requires a mask function to return exactly r·(d_out + d_in) entries
per layer (`ShiraLayer.update_layer` checks it), a multiple of d_out + d_in that cannot land on
another run's parameter count. So PEFT injects SHiRA at r = 1, and plr then sets each layer's
entry indices and its zero-initialised trainable vector, the two tensors `mask_fn` would have
decided. PEFT saves and reloads those indices with the adapter (`shira_indices`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from partial_lora.adapter import snip
from partial_lora.adapter.masks import layer_seed
from partial_lora.errors import PlrError, first_line

METHODS = ("peft_lora", "dora", "adalora", "vera", "shira")
SHIRA_MASKS = ("random", "snip")


@dataclass(frozen=True)
class PeftSpec:
    """Which PEFT method and its settings.

    Attributes:
        method: one of `METHODS`.
        r / alpha / dropout: plr's adapter settings (rank, scaling numerator, dropout).
        options: method-specific PEFT config values (`adapter.peft`), passed through.
        shira_mask: SHiRA only: `random` or `snip` when plr draws the mask (`ShiraMaskConfig`).
    """

    method: str
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    options: Mapping[str, Any] = field(default_factory=dict)
    shira_mask: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PlrError(f"unknown PEFT baseline '{self.method}'; use one of: {', '.join(METHODS)}")
        if self.shira_mask is not None and self.method != "shira":
            raise PlrError(f"adapter.shira.mask applies to SHiRA, not adapter={self.method}; drop it or use "
                           "adapter=shira_random / adapter=shira_snip")
        ignored = sorted(set(self.options) & {"r", "mask_type", "random_seed"}) if self.shira_mask else []
        if ignored:
            raise PlrError(f"adapter.peft.{ignored[0]} does not apply to adapter=shira_{self.shira_mask}: plr draws "
                           "its mask at the matched budget, seeded by the run's seed; drop it")


@dataclass(frozen=True)
class ShiraMaskConfig:
    """`adapter.shira`: who draws SHiRA's mask.

    Attributes:
        mask: None: PEFT's own (r·(d_out + d_in) random entries per layer, `adapter=shira`);
            `random` or `snip`: plr draws it at the budget of `adapter.match` (`adapter=shira_random`,
            `adapter=shira_snip`).
    """

    mask: str | None = None

    def __post_init__(self) -> None:
        if self.mask is not None and self.mask not in SHIRA_MASKS:
            raise PlrError(f"unknown adapter.shira.mask '{self.mask}'; use one of: {', '.join(SHIRA_MASKS)} "
                           "(or null for PEFT's own mask)")


def shira_counts(target: int, shapes: Mapping[str, tuple[int, int]]) -> dict[str, int]:
    """Trainable entries per layer for a total of exactly `target`, at one density in every layer.

    Each layer's share is target·d_out·d_in / Σ d_out·d_in, rounded down, and the remainder goes one
    entry each to the layers with the largest fractional parts (ties: the earlier layer).

    Raises:
        PlrError: the target is more than the layers hold, or leaves a layer with no entry.
    """
    sizes = {k: d_out * d_in for k, (d_out, d_in) in shapes.items()}
    total = sum(sizes.values())
    if not 0 < target <= total:
        raise PlrError(f"a SHiRA budget of {target:,} entries is outside what the adapted layers hold (1 to "
                       f"{total:,}); match another run or set adapter.match.budget within that range")
    share = {k: target * n / total for k, n in sizes.items()}
    counts = {k: int(v) for k, v in share.items()}
    left = target - sum(counts.values())
    for k in sorted(share, key=lambda k: -(share[k] - counts[k]))[:left]:  # sorted() is stable
        counts[k] += 1
    empty = [k for k, n in counts.items() if n == 0]
    if empty:
        raise PlrError(f"a SHiRA budget of {target:,} entries leaves layer {empty[0]} with none at one density; "
                       "raise the budget (adapter.match) or adapt fewer layers")
    return counts


def random_entries(d_out: int, d_in: int, k: int, seed: int) -> Tensor:
    """k random entries of a d_out × d_in weight as (2, k) int64 (row, column) pairs in row-major
    order: PEFT's `random_mask` draw (the first k of a permutation of the d_out·d_in entries from a
    generator seeded with `seed`) at any k, not only r·(d_out + d_in)."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(d_out * d_in, generator=g)[:k].sort().values
    return torch.stack([flat // d_in, flat % d_in])


def shira_entries(shapes: Mapping[str, tuple[int, int]], counts: Mapping[str, int], seed: int,
                  scores: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """SHiRA's trainable entries of each module, (2, k) row and column indices: the `counts[name]`
    entries of largest SNIP importance (`scores`, `adapter=shira_snip`), else a random draw seeded per
    module from `seed` (`adapter=shira_random`)."""
    if scores is not None:
        return {name: snip.top_entries(scores[name], counts[name]) for name in shapes}
    return {name: random_entries(*shapes[name], counts[name], layer_seed(seed, name)) for name in shapes}


def shira_layers(shapes: Mapping[str, tuple[int, int]], counts: Mapping[str, int]) -> dict[str, dict[str, Any]]:
    """What masks.json records of each module of a drawn SHiRA mask: its shape, entries and density."""
    return {name: {"d_out": d_out, "d_in": d_in, "params": counts[name], "density": counts[name] / (d_out * d_in)}
            for name, (d_out, d_in) in shapes.items()}


def set_shira_masks(net: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Give each PEFT SHiRA layer of `net` (by module name) the entries `masks[name]` ((2, k) row and
    column indices) and a zero-initialised trainable vector of k values (PEFT's own init).

    Raises:
        PlrError: a module named by `masks` is not a SHiRA layer of `net`.
    """
    from peft.tuners.shira.layer import ShiraLayer

    for name, idx in masks.items():
        layer = net.get_submodule(name)
        if not isinstance(layer, ShiraLayer):
            raise PlrError(f"the SHiRA masks name module '{name}', which this model's SHiRA did not adapt; "
                           "rerun extract (the masks come from another model or target set)")
        for adapter, old in layer.shira_weight.items():
            layer.shira_weight[adapter] = nn.Parameter(torch.zeros(idx.shape[1], dtype=old.dtype, device=old.device))
            layer.shira_indices[adapter] = idx.to(device=old.device, dtype=torch.int)


def peft_config(spec: PeftSpec, targets: Sequence[str], total_steps: int) -> Any:
    """The PEFT config of `spec` on the modules `targets` (exact module names)."""
    import peft

    opts = dict(spec.options)
    common = {"target_modules": list(targets)}
    try:
        if spec.method in ("peft_lora", "dora"):
            return peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                                   use_dora=spec.method == "dora", **common, **opts)
        if spec.method == "adalora":
            tinit = int(opts.pop("tinit_frac", 0.1) * total_steps)
            tfinal = int(opts.pop("tfinal_frac", 0.2) * total_steps)
            if tinit + tfinal >= total_steps:
                tinit, tfinal = 0, 0
            return peft.AdaLoraConfig(init_r=opts.pop("init_r", max(1, round(1.5 * spec.r))),
                                      target_r=opts.pop("target_r", spec.r), lora_alpha=spec.alpha,
                                      lora_dropout=spec.dropout, total_step=total_steps, tinit=tinit,
                                      tfinal=tfinal, **common, **opts)
        if spec.method == "vera":
            return peft.VeraConfig(r=opts.pop("r", 256), vera_dropout=spec.dropout, **common, **opts)
        if spec.shira_mask is not None:  # plr sets the mask after injection (set_shira_masks): r is a placeholder
            return peft.ShiraConfig(r=1, **common, **opts)
        return peft.ShiraConfig(r=opts.pop("r", spec.r), **common, **opts)
    except (TypeError, ValueError) as e:
        first = first_line(e)
        raise PlrError(f"adapter={spec.method}: PEFT rejected the settings ({first}); fix adapter.peft") from None


def inject_peft(net: nn.Module, spec: PeftSpec, targets: Sequence[str], head_modules: Sequence[str],
                total_steps: int, masks: Mapping[str, Tensor] | None = None) -> Any:
    """Inject the PEFT adapter into `net` in place; return the `PeftModel` that manages it.

    Only the adapter (as PEFT marks it) and the head modules are left trainable. `masks` are the
    SHiRA entries plr drew (`adapter.shira.mask`; the extract stage's), by module name.
    """
    if (spec.shira_mask is not None) != (masks is not None):
        raise PlrError(f"adapter.shira.mask={spec.shira_mask} needs the extract stage's masks"
                       if masks is None else "SHiRA masks given to an adapter that draws none; rerun the run")
    import peft

    cfg = peft_config(spec, targets, total_steps)
    try:
        model = peft.get_peft_model(net, cfg)
    except (TypeError, ValueError) as e:
        first = first_line(e)
        raise PlrError(f"adapter={spec.method}: PEFT could not adapt this model ({first}); "
                       "choose other adapter.targets") from None
    if masks is not None:
        set_shira_masks(net, masks)
    for name in head_modules:
        for p in net.get_submodule(name).parameters():
            p.requires_grad_(True)
    return model


def state_dict(model: Any) -> dict[str, Tensor]:
    """The adapter's tensors as PEFT saves them (no head: plr saves the head itself)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def extra_state(model: Any) -> dict[str, Any]:
    """What a saved adapter needs besides its tensors: AdaLoRA's pruned rank pattern."""
    pattern = getattr(model.peft_config["default"], "rank_pattern", None)
    if not pattern or model.peft_config["default"].peft_type.value != "ADALORA":
        return {}
    return {"rank_pattern": {k: [bool(x) for x in v] for k, v in pattern.items()}}


def load_state_dict(model: Any, state: Mapping[str, Tensor], extra: Mapping[str, Any] | None = None,
                    source: str = "adapter") -> None:
    """Load `state_dict`'s tensors (after shrinking AdaLoRA's modules to the saved rank pattern)."""
    from peft import set_peft_model_state_dict

    pattern = (extra or {}).get("rank_pattern")
    if pattern:  # PEFT shrinks AdaLoRA's modules to this pattern while it loads
        model.peft_config["default"].rank_pattern = dict(pattern)
    try:
        result = set_peft_model_state_dict(model, dict(state))
    except RuntimeError as e:
        raise PlrError(f"{source} does not fit this PEFT adapter ({str(e).splitlines()[-1].strip()}); "
                       "rerun the stage that wrote it") from None
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise PlrError(f"{source} holds tensors this PEFT adapter does not have ({unexpected[0]}, ...); "
                       "rerun the stage that wrote it")


def step_hook(model: Any, spec: PeftSpec) -> Callable[[int], None] | None:
    """AdaLoRA reallocates its rank budget after every optimizer step; the others need nothing."""
    if spec.method != "adalora":
        return None
    return lambda step: model.base_model.update_and_allocate(step)


def regularizer(model: Any, spec: PeftSpec) -> Callable[[], Tensor] | None:
    """AdaLoRA's orthogonality penalty on P (lora_A) and Q (lora_B), weighted as PEFT's forward does."""
    if spec.method != "adalora":
        return None
    weight = float(model.peft_config["default"].orth_reg_weight)
    factors = [(n, p) for n, p in model.named_parameters() if p.requires_grad and ("lora_A" in n or "lora_B" in n)]

    def penalty() -> Tensor:
        total = torch.zeros((), device=factors[0][1].device)
        for name, p in factors:
            m = p @ p.T if "lora_A" in name else p.T @ p
            eye = torch.eye(*m.shape, out=torch.empty_like(m))
            total = total + torch.norm(m - eye, p="fro")
        return weight * total / len(factors)

    return penalty
