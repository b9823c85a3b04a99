"""`adapter.mask.shared_input`: layers that read one input keep nested columns and gather it once.

The group ranking (nested sets, the subspace of the stacked W0s), the shared gather (the same
outputs and gradients as per-layer gathers, one x_U saved for backward), the traced groups of a
tiny BERT and timm ViT, a pipeline run end to end, and the config errors.
"""

import json

import pytest
import torch
from hydra import compose, initialize_config_module
from torch import nn

from partial_lora import artifacts, config, rundir
from partial_lora.adapter.inject import LoRAConfig, inject_lora, iter_branches
from partial_lora.adapter.input_groups import InputGroup, attach, trace
from partial_lora.adapter.lora import LoRABranch, LoRALinear
from partial_lora.adapter.masks import LayerInfo, MaskConfig, Ranking, rank_group, rank_layer, rank_random
from partial_lora.errors import PlrError
from partial_lora.models.backbones import build_model
from partial_lora.pipeline.runner import run_pipeline
from partial_lora.working_set.build import setup_run

D_IN, R = 16, 4
Q_COLS, V_COLS = [1, 2, 7, 9], [1, 2, 5, 7, 9, 11, 13]  # nested: q's set inside v's


def compose_cfg(*overrides):
    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        return compose("config", overrides=["experiment=smoke", *overrides])


# ----------------------------------------------------------------------------- group rankings


def test_group_columns_are_prefixes_of_one_ranking_so_they_nest():
    g = torch.Generator().manual_seed(0)
    infos = [LayerInfo("blk.q", torch.randn(24, 32, generator=g), None),
             LayerInfo("blk.v", torch.randn(24, 32, generator=g), None)]
    order = rank_group("random", infos, seed=3)
    # random: one permutation seeded by the first member's name (over the stacked output rows)
    assert torch.equal(order, rank_random(48, 32, seed=3, layer="blk.q").cols)
    assert sorted(order.tolist()) == list(range(32))
    kept = {}
    for info, rho in zip(infos, (0.25, 0.5), strict=True):
        ranking = Ranking(rank_layer("random", info, seed=3).rows, order)
        rows, cols = ranking.keep(rho)
        assert len(rows) == round(rho * 24) and len(cols) == round(rho * 32)
        assert set(cols.tolist()) == set(order[: len(cols)].tolist())  # the top of the group's ranking
        kept[info.name] = set(cols.tolist())
    assert kept["blk.q"] < kept["blk.v"] and len(kept["blk.q"]) == 8 and len(kept["blk.v"]) == 16


def test_subspace_group_ranking_puts_the_columns_holding_the_energy_first():
    g = torch.Generator().manual_seed(0)
    w_q = 1e-3 * torch.randn(12, 20, generator=g)
    w_v = 1e-3 * torch.randn(12, 20, generator=g)
    w_q[:, [3, 7]] += torch.randn(12, 2, generator=g)  # q's energy in columns 3 and 7
    w_v[:, [7, 11]] += 2 * torch.randn(12, 2, generator=g)  # v's in 7 and 11
    order = rank_group("subspace", [LayerInfo("q", w_q, None), LayerInfo("v", w_v, None)], energy=0.99)
    assert set(order[:3].tolist()) == {3, 7, 11}
    # each layer alone would miss the other's columns
    assert set(rank_layer("subspace", LayerInfo("q", w_q, None), energy=0.99).cols[:2].tolist()) == {3, 7}
    with pytest.raises(PlrError, match="different input sizes"):
        rank_group("subspace", [LayerInfo("q", w_q, None), LayerInfo("v", w_v[:, :10], None)])
    # probe_magnitude: the column norms of the stacked probe updates
    d_q, d_v = torch.zeros(12, 20), torch.zeros(12, 20)
    d_q[:, 4], d_v[:, 9], d_v[:, 4] = 1.0, 3.0, 1.0
    order = rank_group("probe_magnitude", [LayerInfo("q", w_q, d_q), LayerInfo("v", w_v, d_v)])
    assert order[:2].tolist() == [9, 4]
    with pytest.raises(PlrError, match="needs the probe stage"):
        rank_group("probe_magnitude", [LayerInfo("q", w_q, d_q), LayerInfo("v", w_v, None)])


# ----------------------------------------------------------------------------- the shared gather


class Attention(nn.Module):
    """q(x) and v(x) on the same tensor, as an attention block reads its input."""

    def __init__(self, q_rows=None, v_rows=None) -> None:
        super().__init__()
        self.q = LoRALinear(nn.Linear(D_IN, 12), {"lora": LoRABranch(D_IN, 12, R, 8, rows=q_rows,
                                                                    cols=torch.tensor(Q_COLS))})
        self.v = LoRALinear(nn.Linear(D_IN, 10), {"lora": LoRABranch(D_IN, 10, R, 8, rows=v_rows,
                                                                    cols=torch.tensor(V_COLS))})
        for m in (self.q, self.v):
            m.base_layer.requires_grad_(False)
            nn.init.normal_(m.branches["lora"].lora_B)
        # fixed output weights (buffers): the gradients reaching q and v differ per entry, and the
        # products save only these buffers
        self.register_buffer("wq", torch.randn(12))
        self.register_buffer("wv", torch.randn(10))

    def forward(self, x):
        return (self.q(x) * self.wq).sum() + (self.v(x) * self.wv).sum()

    def branches(self):
        return [self.q.branches["lora"], self.v.branches["lora"]]


def _model(shared: bool, rows: bool = True) -> Attention:
    torch.manual_seed(0)
    m = Attention(torch.tensor([0, 3, 5]) if rows else None, torch.tensor([1, 4]) if rows else None).double()
    if shared:
        InputGroup(m.branches())
    return m


def _run(m: Attention, x: torch.Tensor):
    x = x.clone().requires_grad_(True)
    y = m(x)
    y.backward()
    grads = [p.grad for b in m.branches() for p in (b.lora_A, b.lora_B)]
    return y.detach(), x.grad, grads


def test_shared_gather_gives_the_outputs_and_gradients_of_per_layer_gathers():
    x = torch.randn(3, 5, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    plain, shared = _model(False), _model(True)
    assert all(b.input_group is not None for b in shared.branches())
    assert shared.q.branches["lora"].group_pos.tolist() == [0, 1, 3, 4]  # q's columns inside U = v's columns
    assert shared.v.branches["lora"].group_pos is None  # v keeps U itself: its A is used as it is
    y0, gx0, g0 = _run(plain, x)
    y1, gx1, g1 = _run(shared, x)
    assert abs(float(y0 - y1)) < 1e-6 * max(1.0, abs(float(y0)))
    assert (gx0 - gx1).abs().max() < 1e-6
    for a, b in zip(g0, g1, strict=True):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-6
    # merge, delta_weight: the plain sorted index sets, untouched by the group
    for b0, b1 in zip(plain.branches(), shared.branches(), strict=True):
        assert torch.equal(b0.cols, b1.cols) and (b0.delta_weight() - b1.delta_weight()).abs().max() < 1e-12


def _saved_bytes(m: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the new tensors autograd saves in one forward (unique storages; parameters, buffers
    and the input x excluded), as the bench's memory proxy counts them."""
    existing = {t.untyped_storage().data_ptr() for t in (*m.parameters(), *m.buffers(), x)}
    saved: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in existing:
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x)
    return sum(saved.values())


def test_shared_gather_saves_the_input_once_per_group():
    n, es = 3 * 5, 8
    x = torch.randn(3, 5, D_IN, dtype=torch.float64, requires_grad=True)
    plain, shared = _saved_bytes(_model(False, rows=False), x), _saved_bytes(_model(True, rows=False), x)
    h = 2 * n * R * es  # each branch's rank-r code
    assert plain == h + n * (len(Q_COLS) + len(V_COLS)) * es  # x_Cq and x_Cv
    # one x_U (U = v's columns), and q's A scattered into U (r x |U|), saved for x's gradient
    assert shared == h + n * len(V_COLS) * es + R * len(V_COLS) * es
    assert shared < plain


def test_a_call_with_another_tensor_gathers_again_and_the_cache_lets_go():
    m = _model(True)
    q, v = m.branches()
    group = q.input_group
    x1, x2 = torch.randn(2, D_IN, dtype=torch.float64), torch.randn(2, D_IN, dtype=torch.float64)
    ref = _model(False)
    with torch.no_grad():
        assert torch.allclose(m.q(x1), ref.q(x1))
        assert group._xu is not None  # v has not been served yet
        assert torch.allclose(m.v(x2), ref.v(x2))  # another tensor: a miss, gathered again
        assert torch.allclose(m.q(x2), ref.q(x2))  # both served for x2: released
        assert group._xu is None
        x1.add_(1.0)  # modified in place: the version counter changes, the cached x_U is stale
        m.q(x1)
        assert torch.allclose(m.v(x1), ref.v(x1))
    # a no-grad x_U is never reused under grad mode (it would carry no graph)
    xg = torch.randn(2, D_IN, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        m.q(xg)
    out = m.v(xg).sum()
    out.backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_input_group_refusals():
    b1 = LoRABranch(D_IN, 8, R, 8, dropout=0.1, cols=torch.tensor([1, 2]))
    b2 = LoRABranch(D_IN, 8, R, 8, cols=torch.tensor([1, 3]))
    with pytest.raises(PlrError, match="adapter.dropout=0"):
        InputGroup([b1, b2])
    with pytest.raises(PlrError, match="inputs of one size"):
        InputGroup([b2, LoRABranch(D_IN + 1, 8, R, 8, cols=torch.tensor([1]))])
    dense = LoRABranch(D_IN, 8, R, 8)
    # a member keeping every column reads x itself: with one sparse member left, no group is made
    assert attach({"q": b2, "v": dense}, [["q", "v"]]) == [] and b2.input_group is None
    with pytest.raises(PlrError, match="rerun extract"):
        attach({"q": b2}, [["q", "k"]])


# ----------------------------------------------------------------------------- finding the groups


def test_trace_groups_query_and_value_of_each_bert_block_and_nothing_else(model_spec):
    spec = model_spec("tiny-bert")
    torch.manual_seed(0)
    net = build_model(spec, 3).model.net
    inject_lora(net, LoRAConfig(r=R, targets=tuple(spec.lora_targets["all"]), exclude=tuple(spec.head_modules)))
    groups = trace(net, lambda: net(input_ids=torch.randint(100, (2, 8))))
    blocks = [f"bert.encoder.layer.{i}." for i in range(2)]
    # query, key and value read one tensor; attention.output.dense, intermediate.dense and
    # output.dense each read another one: no group
    assert groups == [[p + f"attention.self.{n}" for n in ("query", "key", "value")] for p in blocks]
    net = build_model(spec, 3).model.net
    inject_lora(net, LoRAConfig(r=R, targets=("query", "value", "intermediate.dense"), exclude=("classifier",)))
    assert trace(net, lambda: net(input_ids=torch.randint(100, (2, 8)))) == [
        [p + "attention.self.query", p + "attention.self.value"] for p in blocks]
    assert not any(h for m in net.modules() for h in m._forward_pre_hooks.values())  # hooks removed


def test_trace_groups_the_slices_of_a_fused_qkv(model_spec):
    spec = model_spec("tiny-vit-timm")
    net = build_model(spec, 3).model.net
    inject_lora(net, LoRAConfig(r=R, targets=("qkv:q", "qkv:v"), fused=dict(spec.fused), exclude=("head",)))
    assert trace(net, lambda: net(torch.randn(1, 3, 32, 32))) == [
        [f"blocks.{i}.attn.qkv.q", f"blocks.{i}.attn.qkv.v"] for i in range(2)]


# ----------------------------------------------------------------------------- the pipeline


def test_pipeline_with_shared_input_records_nested_groups_and_retrains_through_them(tmp_path, monkeypatch):
    import partial_lora.stages.extract as extract

    built = []  # the layers extract builds a LayerInfo for, in order: each once, grouped or not
    monkeypatch.setattr(extract, "LayerInfo", lambda name, *a: built.append(name) or LayerInfo(name, *a))
    # spectrum gives q and v other keep ratios (6 and 7 of 32 columns): nested, not equal
    cfg = compose_cfg("adapter.allocation.allocator=spectrum", "adapter.allocation.energy=0.5",
                      "adapter.mask.method=random", "adapter.mask.shared_input=true", "trainer.max_steps=1")
    results = run_pipeline(cfg, tmp_path, echo=lambda s: None)
    assert results["status"] == "complete" and results["stages"]["extract"]["input_groups"] == 2
    groups = artifacts.read_input_groups(tmp_path)
    blocks = [f"bert.encoder.layer.{i}.attention.self." for i in range(2)]
    assert groups == [[p + "query", p + "value"] for p in blocks]
    keep, _ = artifacts.read_masks(tmp_path, "tiny-bert")
    for group in groups:
        sets = sorted((set(keep[lid][1].tolist()) for lid in group), key=len)
        assert len(sets[0]) < len(sets[1]) and sets[0] < sets[1]  # nested
    branches = dict(iter_branches(setup_run(config.validate(cfg), tmp_path).built.model.net))
    layer_ids = list(json.loads((tmp_path / "extract/masks.json").read_text())["layers"])
    assert layer_ids == list(branches)  # in the model's order, grouped layers too
    assert sorted(built) == sorted(branches) and len(set(built)) == len(built)  # each layer's once, grouped too
    for group in groups:  # retrain, evaluate and export see the groups: one gather of x_U per block
        shared = {id(branches[lid].input_group) for lid in group}
        assert len(shared) == 1 and branches[group[0]].input_group is not None
        assert branches[group[0]].input_group.size == max(len(keep[lid][1]) for lid in group)
    assert json.loads((tmp_path / "extract/masks.json").read_text())["input_groups"] == groups


def test_masks_without_groups_read_as_none(tmp_path):
    artifacts.write_masks(tmp_path, {"l.rows": torch.tensor([0]), "l.cols": torch.tensor([1])}, {"model": "m"},
                          {"l": {"rows": 1, "cols": 1}})
    assert artifacts.read_input_groups(tmp_path) == []  # a masks file from before the option, or made without it
    assert MaskConfig().shared_input is False


def test_shared_input_is_an_extract_setting_not_an_allocation_one():
    settings = config.validate(compose_cfg("adapter.mask.shared_input=true")).settings
    assert "adapter.mask.shared_input" not in rundir.fingerprint(settings, "allocate")
    assert rundir.fingerprint(settings, "extract")["adapter.mask.shared_input"] is True


@pytest.mark.parametrize("overrides, message", [
    (["adapter.dropout=0.1"], "cannot draw their own input dropout (adapter.dropout=0.1); set adapter.dropout=0"),
    (["adapter.mask.granularity=element", "adapter.mask.method=random"], "element masks keep no columns"),
    (["adapter.mask.shared_input=yes"], "adapter.mask.shared_input='yes' must be true or false"),
    (["adapter.mask.shared_input=1"], "adapter.mask.shared_input=1 must be true or false"),
])
def test_shared_input_config_errors_are_one_line(overrides, message):
    with pytest.raises(PlrError) as e:
        config.validate(compose_cfg(*overrides,
                                    *([] if "shared_input" in overrides[0] else ["adapter.mask.shared_input=true"])))
    assert message in str(e.value) and "\n" not in str(e.value)
