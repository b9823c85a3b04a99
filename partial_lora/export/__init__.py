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

The package, one concept per module (this module holds `export_run` and re-exports their names):

    layout    the names of the files an export reads and writes
    run       the run being exported: checks, its config, its trained model rebuilt
    convert   the PEFT conversion: targets, the base, PEFT's LoRA model, weights, self-check, side tables
    card      the model card (README.md)
    merged    the merged model (`--merged`)
    publish   the export folder: safe out dirs, built in a temporary folder and renamed into place
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from partial_lora import artifacts
from partial_lora.adapter.inject import count_adapter_parameters
from partial_lora.adapter.masks import lora_parameters
from partial_lora.export.card import ExportInfo, model_card
from partial_lora.export.convert import (
    ADAPTER,
    DELTA_ATOL,
    Target,
    base_reference,
    check_deltas,
    check_extra,
    check_plr_adapter,
    copy_weights,
    find_targets,
    fresh_base,
    layer_table,
    make_peft_model,
    mask_tensors,
    peft_config,
    plain_state,
    unreproduced,
)
from partial_lora.export.layout import (
    CARD,
    CONFIG,
    HYDRA_CONFIG,
    HYDRA_OVERRIDES,
    LAYERS,
    MASKS,
    MERGED,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
)
from partial_lora.export.merged import save_merged
from partial_lora.export.publish import check_out_dir, write_folder
from partial_lora.export.run import check_run, load_config, load_spec, rebuild

__all__ = [
    "ADAPTER", "CARD", "CONFIG", "DELTA_ATOL", "HYDRA_CONFIG", "HYDRA_OVERRIDES", "LAYERS", "MASKS", "MERGED",
    "PEFT_CONFIG", "PEFT_WEIGHTS", "ExportInfo", "Exported", "Target", "base_reference", "check_deltas",
    "check_extra", "check_out_dir", "check_plr_adapter", "check_run", "copy_weights", "export_run", "find_targets",
    "fresh_base", "layer_table", "load_config", "load_spec", "make_peft_model", "mask_tensors", "model_card",
    "peft_config",
    "plain_state", "rebuild", "save_merged", "unreproduced",
]


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
    run = load_spec(run_dir)
    echo(f"[plr] export: rebuilding the trained model of {run_dir}")
    s = rebuild(run, run_dir)
    spec = run.model
    run_net = s.built.model.net
    targets = find_targets(run_net)
    check_plr_adapter(s, run, targets)
    # A pretrained base is built with another seed, so weights its loader draws at random show up.
    base = fresh_base(spec, s.data.num_labels, run.seed + (1 if spec.pretrained else 0))
    extra = unreproduced(base, run_net, spec.head_modules)
    check_extra(extra, spec, run.seed, targets)
    saved = [*spec.head_modules, *extra]
    reference = base_reference(spec)
    peft_model = make_peft_model(base, peft_config(run, targets, saved), reference)
    copy_weights(peft_model, run_net, targets, saved)
    check_deltas(peft_model, targets)
    counts = count_adapter_parameters(run_net)
    params = {"adapter": counts["adapter"], "dense_lora": counts["dense_lora"],
              "head": sum(p.numel() for p in s.built.model.head_parameters()),
              "extra": sum(p.numel() for m in extra for p in run_net.get_submodule(m).parameters())}
    stored = sum(lora_parameters(t.rank, t.out_features, t.in_features) for t in targets)
    notes = [f"saved in full as the base checkpoint lacks them: {', '.join(extra)}"] if extra else []
    info = ExportInfo(out_dir.resolve(), run_dir.resolve(), run, spec, s, reference, targets,
                      layer_table(run_dir, run, targets),
                    params, stored, extra, merged, notes)
    files = write_folder(out_dir, force, lambda tmp: _fill(tmp, info, peft_model))
    return Exported(out_dir, files, [t.module for t in targets], targets[0].r, targets[0].alpha, params, stored,
                    reference, notes)


def _fill(tmp: Path, c: ExportInfo, peft_model: Any) -> list[str]:
    """Write every file of the export into `tmp` (the card names the final folder); returns the top-level names."""
    peft_model.save_pretrained(str(tmp), save_embedding_layers=False)  # PEFT's own format and names
    if c.s.sparse:
        artifacts.save_tensors(tmp / MASKS, mask_tensors(c.targets), {"model": c.spec.name, "format": "plr-masks"})
    artifacts.write_json(tmp / LAYERS, c.layers)
    artifacts.write_text(tmp / CONFIG, (c.run_dir / HYDRA_CONFIG).read_text())
    if c.merged:
        c.notes.extend(save_merged(peft_model, c.s, c.spec, tmp / MERGED))
    artifacts.write_text(tmp / CARD, model_card(c))  # last: PEFT's save_pretrained writes a stub README.md
    return sorted(p.name + ("/" if p.is_dir() else "") for p in tmp.iterdir() if not p.name.startswith("."))
