"""The PEFT conversion: plr's LoRA layers as PEFT LoRA targets, the base PEFT wraps, and the side tables."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from partial_lora import artifacts
from partial_lora.adapter.inject import layer_id
from partial_lora.adapter.lora import LoRABranch, LoRALinear
from partial_lora.errors import PlrError, first_line
from partial_lora.export.layout import read_optional
from partial_lora.models.backbones import ModelSpec, build_model
from partial_lora.models.source import resolve_source
from partial_lora.spec import RunSpec
from partial_lora.training.runtime import set_seed
from partial_lora.working_set.build import Setup

ADAPTER = "default"  # PEFT's adapter name
DELTA_ATOL = 1e-6    # self-check: PEFT's ΔW against plr's, per module


@dataclass(frozen=True)
class Target:
    """One PEFT LoRA target: a wrapped Linear and its plr branches (one, or one per fused slice).

    Attributes:
        module: the Linear's name in the backbone (PEFT's target module name).
        out_features / in_features: the Linear's shape.
        branches: plr branches by layer id, in slice order.
    """

    module: str
    out_features: int
    in_features: int
    branches: dict[str, LoRABranch]

    @property
    def r(self) -> int:
        return next(iter(self.branches.values())).r

    @property
    def alpha(self) -> float:
        return next(iter(self.branches.values())).alpha

    @property
    def rank(self) -> int:
        """PEFT's rank on this module: r per branch."""
        return self.r * len(self.branches)

    def factors(self) -> tuple[Tensor, Tensor]:
        """PEFT's dense (B, A): (out_features × rank) and (rank × in_features), zero outside R × C."""
        b_full = torch.zeros(self.out_features, self.rank)
        a_full = torch.zeros(self.rank, self.in_features)
        for i, br in enumerate(self.branches.values()):
            b, a = br.kept.pad(*(t.detach().float().cpu() for t in br.factors()))
            ranks = slice(i * br.r, (i + 1) * br.r)
            b_full[br.offset:br.offset + br.d_out, ranks] = b
            a_full[ranks] = a
        return b_full, a_full

    def delta(self) -> Tensor:
        """plr's update of the whole Linear (out_features × in_features)."""
        out = torch.zeros(self.out_features, self.in_features)
        for br in self.branches.values():
            out[br.offset:br.offset + br.d_out] += br.delta_weight().detach().float().cpu()
        return out


# --------------------------------------------------------------------------- targets and the base


def find_targets(net: nn.Module) -> list[Target]:
    """Every LoRA-wrapped Linear of the run's backbone, with its branches by layer id."""
    return [Target(name, mod.out_features, mod.in_features,
                   {layer_id(name, key): br for key, br in mod.branches.items()})
            for name, mod in net.named_modules() if isinstance(mod, LoRALinear)]


def check_plr_adapter(s: Setup, run: RunSpec, targets: Sequence[Target]) -> None:
    """Only plr's own LoRA layers are converted (PEFT-backed baselines have none)."""
    if getattr(s, "peft", None) is not None or not targets:
        raise PlrError(f"the run's adapter '{run.method}' is not plr's LoRA (a PEFT-backed baseline?), so there is "
                       "nothing to convert; export runs of adapter=partial, lora, uniform or lora_matched")


def plain_state(net: nn.Module) -> dict[str, Tensor]:
    """The run backbone's state dict as the unwrapped model names it (no LoRA tensors)."""
    wrapped = [name for name, mod in net.named_modules() if isinstance(mod, LoRALinear)]
    out = {}
    for key, value in net.state_dict().items():
        owner = next((w for w in wrapped if key.startswith(w + ".")), None)
        if owner is None:
            out[key] = value
        elif key.startswith(owner + ".base_layer."):
            out[owner + key[len(owner) + len(".base_layer"):]] = value
    return out


def fresh_base(spec: ModelSpec, num_labels: int, seed: int) -> nn.Module:
    """A new backbone as a user would build it: from the source, or (random init) seeded with `seed`."""
    set_seed(seed)
    net = build_model(spec, num_labels).model.net
    return net.eval()


def unreproduced(base: nn.Module, run_net: nn.Module, skip: Sequence[str]) -> list[str]:
    """Modules (outside `skip`) whose tensors in `base` differ from the run's: not given by the source."""
    ours, theirs = plain_state(run_net), base.state_dict()
    if set(ours) != set(theirs):
        odd = sorted(set(ours) ^ set(theirs))[:2]
        raise PlrError(f"a fresh build of the base differs in its tensors ({odd}); the model source changed "
                       "since the run, so export from the same model version")
    modules: list[str] = []
    for key, value in theirs.items():
        module = key.rpartition(".")[0]
        if any(module == s or module.startswith(s + ".") for s in skip) or module in modules:
            continue
        if value.shape != ours[key].shape or not torch.equal(value, ours[key].to(value.device)):
            modules.append(module)
    return modules


def check_extra(extra: Sequence[str], spec: ModelSpec, seed: int, targets: Sequence[Target]) -> None:
    """Base modules a user's build would not reproduce are saved in full, unless that cannot work."""
    if extra and not spec.pretrained:
        raise PlrError(f"the random-init base of model '{spec.name}' is not reproduced by seeding with {seed} "
                       f"('{extra[0]}' differs), so no user could rebuild it; export needs a deterministic build")
    clash = [m for m in extra for t in targets if t.module == m or t.module.startswith(m + ".")]
    if clash:
        raise PlrError(f"module '{clash[0]}' is a LoRA target but the base checkpoint does not hold its weights "
                       "(the loader draws them at random); export a run whose targets the checkpoint contains")


def base_reference(spec: ModelSpec) -> str:
    """`base_model_name_or_path`: hub id, resolved local dir, timm name, or the config name (random init)."""
    if not spec.pretrained:
        return spec.name
    source = (spec.config.get("architecture") or spec.source) if spec.family == "timm" else spec.source
    path, _ = resolve_source(source)
    return path


# ------------------------------------------------------------------------------------- PEFT model


def peft_config(run: RunSpec, targets: Sequence[Target], modules_to_save: Sequence[str]) -> Any:
    """PEFT's LoraConfig: exact module names, rank/alpha patterns for fused modules."""
    from peft import LoraConfig

    spec = run.model
    r, alpha = targets[0].r, targets[0].alpha
    fused = [t for t in targets if len(t.branches) > 1]
    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=run.lora.dropout, bias="none",
        target_modules=[t.module for t in targets], modules_to_save=list(modules_to_save),
        rank_pattern={re.escape(t.module): t.rank for t in fused},
        alpha_pattern={re.escape(t.module): alpha * len(t.branches) for t in fused},
        task_type={"hf-text": "SEQ_CLS", "hf-causal": "CAUSAL_LM"}.get(spec.family),
        revision=spec.revision if spec.pretrained else None)


def make_peft_model(base: nn.Module, lcfg: Any, reference: str) -> Any:
    """`get_peft_model` with `base_model_name_or_path` set to `reference` (PEFT reads the model's own)."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers deprecations raised inside peft
        try:
            model = get_peft_model(base, lcfg)
        except (ValueError, TypeError, NotImplementedError) as e:
            raise PlrError(f"PEFT cannot add LoRA to this base model ({first_line(e)}); this run "
                           "cannot be exported with the installed peft") from None
    config = model.peft_config[ADAPTER]
    config.base_model_name_or_path = reference
    # PEFT's SEQ_CLS task adds its own head names (classifier, score): list each name once.
    config.modules_to_save = list(dict.fromkeys(config.modules_to_save or []))
    return model.eval()


def copy_weights(peft_model: Any, run_net: nn.Module, targets: Sequence[Target], saved: Sequence[str]) -> None:
    """plr's factors into PEFT's LoRA layers; the run's saved modules (head...) into PEFT's copies."""
    net = peft_model.get_base_model()
    with torch.no_grad():
        for t in targets:
            layer = net.get_submodule(t.module)
            if layer.r[ADAPTER] != t.rank or abs(layer.scaling[ADAPTER] - t.alpha / t.r) > 1e-12:
                raise PlrError(f"PEFT built module '{t.module}' with rank {layer.r[ADAPTER]} and scale "
                               f"{layer.scaling[ADAPTER]}, not {t.rank} and {t.alpha / t.r}; check the peft version")
            b_full, a_full = t.factors()
            # A Conv2d target's PEFT factors are 1x1 convolutions: (out, rank, 1, 1) and (rank, in, 1, 1).
            layer.lora_B[ADAPTER].weight.copy_(b_full.view_as(layer.lora_B[ADAPTER].weight))
            layer.lora_A[ADAPTER].weight.copy_(a_full.view_as(layer.lora_A[ADAPTER].weight))
        for name in saved:
            wrapper = net.get_submodule(name)
            wrapper.modules_to_save[ADAPTER].load_state_dict(run_net.get_submodule(name).state_dict())


def check_deltas(peft_model: Any, targets: Sequence[Target]) -> None:
    """PEFT's ΔW of every module equals plr's (a wrong mapping never gets written)."""
    net = peft_model.get_base_model()
    for t in targets:
        ours = t.delta()  # a Conv2d's PEFT delta is (out, in, 1, 1)
        theirs = net.get_submodule(t.module).get_delta_weight(ADAPTER).detach().float().cpu().reshape(ours.shape)
        if not torch.allclose(theirs, ours, atol=DELTA_ATOL * max(1.0, float(ours.abs().max()))):
            raise PlrError(f"exported update of '{t.module}' differs from the run's "
                           f"(max {float((theirs - ours).abs().max()):.2e}); please report this as a plr bug")


# ----------------------------------------------------------------------------------- side files


def layer_table(run_dir: Path, run: RunSpec, targets: Sequence[Target]) -> dict[str, Any]:
    """plr_layers.json: per layer id, where PEFT holds it and what it keeps (from extract/allocate)."""
    masks = read_optional(artifacts.stage_dir(run_dir, artifacts.EXTRACT) / artifacts.MASKS_JSON)
    alloc = read_optional(artifacts.stage_dir(run_dir, artifacts.ALLOCATE) / artifacts.ALLOCATION)
    from_masks = (masks or {}).get("layers", {})
    from_alloc = {la["name"]: la for la in (alloc or {}).get("layers", [])}
    layers: dict[str, Any] = {}
    for t in targets:
        for i, (lid, br) in enumerate(t.branches.items()):
            row = {"module": t.module, "slice": lid[len(t.module) + 1:] or None, "out_offset": br.offset,
                   "peft_ranks": [i * br.r, (i + 1) * br.r], "d_out": br.d_out, "d_in": br.d_in,
                   "ratio": 1.0, "rows": len(br.rows), "cols": len(br.cols), "params": br.num_parameters(),
                   "dense_params": br.dense_num_parameters()}
            row["ratio"] = from_masks.get(lid, from_alloc.get(lid, {})).get("ratio", row["ratio"])
            if lid in from_alloc and from_alloc[lid].get("sensitivity") is not None:
                row["sensitivity"] = from_alloc[lid]["sensitivity"]
            layers[lid] = row
    return {"method": run.method, "r": targets[0].r, "alpha": targets[0].alpha, "sparsity": run.sparsity,
            "mask_method": (masks or {}).get("method"), "granularity": (masks or {}).get("granularity"),
            "allocator": (alloc or {}).get("allocator"), "layers": layers}


def mask_tensors(targets: Sequence[Target]) -> dict[str, Tensor]:
    """plr_masks.safetensors: `{layer_id}.rows` / `.cols` (int64), element masks as `.mask_A/.mask_B` (uint8)."""
    out: dict[str, Tensor] = {}
    for t in targets:
        for lid, br in t.branches.items():
            out[f"{lid}.rows"], out[f"{lid}.cols"] = br.rows.cpu().long(), br.cols.cpu().long()
            if br.mask_A is not None:
                out[f"{lid}.mask_A"] = br.mask_A.cpu().to(torch.uint8)
                out[f"{lid}.mask_B"] = br.mask_B.cpu().to(torch.uint8)
    return out
