"""Invariants of the adapter layer and its injection into every model family."""

import copy

import pytest
import torch
from torch import nn

from partial_lora.adapter.inject import (
    LoRAConfig,
    adapter_state_dict,
    count_adapter_parameters,
    freeze_for_adapter,
    inject_lora,
    iter_branches,
    load_adapter_state_dict,
    merge_lora,
    unmerge_lora,
)
from partial_lora.adapter.lora import LoRABranch, LoRALinear
from partial_lora.errors import PlrError
from partial_lora.models.backbones import build_model

FAMILIES = ["tiny-bert", "tiny-roberta", "tiny-deberta", "tiny-vit", "tiny-vit-timm", "tiny-effnet"]


def batch_for(built, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    if built.image is not None:
        s = built.image.size
        return {"pixel_values": torch.randn(n, 3, s, s, generator=g)}
    ids = torch.randint(1000, 2000, (n, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def randomize_b(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, b in iter_branches(net):
            b.lora_B.copy_(torch.randn(b.lora_B.shape, generator=g) * 0.5)


def lora_cfg(spec, targets="default", r=4):
    """The model's target set by name; `default` is the one adapter.targets takes (`qv`, a conv net's `pw`)."""
    targets = spec.default_targets if targets == "default" else targets
    return LoRAConfig(r=r, alpha=8, targets=tuple(spec.lora_targets[targets]), fused=spec.fused,
                      exclude=tuple(spec.head_modules))


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("targets", ["default", "all"])
def test_zero_init_equals_base_and_merge_equals_unmerged(model_spec, name, targets):
    spec = model_spec(name)
    torch.manual_seed(0)
    built = build_model(spec, 3)
    model = built.model.eval()
    batch = batch_for(built)
    base = model(batch)
    branches = inject_lora(model.net, lora_cfg(spec, targets))
    assert branches, "no branch injected"
    torch.testing.assert_close(model(batch), base, atol=0, rtol=0)  # B = 0 => exactly the base model
    randomize_b(model.net)
    adapted = model(batch)
    assert (adapted - base).abs().max() > 0.02 * base.abs().max()  # the adapter now changes the output
    merge_lora(model.net)
    torch.testing.assert_close(model(batch), adapted, atol=1e-5, rtol=1e-5)
    unmerge_lora(model.net)
    torch.testing.assert_close(model(batch), adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_only_adapter_and_head_get_gradients(model_spec, name):
    spec = model_spec(name)
    built = build_model(spec, 3)
    net = built.model.net
    inject_lora(net, lora_cfg(spec))
    freeze_for_adapter(net, spec.head_modules)
    randomize_b(net)
    built.model(batch_for(built)).sum().backward()
    with_grad = {n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert with_grad <= trainable
    assert all(("lora_" in n) or any(n.startswith(h + ".") for h in spec.head_modules) for n in trainable)
    assert any("lora_A" in n for n in with_grad) and any("lora_B" in n for n in with_grad)
    assert any(n.startswith(spec.head_modules[-1]) for n in with_grad)


def test_timm_fused_qkv_slices_touch_only_their_outputs(model_spec):
    spec = model_spec("tiny-vit-timm")
    built = build_model(spec, 3)
    net = built.model.net
    branches = inject_lora(net, lora_cfg(spec, "qv"))
    assert "blocks.0.attn.qkv.q" in branches and "blocks.0.attn.qkv.v" in branches
    assert not any(k.endswith(".k") for k in branches)
    layer = net.blocks[0].attn.qkv
    assert isinstance(layer, LoRALinear)
    d = layer.out_features // 3
    randomize_b(net)
    x = torch.randn(2, 5, layer.in_features)
    delta = layer(x) - layer.base_layer(x)
    assert delta[..., :d].abs().max() > 0  # q slice moved
    assert delta[..., d:2 * d].abs().max() == 0  # k slice untouched
    assert delta[..., 2 * d:].abs().max() > 0  # v slice moved


def dense_masked_reference(base: nn.Linear, a_full, b_full, rows, cols, scale, offset, d_out, x):
    """ΔW = s·diag(u_row)·B·A·diag(u_col) with explicit 0/1 masks (test-only reference)."""
    u_row = torch.zeros(d_out)
    u_row[rows] = 1
    u_col = torch.zeros(base.in_features)
    u_col[cols] = 1
    delta = scale * torch.diag(u_row) @ b_full @ a_full @ torch.diag(u_col)
    full = torch.zeros(base.out_features, base.in_features)
    full[offset:offset + d_out] = delta
    return x @ (base.weight + full).t() + base.bias


@pytest.mark.parametrize("offset_slice", [None, 1])
def test_compact_branch_equals_dense_masked_reference(offset_slice):
    torch.manual_seed(0)
    d_in, d_out_full, r = 24, 36, 4
    base = nn.Linear(d_in, d_out_full)
    d_out = d_out_full if offset_slice is None else d_out_full // 3
    offset = 0 if offset_slice is None else offset_slice * d_out
    rows = torch.randperm(d_out)[:5]
    cols = torch.randperm(d_in)[:7]
    a_full = torch.randn(r, d_in)
    b_full = torch.randn(d_out, r)
    branch = LoRABranch(d_in, d_out, r, alpha=8, rows=rows, cols=cols, offset=offset)
    with torch.no_grad():  # compact tensors = the full factors restricted to R x C
        branch.lora_A.copy_(a_full[:, branch.cols])
        branch.lora_B.copy_(b_full[branch.rows])
    layer = LoRALinear(base, {"lora": branch})
    x = torch.randn(3, d_in)
    ref = dense_masked_reference(base, a_full, b_full, rows, cols, branch.scale, offset, d_out, x)
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)
    assert branch.num_parameters() == r * (5 + 7)
    # the update is exactly zero outside R x C
    dw = branch.delta_weight()
    outside = torch.ones_like(dw, dtype=torch.bool)
    outside[rows[:, None], cols[None, :]] = False
    assert dw[outside].abs().max() == 0
    layer.merge()
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(base.weight, layer.base_layer.weight)


def test_no_matching_target_raises_with_a_hint(model_spec):
    spec = model_spec("tiny-bert")
    built = build_model(spec, 2)
    with pytest.raises(PlrError, match="match no nn.Linear.*adapter.targets"):
        inject_lora(built.model.net, LoRAConfig(targets=("q_proj",)))


def test_rank_must_be_positive():
    with pytest.raises(PlrError, match="adapter.r"):
        LoRABranch(4, 4, r=0, alpha=1)


def test_state_dict_roundtrip_and_foreign_state_rejected(model_spec):
    spec = model_spec("tiny-bert")
    torch.manual_seed(0)
    a = build_model(spec, 2).model.net
    inject_lora(a, lora_cfg(spec))
    randomize_b(a)
    state = adapter_state_dict(a)
    assert set(state) == {f"{lid}.lora_{m}" for lid, _ in iter_branches(a) for m in "AB"}
    b = build_model(spec, 2).model.net
    inject_lora(b, lora_cfg(spec))
    load_adapter_state_dict(b, state)
    for k, v in adapter_state_dict(b).items():
        torch.testing.assert_close(v, state[k])
    c = build_model(spec, 2).model.net
    inject_lora(c, lora_cfg(spec, r=2))
    with pytest.raises(PlrError, match="shape"):
        load_adapter_state_dict(c, state, source="x.safetensors")
    d = build_model(spec, 2).model.net
    inject_lora(d, lora_cfg(spec, "all"))
    with pytest.raises(PlrError, match="does not fit"):
        load_adapter_state_dict(d, state)


def test_parameter_counts_shrink_with_kept_rows_and_cols(model_spec):
    spec = model_spec("tiny-bert")
    net = build_model(spec, 2).model.net
    keep = {"bert.encoder.layer.0.attention.self.query": (torch.arange(8), torch.arange(4))}
    inject_lora(net, lora_cfg(spec, r=4), keep=keep)
    counts = count_adapter_parameters(net)
    assert counts["dense_lora"] == 4 * 4 * (32 + 32)
    assert counts["adapter"] == 3 * 4 * 64 + 4 * (8 + 4)
    n_trainable_lora = sum(p.numel() for n, p in net.named_parameters() if "lora_" in n)
    assert n_trainable_lora == counts["adapter"]


def test_masks_for_unknown_layers_rejected(model_spec):
    spec = model_spec("tiny-bert")
    net = build_model(spec, 2).model.net
    with pytest.raises(PlrError, match="another model"):
        inject_lora(copy.deepcopy(net), lora_cfg(spec), keep={"nope.query": (None, None)})
    with pytest.raises(PlrError, match="another model"):
        inject_lora(net, lora_cfg(spec), keep={"bert.encoder.layer.0.attention.self.query": (torch.tensor([99]), None)})
