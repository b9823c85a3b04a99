"""`plr export`: a finished run as a LoRA adapter that stock PEFT loads, plus plr's masks and a card.

PEFT's LoRA computes ΔW = (lora_alpha / r)·B·A with dense factors B (d_out × r) and A (r × d_in).
A plr branch keeps rows R of B and columns C of A, so the same update is B·A with B[R] = B_R and
A[:, C] = A_C and zeros elsewhere (element masks multiplied in first). The export stores these
zero-padded factors: PEFT computes exactly plr's update, and the sparsity structure travels
alongside in `plr_masks.safetensors`. Fused projections (timm's `qkv` with `q` and `v` branches)
become one PEFT LoRA of rank k·r on the fused Linear: A stacks the branches' A, B is block-diagonal
at each slice's output rows, and `rank_pattern`/`alpha_pattern` keep the scale at alpha / r.

The export folder (built in a temporary folder next to it, then renamed into place):

    adapter_config.json  adapter_model.safetensors   PEFT's own files (`save_pretrained`)
    plr_masks.safetensors                             kept rows/cols per layer id (sparse runs only)
    plr_layers.json                                   per layer: keep ratio, shapes, kept counts, parameters
    plr_config.yaml                                   the run's config (rebuilds a random-init base)
    README.md                                         the model card, with how to load it
    merged/                                           with --merged: the merged model (+ tokenizer/processor)

The base model is what `build_model` gives for the run's model config: the pretrained source
(hub id, local dir, or the folder of a `package:` source) with a new head. Random-init configs
(`pretrained: false`, the tiny test models) have no source; their base is rebuilt with plr,
seeded with the run's seed, and the export checks that this reproduces the run's base weights.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from partial_lora import artifacts as A
from partial_lora import config as C
from partial_lora.errors import PlrError
from partial_lora.lora import LoRABranch, LoRALinear, count_adapter_parameters, layer_id
from partial_lora.models import ModelSpec, build_model, resolve_source
from partial_lora.stages.base import Setup, is_sparse, load_trained, setup_run
from partial_lora.train import set_seed

HYDRA_CONFIG, HYDRA_OVERRIDES = A.HYDRA_CONFIG, A.HYDRA_OVERRIDES
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # PEFT's names
MASKS, LAYERS, CONFIG = "plr_masks.safetensors", "plr_layers.json", "plr_config.yaml"
CARD, MERGED = "README.md", "merged"
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
            b, a = (t.detach().float().cpu() for t in br.factors())
            ranks = slice(i * br.r, (i + 1) * br.r)
            b_full[br.out_index.cpu(), ranks] = b
            a_full[ranks, br.cols.cpu()] = a
        return b_full, a_full

    def delta(self) -> Tensor:
        """plr's update of the whole Linear (out_features × in_features)."""
        out = torch.zeros(self.out_features, self.in_features)
        for br in self.branches.values():
            out[br.offset:br.offset + br.d_out] += br.delta_weight().detach().float().cpu()
        return out


@dataclass
class Exported:
    """What `export_run` wrote (for the CLI's summary).

    Attributes:
        out_dir: the export folder.
        files: names written at its top level (`merged/` included when made).
        targets: PEFT target modules.
        r / alpha: plr's rank and alpha.
        params: adapter, dense_lora, head (and extra saved modules) parameter counts.
        stored: values in PEFT's zero-padded LoRA factors.
        base: `base_model_name_or_path` as written.
        notes: remarks also written to the card.
    """

    out_dir: Path
    files: list[str]
    targets: list[str]
    r: int
    alpha: float
    params: dict[str, int]
    stored: int
    base: str
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        p = self.params
        dense = f"dense LoRA {p['dense_lora']:,}"
        if p["adapter"] < p["dense_lora"]:
            dense += f", -{100.0 * (1 - p['adapter'] / p['dense_lora']):.1f}%"
        return "\n".join([
            f"[plr] export: wrote {self.out_dir}: {', '.join(self.files)}",
            f"  PEFT LoRA r={self.r} alpha={self.alpha:g} on {len(self.targets)} modules · base {self.base}",
            f"  trainable parameters: adapter {p['adapter']:,} ({dense}) · head {p['head']:,} · "
            f"stored LoRA values (zero-padded) {self.stored:,}",
            f"  model card and how to load: {self.out_dir / CARD}",
            *(f"  note: {n}" for n in self.notes),
        ])


# ----------------------------------------------------------------------------- checks and rebuild


def check_run(run_dir: Path) -> None:
    """A run dir with a config and a finished retrain stage, or a one-line error naming the fix."""
    if not run_dir.is_dir():
        raise PlrError(f"run dir '{run_dir}' does not exist; pass the run dir of a `plr train` run")
    if not (run_dir / HYDRA_CONFIG).is_file():
        raise PlrError(f"'{run_dir}' is not a plr run dir (no {HYDRA_CONFIG}); pass the run dir `plr train` printed")
    if not A.is_done(run_dir, A.RETRAIN):
        raise PlrError(f"run '{run_dir}' has no finished retrain stage; finish it first with "
                       f"`plr train run_dir={run_dir} <the run's overrides>`")


def _is_run_dir(path: Path) -> bool:
    return (path / HYDRA_CONFIG).exists() or (path / A.RESULTS).exists() or any(
        A.is_done(path, s) for s in A.STAGES)


def check_out_dir(out_dir: Path, run_dir: Path, force: bool) -> None:
    """Refuse a file, a non-empty folder (unless `force`), and, even with `force`, any folder that
    is a run dir, lies inside one or holds one: replacing it would delete a run's artifacts."""
    if out_dir.exists() and not out_dir.is_dir():
        raise PlrError(f"out dir '{out_dir}' is a file; choose a folder path")
    target, run = out_dir.resolve(), run_dir.resolve()
    if target == run or target in run.parents:
        raise PlrError(f"out dir '{out_dir}' would hold or replace the run dir itself; choose another folder")
    inside = next((p for p in (target, *target.parents) if _is_run_dir(p)), None)
    if inside is not None:
        raise PlrError(f"out dir '{out_dir}' lies inside the run dir '{inside}', whose artifacts an export must never "
                       "replace; choose a folder outside any run dir")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise PlrError(f"out dir '{out_dir}' is not empty; choose a new folder or pass --force to replace it")
        held = next((p.parent for p in target.rglob("results.json")), None) or next(
            (p.parent.parent for p in target.rglob(str(HYDRA_CONFIG))), None)
        if held is not None:
            raise PlrError(f"out dir '{out_dir}' holds the run dir '{held}'; --force would delete it, so choose another "
                           "folder")


def load_config(run_dir: Path) -> DictConfig:
    """The run's `.hydra/config.yaml`, unresolved (its `${now:...}` keys are never read)."""
    path = run_dir / HYDRA_CONFIG
    try:
        cfg = OmegaConf.load(path)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise PlrError(f"cannot read {path} ({str(e).splitlines()[0]}); restore it from the run") from None
    if not isinstance(cfg, DictConfig) or "model" not in cfg or "adapter" not in cfg:
        raise PlrError(f"{path} is not a plr config (no model/adapter); pass the run dir `plr train` printed")
    return cfg


def rebuild(cfg: DictConfig, run_dir: Path) -> Setup:
    """The run's trained model, exactly as the evaluate stage builds it."""
    set_seed(int(cfg.seed))
    s = setup_run(cfg, run_dir)
    load_trained(s, A.stage_dir(run_dir, A.RETRAIN))
    s.built.model.eval()
    return s


def find_targets(net: nn.Module) -> list[Target]:
    """Every LoRA-wrapped Linear of the run's backbone, with its branches by layer id."""
    return [Target(name, mod.out_features, mod.in_features,
                   {layer_id(name, key): br for key, br in mod.branches.items()})
            for name, mod in net.named_modules() if isinstance(mod, LoRALinear)]


def check_plr_adapter(s: Setup, cfg: DictConfig, targets: Sequence[Target]) -> None:
    """Only plr's own LoRA layers are converted (PEFT-backed baselines have none)."""
    if getattr(s, "peft", None) is not None or not targets:
        method = cfg.adapter.get("method", cfg.adapter.get("name"))
        raise PlrError(f"the run's adapter '{method}' is not plr's LoRA (a PEFT-backed baseline?), so there is "
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


def peft_config(cfg: DictConfig, spec: ModelSpec, targets: Sequence[Target], modules_to_save: Sequence[str]) -> Any:
    """PEFT's LoraConfig: exact module names, rank/alpha patterns for fused modules."""
    from peft import LoraConfig

    r, alpha = targets[0].r, targets[0].alpha
    fused = [t for t in targets if len(t.branches) > 1]
    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=float(cfg.adapter.dropout), bias="none",
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
            raise PlrError(f"PEFT cannot add LoRA to this base model ({str(e).splitlines()[0]}); this run "
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


def layer_table(run_dir: Path, cfg: DictConfig, targets: Sequence[Target]) -> dict[str, Any]:
    """plr_layers.json: per layer id, where PEFT holds it and what it keeps (from extract/allocate)."""
    masks = _read_optional(A.stage_dir(run_dir, A.EXTRACT) / A.MASKS_JSON)
    alloc = _read_optional(A.stage_dir(run_dir, A.ALLOCATE) / A.ALLOCATION)
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
    return {"method": str(cfg.adapter.get("method", cfg.adapter.get("name"))), "r": targets[0].r,
            "alpha": targets[0].alpha, "sparsity": C.plain(cfg.adapter.get("sparsity", 0.0)),
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


def _read_optional(path: Path) -> Any:
    return A.read_json(path) if path.exists() else None


# ---------------------------------------------------------------------------------------- merged


def save_merged(peft_model: Any, s: Setup, spec: ModelSpec, dest: Path) -> list[str]:
    """Merge the adapter into the base and save it with its tokenizer/processor; returns notes."""
    net = peft_model.merge_and_unload()
    notes: list[str] = []
    if spec.family == "timm":
        from timm.models import save_for_hf

        args = {k: v for k, v in C.plain(spec.config).items() if k != "architecture"}
        save_for_hf(net, str(dest), model_args=args, safe_serialization=True)
        notes.append("merged/ is a timm checkpoint (config.json + model.safetensors, with its preprocessing config)")
        return notes
    labels = s.data.label_names
    if labels and not s.data.regression and spec.family != "hf-causal":  # an LM's outputs are its vocabulary
        net.config.id2label = dict(enumerate(labels))
        net.config.label2id = {name: i for i, name in enumerate(labels)}
    net.save_pretrained(str(dest))
    if s.built.tokenizer is not None:
        s.built.tokenizer.save_pretrained(str(dest))
    elif spec.family == "hf-vision" and spec.pretrained:
        _image_processor(spec).save_pretrained(str(dest))
    elif spec.family == "hf-vision":
        notes.append("merged/ has no image processor: a random-init model has none (see Inputs for preprocessing)")
    return notes


def _image_processor(spec: ModelSpec) -> Any:
    from transformers import AutoImageProcessor

    from partial_lora.hub import load_from_hub

    path, local = resolve_source(spec.source)
    if local:
        return AutoImageProcessor.from_pretrained(path)
    return load_from_hub(
        lambda lfo: AutoImageProcessor.from_pretrained(path, revision=spec.revision, local_files_only=lfo),
        path, what="model", key="model.source")


# ------------------------------------------------------------------------------------ model card


@dataclass
class ExportInfo:
    """Everything an export writes besides PEFT's files, and what its model card shows."""

    out_dir: Path
    run_dir: Path
    cfg: DictConfig
    spec: ModelSpec
    s: Setup
    base: str
    targets: list[Target]
    layers: dict[str, Any]
    params: dict[str, int]
    stored: int
    extra_saved: list[str]
    merged: bool
    notes: list[str]


def model_card(c: ExportInfo) -> str:
    """README.md: base, method, keep ratios, parameters, metrics, provenance and how to load."""
    sparse = is_sparse(c.cfg)
    method = "Partial-LoRA" if sparse else "LoRA"
    front = {"library_name": "peft", "tags": ["peft", "lora", "partial-lora", "plr"]}
    if c.spec.pretrained and not Path(c.base).exists() and (c.spec.family != "timm" or "/" in c.base):
        front["base_model"] = c.base  # a hub id (a timm model name is not one)
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {method} adapter: {c.cfg.model.name} on {c.cfg.task.name} (seed {c.cfg.seed})", "",
             f"A {method} adapter exported by `plr export` from the run `{c.run_dir}`, saved in PEFT's LoRA format.",
             "", "## Base model", "", *_base_lines(c), "", "## Method", "", *_method_lines(c, method), "",
             "## Trainable parameters", "", *_param_lines(c), ""]
    if sparse:
        lines += ["## Keep ratio per layer", "", *_ratio_table(c.layers["layers"]), ""]
    lines += ["## Metrics", "", *_metric_lines(c.run_dir), "", "## Inputs", "", *_input_lines(c), "",
              "## Provenance", "", *_provenance_lines(c.run_dir), "", "## How to load", "", "```python",
              *_load_snippet(c), "```", "", *_file_lines(c)]
    if c.notes:
        lines += ["", "## Notes", "", *(f"- {n}" for n in c.notes)]
    return "\n".join(lines) + "\n"


def _base_lines(c: ExportInfo) -> list[str]:
    spec = c.spec
    if not spec.pretrained:
        return [f"`{spec.name}` ({spec.family}) is a **random-init** model config (`pretrained: false`): it has no "
                "downloadable weights. Rebuild the base with plr from `plr_config.yaml`, seeded with the run's seed "
                f"({c.cfg.seed}), as in *How to load*; the export checked that this reproduces the run's base weights "
                f"exactly. `base_model_name_or_path` is the config name `{c.base}`."]
    return [f"`{c.base}` ({spec.family}; plr model config `{spec.name}`"
            f"{f', revision {spec.revision}' if spec.revision else ''}) with a new {c.s.data.num_labels}-way head."]


def _method_lines(c: ExportInfo, method: str) -> list[str]:
    t0 = c.targets[0]
    fused = [t for t in c.targets if len(t.branches) > 1]
    lines = [f"- {method}, r = {t0.r}, alpha = {t0.alpha:g} (scale alpha / r = {t0.alpha / t0.r:g}), "
             f"dropout {float(c.cfg.adapter.dropout):g}",
             f"- targets ({len(c.targets)} modules): `{C.plain(c.cfg.adapter.targets)}` → "
             + ", ".join(f"`{t.module}`" for t in c.targets[:4]) + (", ..." if len(c.targets) > 4 else ""),
             f"- trained head (PEFT `modules_to_save`): {', '.join(f'`{m}`' for m in c.spec.head_modules)}"]
    if c.extra_saved:
        lines.append("- also saved in full, because the base checkpoint does not contain them (its loader "
                     f"initialises them at random): {', '.join(f'`{m}`' for m in c.extra_saved)}")
    if is_sparse(c.cfg):
        info = c.layers
        lines.append(f"- sparsity `{info['sparsity']}`, allocator `{info['allocator']}`, rows/columns chosen by "
                     f"`{info['mask_method']}` ({info['granularity']}); ΔW = s·diag(u_row)·B·A·diag(u_col)")
        lines.append("- PEFT stores the factors zero-padded to full size (B[R] = B_R, A[:, C] = A_C), so "
                     "PEFT's ΔW = (alpha / r)·B·A is exactly plr's; the kept indices are in `plr_masks.safetensors`")
    if fused:
        lines.append(f"- fused projections ({len(fused)}, e.g. `{fused[0].module}` with slices "
                     f"{', '.join(lid.rsplit('.', 1)[1] for lid in fused[0].branches)}) are one PEFT LoRA of rank "
                     f"{fused[0].rank} each: A stacks the slices' A, B is block-diagonal at each slice's output rows; "
                     "`rank_pattern`/`alpha_pattern` keep the scale at alpha / r")
    return lines


def _param_lines(c: ExportInfo) -> list[str]:
    p = c.params
    reduction = 100.0 * (1 - p["adapter"] / p["dense_lora"]) if p["dense_lora"] else 0.0
    rows = [("adapter (trained LoRA entries)", p["adapter"]), ("head", p["head"])]
    if p.get("extra"):
        rows.append(("other saved modules", p["extra"]))
    rows += [(f"dense LoRA at r={c.targets[0].r} on the same layers", p["dense_lora"]),
             ("values stored in adapter_model.safetensors (zero-padded LoRA factors)", c.stored)]
    return ["| | parameters |", "|---|---:|", *(f"| {name} | {n:,} |" for name, n in rows),
            "", f"Reduction against dense LoRA at the same rank: {reduction:.1f}%."]


def _ratio_table(layers: Mapping[str, Any]) -> list[str]:
    out = ["| layer | keep ratio | rows kept | cols kept | parameters |", "|---|---:|---:|---:|---:|"]
    for lid, la in layers.items():
        out.append(f"| `{lid}` | {la['ratio']:g} | {la['rows']}/{la['d_out']} | {la['cols']}/{la['d_in']} | "
                   f"{la['params']:,} |")
    return out


def _metric_lines(run_dir: Path) -> list[str]:
    results = _read_optional(run_dir / A.RESULTS) or {}
    metrics = results.get("metrics") or {}
    if not metrics:
        return [f"No evaluation in the run (no {A.RESULTS} with metrics); finish its evaluate stage with `plr train`."]
    names: list[str] = []
    for key in metrics:
        name = key.split("_", 1)[1]
        if name not in names:
            names.append(name)
    out = ["| metric | val | test |", "|---|---:|---:|"]
    for name in names:
        if not name.endswith("examples"):
            out.append(f"| {name} | {_fmt(metrics.get(f'val_{name}'))} | {_fmt(metrics.get(f'test_{name}'))} |")
    if metrics.get("test_examples") is not None:
        out += ["", f"Test set: {metrics['test_examples']:,} examples."]
    return out


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    return f"{x:,}" if isinstance(x, int) else f"{x:.4f}"


def _input_lines(c: ExportInfo) -> list[str]:
    labels = c.s.data.label_names
    lines = [f"- labels ({c.s.data.num_labels}): " + (", ".join(f"{i} = {n}" for i, n in enumerate(labels))
                                                        if labels and not c.s.data.regression else "regression")]
    if c.s.built.tokenizer is not None:
        lines.append(f"- text: tokenizer `{c.spec.tokenizer or c.base}`, truncation at {c.s.built.max_length} tokens")
    if c.s.built.image is not None:
        im = c.s.built.image
        lines.append(f"- images: {im.size}×{im.size}, mean {list(im.mean)}, std {list(im.std)}, "
                     f"{im.interpolation} resize to size / {im.crop_pct:g} then center crop")
    return lines


def _provenance_lines(run_dir: Path) -> list[str]:
    overrides = run_dir / HYDRA_OVERRIDES
    if overrides.is_file():
        args = yaml.safe_load(overrides.read_text()) or []
        command = "`" + " ".join(["plr", "train", *(shlex.quote(str(a)) for a in args)]) + "`"
    else:
        command = f"not recorded (no {HYDRA_OVERRIDES} in the run dir)"
    git = _read_optional(run_dir / A.GIT) or {}
    sha = git.get("sha") or "unknown"
    dirty = " (with uncommitted changes)" if git.get("dirty") else ""
    return [f"- command: {command}", f"- plr git commit: `{sha}`{dirty}", f"- run dir: `{run_dir}`",
            f"- the run's config: `{CONFIG}`"]


def _load_snippet(c: ExportInfo) -> list[str]:
    n, out = c.s.data.num_labels, str(c.out_dir)
    family = c.spec.family
    if not c.spec.pretrained:
        return ["from omegaconf import OmegaConf",
                "from peft import PeftModel",
                "from partial_lora import config as C",
                "from partial_lora.models import build_model",
                "from partial_lora.train import set_seed",
                "",
                f'cfg = OmegaConf.load("{out}/{CONFIG}")',
                "set_seed(int(cfg.seed))  # the random-init base depends on the seed",
                f"base = build_model(C.model_spec(cfg), num_labels={n}).model.net",
                f'model = PeftModel.from_pretrained(base, "{out}").eval()']
    if family == "timm":
        args = {k: v for k, v in C.plain(c.spec.config).items() if k != "architecture"}
        extra = "".join(f", {k}={v!r}" for k, v in args.items())
        weights = ""
        if Path(c.base).exists():
            weights = f', pretrained_cfg_overlay={{"file": "{c.base}/model.safetensors"}}'
            name = f'"{_timm_arch(c.base)}"'
        else:
            name = f'"{c.base}"'
        return ["import timm", "from peft import PeftModel", "",
                f"base = timm.create_model({name}, pretrained=True, num_classes={n}{weights}{extra})",
                f'model = PeftModel.from_pretrained(base, "{out}").eval()']
    auto = _auto_class(family)
    rev = f', revision="{c.spec.revision}"' if c.spec.revision else ""
    return [f"from transformers import {auto}", "from peft import PeftModel", "",
            f'base = {auto}.from_pretrained("{c.base}", num_labels={n}{rev})',
            f'model = PeftModel.from_pretrained(base, "{out}").eval()']


def _timm_arch(path: str) -> str:
    try:
        return str(json.loads((Path(path) / "config.json").read_text())["architecture"])
    except (OSError, ValueError, KeyError):
        return "<architecture from config.json>"


def _file_lines(c: ExportInfo) -> list[str]:
    lines = ["## Files", "", f"- `{PEFT_CONFIG}`, `{PEFT_WEIGHTS}`: the PEFT LoRA adapter (and the head)"]
    if is_sparse(c.cfg):
        lines.append(f"- `{MASKS}`: kept row/column indices per plr layer id (`<layer>.rows`, `<layer>.cols`)")
    lines += [f"- `{LAYERS}`: per layer: PEFT module, slice, keep ratio, shapes, kept rows/cols, parameters",
              f"- `{CONFIG}`: the run's plr config"]
    if c.merged:
        merged = c.out_dir / MERGED
        how = (f'`timm.create_model("local-dir:{merged}", pretrained=True)`' if c.spec.family == "timm" else
               f'`{_auto_class(c.spec.family)}.from_pretrained("{merged}")`')
        lines.append(f"- `{MERGED}/`: the base with the adapter merged in (`merge_and_unload`), loadable without "
                     f"PEFT: {how}")
    return lines


def _auto_class(family: str) -> str:
    return {"hf-text": "AutoModelForSequenceClassification", "hf-causal": "AutoModelForCausalLM"}.get(
        family, "AutoModelForImageClassification")


# ----------------------------------------------------------------------------------------- export


def export_run(run_dir: Path, out_dir: Path, *, merged: bool = False, force: bool = False,
               echo: Callable[[str], None] = print) -> Exported:
    """Write a finished run's adapter in PEFT's format (see the module docstring) into `out_dir`.

    Args:
        run_dir: a `plr train` run dir whose retrain stage is done.
        out_dir: the export folder; must be absent or empty unless `force`.
        merged: also write `out_dir/merged/`, the base with the adapter merged in.
        force: replace a non-empty `out_dir`.
        echo: progress lines.

    Raises:
        PlrError: an unfinished run, an occupied out dir, or a base that cannot be rebuilt.
    """
    check_run(run_dir)
    check_out_dir(out_dir, run_dir, force)
    cfg = load_config(run_dir)
    spec = C.model_spec(cfg)
    echo(f"[plr] export: rebuilding the trained model of {run_dir}")
    s = rebuild(cfg, run_dir)
    run_net = s.built.model.net
    targets = find_targets(run_net)
    check_plr_adapter(s, cfg, targets)
    # A pretrained base is built with another seed, so weights its loader draws at random show up.
    base = fresh_base(spec, s.data.num_labels, int(cfg.seed) + (1 if spec.pretrained else 0))
    extra = unreproduced(base, run_net, spec.head_modules)
    check_extra(extra, spec, int(cfg.seed), targets)
    saved = [*spec.head_modules, *extra]
    reference = base_reference(spec)
    peft_model = make_peft_model(base, peft_config(cfg, spec, targets, saved), reference)
    copy_weights(peft_model, run_net, targets, saved)
    check_deltas(peft_model, targets)
    counts = count_adapter_parameters(run_net)
    params = {"adapter": counts["adapter"], "dense_lora": counts["dense_lora"],
              "head": sum(p.numel() for p in s.built.model.head_parameters()),
              "extra": sum(p.numel() for m in extra for p in run_net.get_submodule(m).parameters())}
    stored = sum(t.rank * (t.out_features + t.in_features) for t in targets)
    notes = [f"saved in full as the base checkpoint lacks them: {', '.join(extra)}"] if extra else []
    info = ExportInfo(out_dir.resolve(), run_dir.resolve(), cfg, spec, s, reference, targets, layer_table(run_dir, cfg, targets),
                    params, stored, extra, merged, notes)
    files = _write(out_dir, force, lambda tmp: _fill(tmp, info, peft_model))
    return Exported(out_dir, files, [t.module for t in targets], targets[0].r, targets[0].alpha, params, stored,
                    reference, notes)


def _fill(tmp: Path, c: ExportInfo, peft_model: Any) -> list[str]:
    """Write every file of the export into `tmp` (the card names the final folder); returns the top-level names."""
    peft_model.save_pretrained(str(tmp), save_embedding_layers=False)  # PEFT's own format and names
    if is_sparse(c.cfg):
        A.save_tensors(tmp / MASKS, mask_tensors(c.targets), {"model": c.spec.name, "format": "plr-masks"})
    A.write_json(tmp / LAYERS, c.layers)
    A.write_text(tmp / CONFIG, (c.run_dir / HYDRA_CONFIG).read_text())
    if c.merged:
        c.notes.extend(save_merged(peft_model, c.s, c.spec, tmp / MERGED))
    A.write_text(tmp / CARD, model_card(c))  # last: PEFT's save_pretrained writes a stub README.md
    return sorted(p.name + ("/" if p.is_dir() else "") for p in tmp.iterdir() if not p.name.startswith("."))


def _write(out_dir: Path, force: bool, fill: Callable[[Path], list[str]]) -> list[str]:
    """Run `fill` on a temporary folder next to `out_dir`, then rename it into place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        files = fill(tmp)
        _shareable(tmp)
        _publish(tmp, out_dir, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return files


def _shareable(root: Path) -> None:
    """Usual permissions (umask) for the export: temporary files and folders are created owner-only."""
    for path in [root, *root.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~A.UMASK)


def _publish(tmp: Path, out_dir: Path, force: bool) -> None:
    old = None
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise PlrError(f"out dir '{out_dir}' is not empty; choose a new folder or pass --force to replace it")
        old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".old"))
        os.replace(out_dir, old / "export")
    elif out_dir.is_dir():
        out_dir.rmdir()
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
