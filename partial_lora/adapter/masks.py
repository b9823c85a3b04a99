"""Which rows and columns a sparse adapter keeps (the `extract` stage's core).

Every mask maker ranks a layer's rows (outputs) and columns (inputs) once; the kept set at keep
ratio ρ is the top `count(ρ, d)` of that ranking. Masks at different ratios are therefore nested,
which lets the allocator try a whole grid of ratios without re-ranking.

- `subspace` (default, the paper's "top singular subspaces of W0"): SVD W0 = U Σ Vᵀ, k = the
  number of top singular values holding `energy` of Σσ² [ours, default 0.9]; row i scores
  ‖U[i,:k]·Σ[:k]‖², column j scores ‖V[j,:k]·Σ[:k]‖².
- `random`: a seeded random permutation (the paper's control: random rows/columns at the
  right per-layer ratio work about as well).
- `probe_magnitude` [ours]: rows/columns with the largest norms of the probe's ΔW = s·B·A.
- `snip` (TASO-style, reconstructed [ours]): rows/columns with the largest summed SNIP importance
  of W0 on the task loss, Σ_j S[i, j] and Σ_i S[i, j] with S = Σ_batches |W0 ⊙ ∂L/∂W0|
  (`partial_lora.adapter.snip`; the extract stage measures S).

With `adapter.mask.shared_input` [ours], the layers that read one input tensor (an *input group*,
e.g. query and value of one attention block; `partial_lora.adapter.input_groups`) share one column
ranking (`rank_group`): each keeps the top `count(ρ, d_in)` of it, so their column sets nest and
the forward gathers the input once for all of them. Rows stay ranked per layer.

A row/column mask has one form, `KeptBlock`: the kept rows R and columns C of a d_out × d_in
layer as sorted indices. The LoRA layer holds it as its index buffers (`LoRABranch.kept`), the
allocation search multiplies the dense probe's factors by its 0/1 `multipliers`, export writes
PEFT's factors zero-padded from it (`pad`), and the retrain rewinds to the probe's initial factors
restricted to it (`select`). `build_masks` makes every layer's at its allocated ratio (extract).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from partial_lora.adapter.snip import col_scores, row_scores
from partial_lora.errors import PlrError

Keep = dict[str, tuple[Tensor, Tensor]]  # by layer id: two tensors (kept rows and columns, or element masks)


def lora_parameters(r: int, rows: int, cols: int) -> int:
    """The entries of LoRA's factors at rank r on a kept block of `rows` × `cols`: B (rows × r) and A
    (r × cols), r·(rows + cols). Dense LoRA keeps every row and column: r·(d_out + d_in). The one
    place this count is written."""
    return r * (rows + cols)


def count(ratio: float, d: int) -> int:
    """Kept rows (or columns) of a d-sized side at keep ratio ρ: round(ρ·d), at least 1 [ours]."""
    return max(1, min(d, int(round(ratio * d))))


SIDES = ("both", "rows", "cols")


def kept(ratio: float, d_out: int, d_in: int, sides: str = "both") -> tuple[int, int]:
    """(rows, cols) kept at keep ratio ρ: ρ on both sides [ours, the default], or on one side only
    (`rows`: mask only B's rows, every column of A kept; `cols`: the reverse)."""
    if sides not in SIDES:
        raise PlrError(f"adapter.mask.sides must be one of {', '.join(SIDES)}, got '{sides}'")
    rows = count(ratio, d_out) if sides in ("both", "rows") else d_out
    cols = count(ratio, d_in) if sides in ("both", "cols") else d_in
    return rows, cols


@dataclass(frozen=True)
class KeptBlock:
    """The kept block R × C of one d_out × d_in layer: its kept rows and columns, sorted indices."""

    rows: Tensor
    cols: Tensor
    d_out: int
    d_in: int

    def multipliers(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The 0/1 multipliers u_row (d_out × 1) and u_col (1 × d_in) that mask dense factors: B·u_row, A·u_col."""
        rm = torch.zeros(self.d_out, 1, device=device)
        rm[self.rows.to(device)] = 1
        cm = torch.zeros(1, self.d_in, device=device)
        cm[:, self.cols.to(device)] = 1
        return rm, cm

    def select(self, b: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        """Dense factors (d_out × r, r × d_in) restricted to the block: B[R] and A[:, C]."""
        return b[self.rows.to(b.device)], a[:, self.cols.to(a.device)]

    def pad(self, b: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        """Compact factors (|R| × r, r × |C|) zero-padded to dense ones: B[R] = b, A[:, C] = a, zero elsewhere."""
        b_full = b.new_zeros(self.d_out, b.shape[1])
        a_full = a.new_zeros(a.shape[0], self.d_in)
        b_full[self.rows.to(b.device)] = b
        a_full[:, self.cols.to(a.device)] = a
        return b_full, a_full


@dataclass(frozen=True)
class Ranking:
    """Rows and columns of one layer, best first."""

    rows: Tensor  # permutation of range(d_out)
    cols: Tensor  # permutation of range(d_in)

    def keep(self, ratio: float, sides: str = "both") -> tuple[Tensor, Tensor]:
        """Sorted kept (rows, cols) at a keep ratio (on both sides, or one: see `kept`)."""
        n_rows, n_cols = kept(ratio, len(self.rows), len(self.cols), sides)
        return self.rows[:n_rows].sort().values, self.cols[:n_cols].sort().values


def subspace_k(s: Tensor, energy: float) -> int:
    """Number of top singular values holding `energy` of the spectrum's energy Σσ²."""
    e = s.double().pow(2)
    share = e.cumsum(0) / e.sum().clamp_min(1e-30)
    return int(torch.searchsorted(share, torch.tensor(energy, dtype=share.dtype) - 1e-12).item()) + 1


def _order(scores: Tensor) -> Tensor:
    # Stable descending sort: ties (e.g. all-zero scores) keep index order, so rankings are
    # deterministic across runs and machines.
    return torch.sort(scores.double(), descending=True, stable=True).indices


def rank_subspace(w0: Tensor, energy: float = 0.9) -> Ranking:
    """Rank rows/columns of W0 (d_out × d_in) by their weight in its top-k singular subspace.

    The SVD runs in float64 on W0's device (pass a GPU copy for LLM-sized layers: a 4096 × 11008
    float64 SVD takes seconds there and far longer on a CPU); the ranking comes back on the CPU.
    """
    u, s, vh = torch.linalg.svd(w0.detach().double(), full_matrices=False)
    k = subspace_k(s, energy)
    row_scores = (u[:, :k] * s[:k]).pow(2).sum(1)
    col_scores = (vh[:k].t() * s[:k]).pow(2).sum(1)
    return Ranking(_order(row_scores).cpu(), _order(col_scores).cpu())


def layer_seed(seed: int, layer: str) -> int:
    """A per-layer seed that does not depend on Python's hash randomisation."""
    return (seed * 1_000_003 + zlib.crc32(layer.encode())) % 2**63


def rank_random(d_out: int, d_in: int, seed: int, layer: str) -> Ranking:
    g = torch.Generator().manual_seed(layer_seed(seed, layer))
    return Ranking(torch.randperm(d_out, generator=g), torch.randperm(d_in, generator=g))


def rank_probe_magnitude(delta: Tensor) -> Ranking:
    """Rank by the row / column norms of the probe's update ΔW (d_out × d_in)."""
    d = delta.detach().double()
    return Ranking(_order(d.norm(dim=1)), _order(d.norm(dim=0)))


def rank_snip(scores: Tensor) -> Ranking:
    """Rank rows / columns by their summed SNIP importance (`snip.row_scores`, `snip.col_scores`)."""
    return Ranking(_order(row_scores(scores)).cpu(), _order(col_scores(scores)).cpu())


@dataclass(frozen=True)
class LayerInfo:
    """What a mask maker may look at for one adapted layer."""

    name: str
    w0: Tensor                   # the frozen weight slice this branch adapts (d_out × d_in)
    probe_delta: Tensor | None   # the probe's ΔW on that slice, if a probe ran
    snip: Tensor | None = None   # SNIP importance of that slice (d_out × d_in), when the method needs it


Masker = Callable[[LayerInfo, int, float], Ranking]

MASKERS: dict[str, Masker] = {
    "subspace": lambda info, seed, energy: rank_subspace(info.w0, energy),
    "random": lambda info, seed, energy: rank_random(info.w0.shape[0], info.w0.shape[1], seed, info.name),
    "probe_magnitude": lambda info, seed, energy: rank_probe_magnitude(_need_probe(info)),
    "snip": lambda info, seed, energy: rank_snip(_need_snip(info)),
}


@dataclass(frozen=True)
class MaskConfig:
    """`adapter.mask`: which rows/columns are kept.

    Attributes:
        method: `subspace`, `random`, `probe_magnitude` or `snip` (its batches: `adapter.snip`).
        granularity: `rowcol` (structured, compact) or `element` (random entries; ablation only).
        energy: share of W0's spectral energy defining the top-k subspace.
        seed: seed of random masks (None: the run's seed).
        sides: which factor sides the keep ratio masks [ours]: `both` (rows of B and columns of
            A, the paper's form), `rows` (rows of B only, every column of A kept) or `cols`.
        shared_input: layers that read the same input tensor keep nested column sets drawn from
            one ranking of their group, and the forward gathers that input once per group [ours]
            (`rank_group`, `input_groups.InputGroup`): less activation memory, at the cost of the
            members' column sets no longer being chosen independently.
    """

    method: str = "subspace"
    granularity: str = "rowcol"
    energy: float = 0.9
    seed: int | None = None
    sides: str = "both"
    shared_input: bool = False

    def __post_init__(self) -> None:
        if self.method not in MASKERS:
            raise PlrError(f"unknown adapter.mask.method '{self.method}'; use one of: {', '.join(MASKERS)}")
        if self.granularity not in ("rowcol", "element"):
            raise PlrError(f"adapter.mask.granularity must be rowcol or element, got '{self.granularity}'")
        if self.granularity == "element" and self.method != "random":
            raise PlrError("adapter.mask.granularity=element supports only adapter.mask.method=random")
        if not 0 < self.energy <= 1:
            raise PlrError(f"adapter.mask.energy must be in (0, 1], got {self.energy}")
        if self.sides not in SIDES:
            raise PlrError(f"adapter.mask.sides must be one of {', '.join(SIDES)}, got '{self.sides}'")
        if self.sides != "both" and self.granularity == "element":
            raise PlrError("adapter.mask.sides applies to row/column masks; drop it with granularity=element")
        if self.shared_input and self.granularity == "element":
            raise PlrError("adapter.mask.shared_input shares the kept columns of layers that read one input, and "
                           "element masks keep no columns; set adapter.mask.shared_input=false with "
                           "granularity=element")


def _need_probe(info: LayerInfo) -> Tensor:
    if info.probe_delta is None:
        raise PlrError("adapter.mask.method=probe_magnitude needs the probe stage; use adapter.sparsity=auto "
                       "or another mask method")
    return info.probe_delta


def _need_snip(info: LayerInfo) -> Tensor:
    if info.snip is None:  # the stages measure it whenever the method is snip
        raise PlrError(f"adapter.mask.method=snip has no SNIP importance for layer {info.name}; rerun the stage")
    return info.snip


def rank_layer(method: str, info: LayerInfo, seed: int = 0, energy: float = 0.9) -> Ranking:
    if method not in MASKERS:
        raise PlrError(f"unknown adapter.mask.method '{method}'; use one of: {', '.join(MASKERS)}")
    return MASKERS[method](info, seed, energy)


def rank_group(method: str, infos: Sequence[LayerInfo], seed: int = 0, energy: float = 0.9) -> Tensor:
    """One column ranking for the layers of an input group [ours, `adapter.mask.shared_input`].

    The mask method runs once on the members stacked along the output dimension: `subspace` on
    the SVD of their W0 slices concatenated (column scores as in `rank_subspace`), `random` on
    one permutation seeded by `layer_seed(seed, <the first member's name>)`, `probe_magnitude`
    on the stacked probe updates, `snip` on the stacked SNIP scores (a column's sum over every
    member's rows). Each member then keeps a prefix of this ranking, so the kept column sets of
    the group nest.

    Raises:
        PlrError: the members do not have the same input size (they cannot read one tensor).
    """
    if len({info.w0.shape[1] for info in infos}) != 1:
        raise PlrError(f"input group {[i.name for i in infos][:3]} mixes layers of different input sizes; "
                       "rerun extract (the masks come from another model?)")
    deltas = [info.probe_delta for info in infos]
    snips = [info.snip for info in infos]
    stacked = LayerInfo(infos[0].name, torch.cat([info.w0 for info in infos]),
                        None if any(d is None for d in deltas) else torch.cat(deltas),  # type: ignore[arg-type]
                        None if any(s is None for s in snips) else torch.cat(snips))  # type: ignore[arg-type]
    return rank_layer(method, stacked, seed, energy).cols


def element_masks(d_out: int, d_in: int, r: int, ratio: float, seed: int, layer: str) -> tuple[Tensor, Tensor]:
    """Random element masks of B (d_out × r) and A (r × d_in) keeping a `ratio` share of each [ours].

    Only for the "are there winning tickets at all" ablation: the same parameter count as a
    row/column mask at that ratio, but unstructured, so nothing is saved in compute.
    """
    g = torch.Generator().manual_seed(layer_seed(seed, layer) + 1)

    def mask(shape: tuple[int, int]) -> Tensor:
        n = shape[0] * shape[1]
        m = torch.zeros(n, dtype=torch.bool)
        m[torch.randperm(n, generator=g)[: max(1, int(round(ratio * n)))]] = True
        return m.view(shape)

    return mask((d_out, r)), mask((r, d_in))


def build_masks(shapes: Mapping[str, tuple[int, int, int]], ratios: Mapping[str, float],
                info: Callable[[str], LayerInfo], groups: Sequence[Sequence[str]], cfg: MaskConfig,
                seed: int) -> tuple[dict[str, Tensor], dict[str, dict[str, Any]]]:
    """Every layer's masks at its allocated ratio, as `masks.safetensors` and `masks.json` hold them
    (`artifacts.write_masks`): the tensors, and per layer its ratio, shape, kept rows and columns and
    parameters, in the order of `shapes` (layer id -> d_out, d_in, r).

    Row/column masks keep the top of each layer's ranking by `cfg.method` (`KeptBlock`); the members
    of an input group (`groups`, `adapter.mask.shared_input`) keep a prefix of their group's column
    ranking (`rank_group`), so their column sets nest, and rows ranked on their own. With
    `granularity=element` every row and column stays and random entries of B and A are kept instead
    (`element_masks`). `info(lid)` builds a layer's `LayerInfo` (its W0 ...): a group's members' are
    built once and let go with their group, every other layer's on its own.
    """
    tensors: dict[str, Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}

    def keep(lid: str, layer: LayerInfo, group_cols: Tensor | None) -> None:
        (d_out, d_in, r), rho = shapes[lid], ratios[lid]
        if cfg.granularity == "element":
            rows, cols = torch.arange(d_out), torch.arange(d_in)
            mask_b, mask_a = element_masks(d_out, d_in, r, rho, seed, lid)
            tensors[f"{lid}.mask_B"], tensors[f"{lid}.mask_A"] = mask_b.to(torch.uint8), mask_a.to(torch.uint8)
            params = int(mask_b.sum() + mask_a.sum())
        else:
            ranking = rank_layer(cfg.method, layer, seed, cfg.energy)
            if group_cols is not None:  # a prefix of the group's ranking: the group's column sets nest
                ranking = Ranking(ranking.rows, group_cols)
            rows, cols = ranking.keep(rho, cfg.sides)
            params = lora_parameters(r, len(rows), len(cols))
        tensors[f"{lid}.rows"], tensors[f"{lid}.cols"] = rows.long(), cols.long()
        layers[lid] = {"ratio": rho, "d_out": d_out, "d_in": d_in, "rows": len(rows), "cols": len(cols),
                       "params": params}

    grouped = {lid for group in groups for lid in group}
    for group in groups:
        infos = [info(lid) for lid in group]
        cols = rank_group(cfg.method, infos, seed, cfg.energy)
        for lid, layer in zip(group, infos, strict=True):
            keep(lid, layer, cols)
    for lid in shapes:
        if lid not in grouped:
            keep(lid, info(lid), None)
    return tensors, {lid: layers[lid] for lid in shapes}
