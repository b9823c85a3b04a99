"""The export's model card (README.md): base, method, parameters, metrics, provenance and how to load."""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from partial_lora import artifacts, config
from partial_lora.export.convert import Target
from partial_lora.export.layout import (
    CONFIG,
    HYDRA_OVERRIDES,
    LAYERS,
    MASKS,
    MERGED,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    read_optional,
)
from partial_lora.models.backbones import ModelSpec
from partial_lora.spec import RunSpec
from partial_lora.working_set.build import Setup


@dataclass
class ExportInfo:
    """Everything an export writes besides PEFT's files, and what its model card shows."""

    out_dir: Path
    run_dir: Path
    run: RunSpec
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
    sparse = c.s.sparse
    method = "Partial-LoRA" if sparse else "LoRA"
    front = {"library_name": "peft", "tags": ["peft", "lora", "partial-lora", "plr"]}
    if c.spec.pretrained and not Path(c.base).exists() and (c.spec.family != "timm" or "/" in c.base):
        front["base_model"] = c.base  # a hub id (a timm model name is not one)
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {method} adapter: {c.run.model.name} on {c.run.task} (seed {c.run.seed})", "",
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
                f"({c.run.seed}), as in *How to load*; the export checked that this reproduces the run's base weights "
                f"exactly. `base_model_name_or_path` is the config name `{c.base}`."]
    return [f"`{c.base}` ({spec.family}; plr model config `{spec.name}`"
            f"{f', revision {spec.revision}' if spec.revision else ''}) with a new {c.s.data.num_labels}-way head."]


def _method_lines(c: ExportInfo, method: str) -> list[str]:
    t0 = c.targets[0]
    fused = [t for t in c.targets if len(t.branches) > 1]
    lines = [f"- {method}, r = {t0.r}, alpha = {t0.alpha:g} (scale alpha / r = {t0.alpha / t0.r:g}), "
             f"dropout {c.run.lora.dropout:g}",
             f"- targets ({len(c.targets)} modules): `{c.run.lora.target_set or list(c.run.lora.targets)}` → "
             + ", ".join(f"`{t.module}`" for t in c.targets[:4]) + (", ..." if len(c.targets) > 4 else ""),
             f"- trained head (PEFT `modules_to_save`): {', '.join(f'`{m}`' for m in c.spec.head_modules)}"]
    if c.extra_saved:
        lines.append("- also saved in full, because the base checkpoint does not contain them (its loader "
                     f"initialises them at random): {', '.join(f'`{m}`' for m in c.extra_saved)}")
    if c.s.sparse:
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
    results = read_optional(run_dir / artifacts.RESULTS) or {}
    metrics = results.get("metrics") or {}
    if not metrics:
        return [f"No evaluation in the run (no {artifacts.RESULTS} with metrics); finish its evaluate stage with `plr "
                "train`."]
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
    git = read_optional(run_dir / artifacts.GIT) or {}
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
                "from partial_lora import config",
                "from partial_lora.models.backbones import build_model",
                "from partial_lora.training.runtime import set_seed",
                "",
                f'cfg = OmegaConf.load("{out}/{CONFIG}")',
                "set_seed(int(cfg.seed))  # the random-init base depends on the seed",
                f"base = build_model(config.model_spec(cfg), num_labels={n}).model.net",
                f'model = PeftModel.from_pretrained(base, "{out}").eval()']
    if family == "timm":
        args = {k: v for k, v in config.plain(c.spec.config).items() if k != "architecture"}
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
    if c.s.sparse:
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
