"""The adapter layer: LoRA on a kept block R × C of a frozen linear layer.

One code path serves dense LoRA and Partial-LoRA (ΔW = s·diag(u_row)·B·A·diag(u_col)):
the kept rows R and columns C are index buffers and the trainable tensors have the compact
shapes `B_R` (|R| × r) and `A_C` (r × |C|). The forward gathers the input at C and adds the
low-rank output at R, so parameters, optimizer state, activations kept for backward and FLOPs
all shrink with the kept fraction. Dense LoRA is the case R = all rows, C = all columns.

The adapter *wraps* the frozen `nn.Linear` (PEFT's `base_layer` pattern). A pointwise (1×1,
ungrouped) `nn.Conv2d` is a linear map over channels and gets the same branch (`LoRAConv`): its
kept rows are output channels and its kept columns input channels, and the masks come from the
SVD of its (out × in) weight. Depthwise and k×k convolutions are refused. A wrapped layer
holds one or more *branches*: one for an ordinary layer, or one per slice of a fused
projection (timm's `qkv` gets a `q` and a `v` branch). Every branch has a *layer id* that
keys its tensors in artifacts: the module name (`bert.encoder.layer.0.attention.self.query`),
plus the slice name for fused layers (`blocks.0.attn.qkv.q`).

Branches that read the same input tensor (q and v of one attention block) each save their own
gathered x_C for backward, where dense LoRA saves the one x they share. With
`adapter.mask.shared_input` [ours] such branches form an input group: their column sets nest (one
ranking for the group, `masks.rank_group`), the input is gathered once at the union U of them,
x_U is what backward keeps, and each branch multiplies it by its A scattered into U's positions
(r × |U|, zeros at the columns it does not keep). The update is the same; the saved input is
about ρ·d_in per group instead of ρ·d_in per branch. `input_groups` finds the groups and attaches
them; merge, `delta_weight` and export do not see them.

Injection into a model and the helpers that see every branch at once (merge, state dict,
counts) are in `partial_lora.adapter.inject`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from partial_lora import distributed
from partial_lora.adapter.masks import KeptBlock, lora_parameters
from partial_lora.errors import PlrError


class SharedInput(Protocol):
    """What a branch asks of its input group (`input_groups.InputGroup`): its rank-r code of x."""

    def code(self, branch: LoRABranch, x: Tensor) -> Tensor: ...


class LoRABranch(nn.Module):
    """Low-rank update `s·B_R·A_C` on the block (offset + R) × C of a frozen weight.

    Args:
        d_in: input features of the wrapped layer.
        d_out: output features of this branch (the slice size for fused layers).
        r: rank.
        alpha: scale numerator; the update is scaled by `alpha / r`.
        dropout: dropout on the branch input (as in LoRA/PEFT).
        rows: kept output indices in [0, d_out), sorted; None keeps all.
        cols: kept input indices in [0, d_in), sorted; None keeps all.
        offset: where this branch's slice starts in the wrapped layer's output.
    """

    def __init__(self, d_in: int, d_out: int, r: int, alpha: float, dropout: float = 0.0,
                 rows: Tensor | None = None, cols: Tensor | None = None, offset: int = 0) -> None:
        super().__init__()
        if r <= 0:
            raise PlrError(f"LoRA rank must be positive, got r={r}; set adapter.r to 1 or more")
        self.d_in, self.d_out, self.r, self.alpha, self.offset = d_in, d_out, r, float(alpha), offset
        rows = torch.arange(d_out) if rows is None else _check_index(rows, d_out, "rows")
        cols = torch.arange(d_in) if cols is None else _check_index(cols, d_in, "cols")
        # Index buffers travel with .to(device) but are not trainable; persistent=False keeps
        # them out of the module state dict (artifacts store masks separately).
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.register_buffer("out_index", rows + offset, persistent=False)
        self.lora_A = nn.Parameter(torch.empty(r, len(cols)))
        self.lora_B = nn.Parameter(torch.zeros(len(rows), r))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Optional element masks (the unstructured ablation only): multiplied into B and A.
        self.register_buffer("mask_A", None)
        self.register_buffer("mask_B", None)
        # Shared input gather (`InputGroup`, adapter.mask.shared_input only): the group's union of
        # kept columns U, and where this branch's columns sit in U (None: they are U).
        self.input_group: SharedInput | None = None
        self.register_buffer("group_cols", None, persistent=False)
        self.register_buffer("group_pos", None, persistent=False)
        self.reset_parameters()

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    @property
    def kept(self) -> KeptBlock:
        """The branch's kept block R × C (`masks.KeptBlock`), from its index buffers."""
        return KeptBlock(self.rows, self.cols, self.d_out, self.d_in)

    @property
    def all_rows(self) -> bool:
        return len(self.rows) == self.d_out

    @property
    def all_cols(self) -> bool:
        return len(self.cols) == self.d_in

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Kaiming-uniform A (as PEFT/Microsoft LoRA), zero B: the update starts at zero."""
        # kaiming_uniform_(a=sqrt(5)) on a (r, d_in) matrix draws from U(-1/sqrt(d_in), 1/sqrt(d_in)).
        # We use the full d_in (not |C|) so a sparse branch sees the same init scale as dense.
        bound = 1.0 / math.sqrt(self.d_in)
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound, generator=generator)
            self.lora_B.zero_()

    def set_element_masks(self, mask_B: Tensor, mask_A: Tensor) -> None:
        """Keep only the masked entries of B and A (shapes of the compact factors)."""
        if mask_B.shape != self.lora_B.shape or mask_A.shape != self.lora_A.shape:
            raise PlrError("element masks do not fit this layer's factors (masks from another model or rank?)")
        self.mask_B = mask_B.to(self.lora_B.device, torch.bool)
        self.mask_A = mask_A.to(self.lora_A.device, torch.bool)

    def factors(self) -> tuple[Tensor, Tensor]:
        """(B, A) as used in the forward: element masks applied when set.

        Outside a forward pass under FSDP the factors are shards: they are gathered whole.
        """
        b, a = distributed.full(self.lora_B), distributed.full(self.lora_A)
        b = b if self.mask_B is None else b * self.mask_B
        a = a if self.mask_A is None else a * self.mask_A
        return b, a

    def hidden(self, x: Tensor) -> Tensor:
        """The rank-r code of the input, (..., r): dropout, gather at the kept columns, A_C.

        Only the gathered input (..., |C|) is kept for backward, so activation memory shrinks
        with the kept column share. In an input group the gather is the group's, shared.
        """
        if self.input_group is not None:
            return self.input_group.code(self, x)
        x = self.dropout(x)
        if not self.all_cols:
            x = x.index_select(-1, self.cols)
        return x @ self.factors()[1].t().to(x.dtype)

    def out_weight(self, out_features: int) -> Tensor:
        """B placed at the kept output rows of the wrapped layer: (out_features × r), unscaled.

        Scattering the small factor (not the (..., |R|) output) keeps autograd from saving an
        activation-sized tensor; the extra FLOPs are tokens·r·(out_features − |R|), negligible.
        The scale s is applied by the caller in the add (`alpha=s`), which saves nothing for
        backward; scaling B here would save an s·B copy per layer.
        """
        b = self.factors()[0]
        if self.all_rows and self.d_out == out_features:
            return b
        return b.new_zeros(out_features, self.r).index_copy(0, self.out_index, b)

    def delta_weight(self) -> Tensor:
        """The dense update of this branch's slice, (d_out × d_in), zero outside R × C."""
        b, a = self.factors()
        delta = torch.zeros(self.d_out, self.d_in, dtype=a.dtype, device=a.device)
        delta[self.rows[:, None], self.cols[None, :]] = self.scale * (b @ a)
        return delta

    def num_parameters(self) -> int:
        if self.mask_A is not None:
            return int(self.mask_A.sum()) + int(self.mask_B.sum())
        return lora_parameters(self.r, len(self.rows), len(self.cols))

    def dense_num_parameters(self) -> int:
        """Parameters of a dense LoRA of the same rank on the same layer."""
        return lora_parameters(self.r, self.d_out, self.d_in)

    def extra_repr(self) -> str:
        shared = ", input shared" if self.input_group is not None else ""
        return (f"r={self.r}, rows={len(self.rows)}/{self.d_out}, cols={len(self.cols)}/{self.d_in}, "
                f"offset={self.offset}{shared}")


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus LoRA branches. `merge()`/`unmerge()` are explicit."""

    def __init__(self, base_layer: nn.Linear, branches: Mapping[str, LoRABranch]) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.branches = nn.ModuleDict(dict(branches))
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> Tensor:  # some model code reads `.weight` of its projections (dtype checks)
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        for branch in self.branches.values():
            y = torch.add(y, self.branch_update(branch, x).to(y.dtype), alpha=branch.scale)
        return y

    def branch_update(self, branch: LoRABranch, x: Tensor) -> Tensor:
        """One branch's update of the output, unscaled: `B_R·A_C·x_C` placed at the kept rows."""
        h = branch.hidden(x)
        return h @ branch.out_weight(self.out_features).t().to(h.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Add every branch's update into the base weight (forward then skips the branches)."""
        if self.merged:
            raise RuntimeError("LoRALinear.merge() called twice; call unmerge() first")
        self._add_delta(+1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the updates again (exact up to float rounding)."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge() called on an unmerged layer")
        self._add_delta(-1.0)
        self.merged = False

    def weight_matrix(self) -> Tensor:
        """The frozen weight as (out_features × in_features) (a view: writes reach the layer)."""
        return self.base_layer.weight

    def _add_delta(self, sign: float) -> None:
        w = self.weight_matrix()
        for b in self.branches.values():
            fb, fa = b.factors()
            block = (sign * b.scale) * (fb @ fa)
            w.index_put_((b.out_index[:, None], b.cols[None, :]), block.to(w.dtype), accumulate=True)


class LoRAConv(LoRALinear):
    """A frozen pointwise `nn.Conv2d` (1×1 kernel, groups=1, no padding) plus LoRA branches.

    Over channels the convolution is `y[:, o] = W[o, :] · x[:, :]` at every pixel, so a branch is
    the linear branch applied per pixel, as two 1×1 convolutions: the kept input channels C are
    gathered (only that (N, |C|, H, W) tensor is saved for backward), `A_C` maps them to the rank-r
    code (with the base layer's stride), and `B` placed at the kept output channels R maps the code
    back. Parameters, optimizer state, saved activations and FLOPs shrink as for `nn.Linear`.
    """

    @property
    def in_features(self) -> int:
        return self.base_layer.in_channels

    @property
    def out_features(self) -> int:
        return self.base_layer.out_channels

    def weight_matrix(self) -> Tensor:
        return self.base_layer.weight.view(self.out_features, self.in_features)

    def branch_update(self, branch: LoRABranch, x: Tensor) -> Tensor:
        xs = branch.dropout(x)
        if not branch.all_cols:
            xs = xs.index_select(1, branch.cols)
        a = branch.factors()[1].to(xs.dtype)
        h = F.conv2d(xs, a[:, :, None, None], stride=self.base_layer.stride)
        w = branch.out_weight(self.out_features).to(h.dtype)
        return F.conv2d(h, w[:, :, None, None])


def _check_index(idx: Tensor, size: int, what: str) -> Tensor:
    idx = torch.as_tensor(idx, dtype=torch.long).flatten()
    if idx.numel() == 0:
        raise PlrError(f"a LoRA branch must keep at least one of its {what}; raise the keep ratio")
    if idx.min() < 0 or idx.max() >= size or idx.unique().numel() != idx.numel():
        raise PlrError(f"kept {what} must be distinct indices in [0, {size}); the mask does not fit this layer "
                       "(masks from another model?)")
    return idx.sort().values

