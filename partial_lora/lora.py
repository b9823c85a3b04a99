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
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from partial_lora import distributed as D
from partial_lora.errors import PlrError

WHOLE = "lora"  # branch key of an unsliced layer; never appears in layer ids


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
        self.reset_parameters()

    @property
    def scale(self) -> float:
        return self.alpha / self.r

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
        b, a = D.full(self.lora_B), D.full(self.lora_A)
        b = b if self.mask_B is None else b * self.mask_B
        a = a if self.mask_A is None else a * self.mask_A
        return b, a

    def hidden(self, x: Tensor) -> Tensor:
        """The rank-r code of the input, (..., r): dropout, gather at the kept columns, A_C.

        Only the gathered input (..., |C|) is kept for backward, so activation memory shrinks
        with the kept column share.
        """
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
        return self.r * (len(self.rows) + len(self.cols))

    def dense_num_parameters(self) -> int:
        """Parameters of a dense LoRA of the same rank on the same layer."""
        return self.r * (self.d_out + self.d_in)

    def extra_repr(self) -> str:
        return f"r={self.r}, rows={len(self.rows)}/{self.d_out}, cols={len(self.cols)}/{self.d_in}, offset={self.offset}"


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


def dims(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of an adaptable layer: an `nn.Linear`, a pointwise `nn.Conv2d`, or their wrappers."""
    if isinstance(module, nn.Conv2d):
        return module.out_channels, module.in_channels
    return module.out_features, module.in_features


def _check_conv(name: str, conv: nn.Conv2d) -> None:
    """Only a pointwise convolution is a linear map over channels; refuse the others in one line."""
    if conv.groups != 1:
        kind = "depthwise" if conv.groups == conv.in_channels else f"grouped (groups={conv.groups})"
        raise PlrError(f"LoRA target '{name}' is a {kind} convolution; plr adapts only pointwise (1x1, groups=1) "
                       "convolutions and nn.Linear, so drop it from adapter.targets (or model.lora_targets)")
    if tuple(conv.kernel_size) != (1, 1):
        k = "x".join(map(str, conv.kernel_size))
        raise PlrError(f"LoRA target '{name}' is a {k} convolution; plr adapts only pointwise (1x1) convolutions "
                       "and nn.Linear, so drop it from adapter.targets (or model.lora_targets)")
    pad = conv.padding  # a tuple, or "valid"/"same" (no padding for a 1x1 kernel)
    if isinstance(pad, tuple) and any(pad):
        raise PlrError(f"LoRA target '{name}' is a 1x1 convolution with padding {conv.padding}; a padded 1x1 "
                       "convolution is not a per-pixel linear map, so drop it from adapter.targets")


def _check_index(idx: Tensor, size: int, what: str) -> Tensor:
    idx = torch.as_tensor(idx, dtype=torch.long).flatten()
    if idx.numel() == 0:
        raise PlrError(f"a LoRA branch must keep at least one of its {what}; raise the keep ratio")
    if idx.min() < 0 or idx.max() >= size or idx.unique().numel() != idx.numel():
        raise PlrError(f"kept {what} must be distinct indices in [0, {size}); the mask does not fit this layer "
                       "(masks from another model?)")
    return idx.sort().values


# --------------------------------------------------------------------------- injection


@dataclass(frozen=True)
class LoRAConfig:
    """Where and how to attach LoRA.

    Attributes:
        r / alpha / dropout: rank, scale numerator (scale = alpha / r), branch input dropout.
        targets: module patterns. `query` matches modules whose name ends in `.query`;
            `re:<regex>` full-matches the module name; `qkv:q` is the `q` slice of a fused
            projection whose slices are declared in `fused`.
        fused: fused module suffix -> slice names in output order, equal sizes
            (timm: `{"qkv": ["q", "k", "v"]}`).
        exclude: module names (or suffixes) never adapted, e.g. the classification head.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Sequence[str] = ("query", "value")
    fused: Mapping[str, Sequence[str]] = field(default_factory=dict)
    exclude: Sequence[str] = ()


def _suffix_match(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _under(name: str, module: str) -> bool:
    """Whether `module` (a dotted name or suffix) is `name` or contains it (`pooler` ∋ `pooler.dense`)."""
    return f".{module}." in f".{name}."


def _match(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.fullmatch(target[3:], name) is not None
    return _suffix_match(name, target.split(":", 1)[0])


def find_targets(model: nn.Module, cfg: LoRAConfig) -> dict[str, dict[str, tuple[int, int]]]:
    """Resolve the target patterns to `{module name: {branch key: (offset, d_out)}}`.

    Raises:
        PlrError: when nothing matches, or a fused slice is not declared.
    """
    found: dict[str, dict[str, tuple[int, int]]] = {}
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    for name, mod in linears:
        if any(_under(name, e) for e in cfg.exclude):
            continue
        for target in cfg.targets:
            if not _match(name, target):
                continue
            if isinstance(mod, nn.Conv2d):
                _check_conv(name, mod)
            d_out = dims(mod)[0]
            if ":" in target and not target.startswith("re:"):
                suffix, piece = target.split(":", 1)
                slices = list(cfg.fused.get(suffix, ()))
                if piece not in slices:
                    raise PlrError(f"target '{target}' names slice '{piece}' but model.fused declares "
                                   f"{suffix}: {slices or 'nothing'}; fix adapter targets or model.fused")
                if d_out % len(slices):
                    raise PlrError(f"fused module '{name}' has {d_out} outputs, not divisible into "
                                   f"{len(slices)} slices; fix model.fused")
                size = d_out // len(slices)
                found.setdefault(name, {})[piece] = (slices.index(piece) * size, size)
            else:
                found.setdefault(name, {})[WHOLE] = (0, d_out)
    if not found:
        sample = ", ".join(n for n, _ in linears[:6])
        raise PlrError(f"LoRA targets {list(cfg.targets)} match no nn.Linear or 1x1 nn.Conv2d of the model (its "
                       f"linear layers are named like: {sample}, ...); set adapter.targets or model.lora_targets")
    return found


def layer_id(module_name: str, branch_key: str) -> str:
    return module_name if branch_key == WHOLE else f"{module_name}.{branch_key}"


def inject_lora(model: nn.Module, cfg: LoRAConfig,
                keep: Mapping[str, tuple[Tensor | None, Tensor | None]] | None = None) -> dict[str, LoRABranch]:
    """Wrap every targeted linear layer of `model` in place.

    Args:
        model: the backbone (module names are relative to it).
        cfg: ranks and target patterns.
        keep: optional kept (rows, cols) per layer id; missing layers are dense.

    Returns:
        The branches by layer id, in module order.
    """
    keep = dict(keep or {})
    branches: dict[str, LoRABranch] = {}
    for name, slices in find_targets(model, cfg).items():
        base = model.get_submodule(name)
        if isinstance(base, LoRALinear):
            raise PlrError(f"module '{name}' already has LoRA; build a fresh model before injecting again")
        made = {}
        d_in = dims(base)[1]
        for key, (offset, d_out) in slices.items():
            lid = layer_id(name, key)
            rows, cols = keep.pop(lid, (None, None))
            made[key] = LoRABranch(d_in, d_out, cfg.r, cfg.alpha, cfg.dropout, rows, cols, offset)
            made[key].to(device=base.weight.device)
            branches[lid] = made[key]
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, (LoRAConv if isinstance(base, nn.Conv2d) else LoRALinear)(base, made))
    if keep:
        raise PlrError(f"masks name layers the model does not adapt ({sorted(keep)[:3]}...); "
                       "the masks come from another model or target set")
    return branches


def iter_branches(model: nn.Module) -> Iterator[tuple[str, LoRABranch]]:
    """(layer id, branch) for every branch in the model, in module order."""
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            for key, branch in mod.branches.items():
                yield layer_id(name, key), branch


def lora_layers(model: nn.Module) -> Iterator[LoRALinear]:
    return (m for m in model.modules() if isinstance(m, LoRALinear))


def merge_lora(model: nn.Module) -> None:
    for m in lora_layers(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_layers(model):
        m.unmerge()


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """`{layer_id}.lora_A` / `{layer_id}.lora_B` tensors (compact shapes), whole, detached on CPU."""
    out = {}
    for lid, b in iter_branches(model):
        out[f"{lid}.lora_A"] = D.full(b.lora_A.detach()).cpu().clone()  # FSDP: gathered from every process
        out[f"{lid}.lora_B"] = D.full(b.lora_B.detach()).cpu().clone()
    return out


def load_adapter_state_dict(model: nn.Module, state: Mapping[str, Tensor], source: str = "adapter") -> None:
    """Copy saved adapter tensors into the model's branches; every key and shape must match.

    Raises:
        PlrError: naming `source` when keys or shapes do not fit (a foreign or truncated file).
    """
    expected = {}
    for lid, b in iter_branches(model):
        expected[f"{lid}.lora_A"] = b.lora_A
        expected[f"{lid}.lora_B"] = b.lora_B
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise PlrError(f"{source} does not fit this model (missing {missing[:2]}, unexpected {unexpected[:2]}); "
                       "it was written for another model, target set or mask")
    with torch.no_grad():
        for k, p in expected.items():
            if tuple(state[k].shape) != tuple(p.shape):
                raise PlrError(f"{source}: '{k}' has shape {tuple(state[k].shape)}, the model expects "
                               f"{tuple(p.shape)}; it was written for another model or mask")
            D.assign(p, state[k])  # FSDP: this process's shard of it


def freeze_for_adapter(model: nn.Module, head_modules: Sequence[str] = ()) -> None:
    """Freeze everything except LoRA factors and the named head modules."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, b in iter_branches(model):
        b.lora_A.requires_grad_(True)
        b.lora_B.requires_grad_(True)
    for name in head_modules:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)


def count_adapter_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable adapter parameters and those of a dense LoRA at the same rank on the same layers."""
    branches = [b for _, b in iter_branches(model)]
    return {"adapter": sum(b.num_parameters() for b in branches),
            "dense_lora": sum(b.dense_num_parameters() for b in branches),
            "layers": len(branches)}


def base_weights(model: nn.Module) -> dict[str, Tensor]:
    """The frozen weight slice (d_out × d_in) each branch adapts, by layer id."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            for key, b in mod.branches.items():
                w = D.full(mod.base_layer.weight.detach())  # FSDP: gathered (one layer at a time)
                out[layer_id(name, key)] = w.view(mod.out_features, mod.in_features)[b.offset:b.offset + b.d_out]
    return out
