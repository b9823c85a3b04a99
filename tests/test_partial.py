"""Partial-LoRA: allocation, masks, rewinding, budgets and the five-stage pipeline."""

import json

import pytest
import torch
from hydra import compose, initialize_config_module
from safetensors.torch import load_file

from partial_lora import artifacts, config
from partial_lora.adapter.inject import LoRAConfig, inject_lora, iter_branches, rewind
from partial_lora.adapter.masks import count, element_masks, rank_random, rank_subspace, subspace_k
from partial_lora.allocation import allocators, search
from partial_lora.errors import PlrError
from partial_lora.models.backbones import build_model
from partial_lora.pipeline.plan import plan
from partial_lora.pipeline.runner import run_pipeline
from partial_lora.working_set.build import setup_run

FLOOR = 0.125
GRID = (1.0, 0.5, 0.25, FLOOR)


def synthetic(penalties):
    """Accuracy 1.0 minus each layer's penalty at its ratio: a case with a known answer."""
    def evaluate(ratios):
        return 1.0 - sum(penalties[name](rho) for name, rho in ratios.items())
    return evaluate


LAYERS = [allocators.Layer("a", 64, 32), allocators.Layer("b", 64, 32), allocators.Layer("c", 64, 32)]
PENALTIES = {
    "a": lambda rho: 0.06 if rho < 0.5 else 0.0,   # mildly sensitive below 1/2
    "b": lambda rho: 0.06 if rho < 0.5 else 0.0,   # the same: only one of a, b can drop below 1/2 jointly
    "c": lambda rho: 0.5 if rho < 1 else 0.0,      # must stay dense
}


def test_joint_threshold_allocation_has_the_known_answer():
    cfg = allocators.AllocationConfig(tau=0.9, grid=GRID, mode="joint")
    alloc = search.threshold(LAYERS, 4, cfg, evaluate=synthetic(PENALTIES), a_ref=1.0, a_0=0.2)
    assert alloc.ratios() == {"a": FLOOR, "b": 0.5, "c": 1.0}
    assert alloc.target == pytest.approx(0.9)
    assert alloc.joint_accuracy == pytest.approx(0.94) and alloc.joint_accuracy >= alloc.target
    la = {x.name: x for x in alloc.layers}
    assert la["b"].tried == {str(FLOOR): pytest.approx(0.88), "0.25": pytest.approx(0.88), "0.5": pytest.approx(0.94)}
    assert la["c"].sensitivity == pytest.approx(0.5)
    assert (la["a"].rows, la["a"].cols) == (8, 4) and (la["b"].rows, la["b"].cols) == (32, 16)


def test_independent_mode_is_the_literal_reading_and_warns(caplog):
    cfg = allocators.AllocationConfig(tau=0.9, grid=GRID, mode="independent", floor_warning=0.5)
    alloc = search.threshold(LAYERS, 4, cfg, evaluate=synthetic(PENALTIES), a_ref=1.0, a_0=0.2)
    assert alloc.ratios() == {"a": FLOOR, "b": FLOOR, "c": 1.0}
    assert alloc.joint_accuracy == pytest.approx(0.88)  # recorded: the literal reading overshoots the target
    assert alloc.joint_accuracy < alloc.target
    assert alloc.warnings and "smallest ratio" in caplog.text


def test_relative_to_gain_moves_the_target():
    assert search.target_accuracy(0.9, 0.5, 0.9, "gain") == pytest.approx(0.5 + 0.9 * 0.4)
    cfg = allocators.AllocationConfig(tau=0.95, grid=GRID, relative_to="gain")
    alloc = search.threshold(LAYERS, 4, cfg, evaluate=synthetic(PENALTIES), a_ref=1.0, a_0=0.0)
    assert alloc.target == pytest.approx(0.95)
    assert alloc.ratios() == {"a": 0.5, "b": 0.5, "c": 1.0}  # 0.94 < 0.95: nobody may drop below 1/2


@pytest.mark.parametrize("kw, key", [({"tau": 0.0}, "tau"), ({"tau": 1.5}, "tau"), ({"grid": ()}, "grid is empty"),
                                     ({"grid": (1.0, 0.0)}, "grid"), ({"mode": "x"}, "mode"),
                                     ({"relative_to": "x"}, "relative_to"), ({"allocator": "x"}, "allocator")])
def test_bad_allocation_settings_raise(kw, key):
    with pytest.raises(PlrError, match=key):
        allocators.AllocationConfig(**kw)


@pytest.mark.parametrize("budget", [0.1, 0.3, 0.55, 5000])
def test_budget_rescaling_lands_within_one_row_or_column_per_layer(budget):
    g = torch.Generator().manual_seed(0)
    layers = [allocators.Layer(f"l{i}", int(d_out), int(d_in)) for i, (d_out, d_in) in
              enumerate(torch.randint(16, 200, (10, 2), generator=g).tolist())]
    ratios = torch.rand(10, generator=g).clamp_min(0.05).tolist()
    alloc = allocators.Allocation("threshold",
                                  [allocators.layer_allocation(la, rho) for la, rho in zip(layers, ratios)], r=8)
    out = allocators.rescale_to_budget(alloc, budget)
    target = budget * alloc.dense_params() if budget <= 1 else budget
    assert abs(out.params() - target) <= 8 * len(layers)  # one row or column (r params) per layer
    # relative allocation is preserved (up to clipping at 1)
    for a, b in zip(alloc.layers, out.layers):
        assert b.ratio == pytest.approx(min(1.0, a.ratio * out.layers[0].ratio / alloc.layers[0].ratio), rel=1e-6) \
            or b.ratio == 1.0


def test_budget_outside_reach_raises():
    alloc = allocators.uniform([allocators.Layer("a", 10, 10)], 4, 0.5)
    with pytest.raises(PlrError, match="budget"):
        allocators.rescale_to_budget(alloc, 10_000)


def test_mask_counts_match_ratios_and_subspace_finds_the_signal_rows():
    torch.manual_seed(0)
    w = torch.randn(40, 30) * 1e-3
    w[[3, 7, 11], :] += torch.randn(3, 30) * 5  # energy lives in rows 3, 7, 11 ...
    w[:, [2, 5]] += torch.randn(40, 2) * 5      # ... and columns 2, 5
    ranking = rank_subspace(w, energy=0.9)
    for rho in (1.0, 0.5, 0.25, 0.1, 0.01):
        rows, cols = ranking.keep(rho)
        assert len(rows) == count(rho, 40) and len(cols) == count(rho, 30)
        assert len(set(rows.tolist())) == len(rows) and torch.all(rows[1:] > rows[:-1])
    rows, cols = ranking.keep(3 / 40)
    assert set(rows.tolist()) == {3, 7, 11}
    _, cols = ranking.keep(2 / 30)
    assert set(cols.tolist()) == {2, 5}
    assert subspace_k(torch.tensor([3.0, 1.0, 1.0, 1.0]), 0.75) == 1  # 9/12 of the energy in the first
    assert subspace_k(torch.tensor([3.0, 1.0, 1.0, 1.0]), 0.8) == 2


def test_one_mask_form_gives_the_same_update_in_the_search_the_layer_and_export():
    """A `KeptBlock` is the one mask: the search's 0/1 multipliers on the dense factors, the layer's
    compact factors on its index buffers, and export's zero-padded factors give one ΔW."""
    from partial_lora.adapter.lora import LoRABranch
    from partial_lora.adapter.masks import KeptBlock

    gen = torch.Generator().manual_seed(0)
    d_out, d_in, r = 12, 10, 3
    b, a = torch.randn(d_out, r, generator=gen), torch.randn(r, d_in, generator=gen)
    rows, cols = rank_random(d_out, d_in, seed=1, layer="l").keep(0.5)
    block = KeptBlock(rows, cols, d_out, d_in)
    rm, cm = block.multipliers(torch.device("cpu"))
    searched = (b * rm) @ (a * cm)  # the allocation search: dense factors, masked
    branch = LoRABranch(d_in, d_out, r, alpha=r, rows=rows, cols=cols)  # scale 1
    with torch.no_grad():
        branch.lora_B.copy_(block.select(b, a)[0])
        branch.lora_A.copy_(block.select(b, a)[1])
    assert torch.equal(branch.kept.rows, rows) and torch.equal(branch.kept.cols, cols)
    padded_b, padded_a = branch.kept.pad(*branch.factors())  # export: PEFT's dense factors
    assert torch.allclose(branch.delta_weight(), searched) and torch.allclose(padded_b @ padded_a, searched)
    assert int((padded_b != 0).any(1).sum()) == len(rows) and int((padded_a != 0).any(0).sum()) == len(cols)


def test_random_masks_are_deterministic_per_seed():
    a, b, c = rank_random(50, 40, 0, "layer.q"), rank_random(50, 40, 0, "layer.q"), rank_random(50, 40, 1, "layer.q")
    assert torch.equal(a.rows, b.rows) and torch.equal(a.cols, b.cols)
    assert not torch.equal(a.rows, c.rows)
    assert not torch.equal(a.rows, rank_random(50, 40, 0, "layer.v").rows)  # layers differ too
    mb, ma = element_masks(50, 40, 4, 0.25, 0, "x")
    mb2, ma2 = element_masks(50, 40, 4, 0.25, 0, "x")
    assert torch.equal(mb, mb2) and torch.equal(ma, ma2) and ma.sum() == 40 and mb.sum() == 50


def test_rewind_is_the_probe_init_restricted_to_rows_and_cols(model_spec):
    spec = model_spec("tiny-bert")
    cfg = LoRAConfig(r=4, targets=tuple(spec.lora_targets["qv"]), exclude=tuple(spec.head_modules))
    torch.manual_seed(0)
    dense_net = build_model(spec, 3).model.net
    dense = inject_lora(dense_net, cfg)
    init = {}
    for lid, b in dense.items():
        init[f"{lid}.lora_A"] = torch.randn(b.lora_A.shape)
        init[f"{lid}.lora_B"] = torch.randn(b.lora_B.shape)
    g = torch.Generator().manual_seed(1)
    keep = {lid: (torch.randperm(b.d_out, generator=g)[:5], torch.randperm(b.d_in, generator=g)[:7])
            for lid, b in dense.items()}
    sparse = inject_lora(build_model(spec, 3).model.net, cfg, keep)
    rewind(sparse, init)
    for lid, b in sparse.items():
        assert torch.equal(b.lora_A, init[f"{lid}.lora_A"][:, b.cols])
        assert torch.equal(b.lora_B, init[f"{lid}.lora_B"][b.rows])
        assert b.lora_A.shape == (4, 7) and b.lora_B.shape == (5, 4)


def compose_cfg(*overrides, probe=True):
    small = ["adapter.probe.shots=4", "adapter.probe.val_shots=4", "adapter.probe.epochs=2"] if probe else []
    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        return compose("config", overrides=["experiment=smoke", *small, *overrides])


def test_plans():
    assert plan(config.validate(compose_cfg())) == ["probe", "allocate", "extract", "retrain", "evaluate"]
    assert plan(config.validate(compose_cfg("adapter=lora", probe=False))) == ["retrain", "evaluate"]
    assert plan(config.validate(compose_cfg("adapter=lora", "adapter.sparsity=0.5", probe=False)))[0] == "allocate"
    assert plan(config.validate(compose_cfg("adapter.sparsity=0.8"))) == ["allocate", "extract", "retrain", "evaluate"]
    assert plan(config.validate(compose_cfg("adapter.sparsity=0.8",
                                            "adapter.mask.method=probe_magnitude")))[0] == "probe"
    assert plan(config.validate(compose_cfg("adapter.allocation.allocator=spectrum"))) == [
        "allocate", "extract", "retrain", "evaluate"]


@pytest.fixture(scope="module")
def five_stage_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("partial")
    cfg = compose_cfg("trainer.lr=0.05")
    config.validate(cfg)
    lines = []
    results = run_pipeline(cfg, run_dir, echo=lines.append)
    return cfg, run_dir, results, lines


def test_five_stage_pipeline_writes_every_artifact(five_stage_run):
    cfg, run_dir, results, _ = five_stage_run
    for rel in ["probe/adapter.safetensors", "probe/init.safetensors", "probe/head.safetensors", "probe/fewshot.json",
                "probe/done", "allocate/allocation.json", "allocate/allocation.png", "allocate/done",
                "extract/masks.safetensors", "extract/masks.json", "extract/done", "retrain/adapter.safetensors",
                "retrain/done", "evaluate/metrics.json", "evaluate/done", "results.json"]:
        assert (run_dir / rel).is_file(), rel
    assert (run_dir / "allocate/allocation.png").read_bytes()[:4] == b"\x89PNG"
    alloc = json.loads((run_dir / "allocate/allocation.json").read_text())
    for la in alloc["layers"]:
        assert set(la) >= {"name", "ratio", "rows", "cols", "tried", "sensitivity"}
        assert la["rows"] == count(la["ratio"], la["d_out"]) and la["cols"] == count(la["ratio"], la["d_in"])
        assert str(min(GRID[-1], 0.03125)) in la["tried"] or la["tried"]
    assert {"a_ref", "a_0", "tau", "target", "joint_accuracy"} <= set(alloc)
    fewshot = json.loads((run_dir / "probe/fewshot.json").read_text())
    assert len(fewshot["train"]) == 4 * 5 and len(fewshot["val"]) == 4 * 5
    assert not set(fewshot["train"]) & set(fewshot["val"])
    masks = json.loads((run_dir / "extract/masks.json").read_text())
    for lid, la in masks["layers"].items():
        ratio = {x["name"]: x["ratio"] for x in alloc["layers"]}[lid]
        assert la["rows"] == count(ratio, la["d_out"]) and la["cols"] == count(ratio, la["d_in"])
    p = results["params"]
    assert p["adapter"] == alloc["params"] < p["dense_lora_same_rank"]
    assert p["reduction_pct"] == pytest.approx(100 * (1 - p["adapter"] / p["dense_lora_same_rank"]))
    assert results["probe_accuracy"] is not None and results["allocation"]["allocator"] == "threshold"


def test_retrained_update_is_zero_outside_kept_block_and_compact(five_stage_run):
    cfg, run_dir, _, _ = five_stage_run
    s = setup_run(config.validate(cfg), run_dir)
    state = load_file(str(run_dir / "retrain/adapter.safetensors"))
    keep, _ = artifacts.read_masks(run_dir, "tiny-bert")
    n_params = 0
    for lid, b in iter_branches(s.built.model.net):
        rows, cols = keep[lid]
        assert state[f"{lid}.lora_A"].shape == (b.r, len(cols))  # compact trainable tensors
        assert state[f"{lid}.lora_B"].shape == (len(rows), b.r)
        with torch.no_grad():
            b.lora_A.copy_(state[f"{lid}.lora_A"])
            b.lora_B.copy_(state[f"{lid}.lora_B"])
        dw = b.delta_weight()
        outside = torch.ones_like(dw, dtype=torch.bool)
        outside[rows[:, None], cols[None, :]] = False
        assert dw[outside].abs().max() == 0
        n_params += b.lora_A.numel() + b.lora_B.numel()
    assert n_params == json.loads((run_dir / "results.json").read_text())["params"]["adapter"]


def test_rerun_skips_finished_stages(five_stage_run):
    cfg, run_dir, results, _ = five_stage_run
    lines = []
    again = run_pipeline(cfg, run_dir, echo=lines.append)
    assert sum("done already, skipped" in x for x in lines) == 5
    assert again["metrics"] == results["metrics"]


def test_from_run_reuses_probe_and_allocation(five_stage_run, tmp_path):
    _, src, results, _ = five_stage_run
    cfg = compose_cfg("trainer.lr=0.05", f"from_run={src}", "adapter.mask.method=random",
                      "adapter.allocation.search_masks=subspace")
    lines = []
    out = run_pipeline(cfg, tmp_path, echo=lines.append)
    assert any("reusing probe" in x for x in lines) and any("reusing allocate" in x for x in lines)
    assert out["params"]["adapter"] == results["params"]["adapter"]  # same ratios, other rows
    m_src = load_file(str(src / "extract/masks.safetensors"))
    m_new = load_file(str(tmp_path / "extract/masks.safetensors"))
    assert any(not torch.equal(m_src[k], m_new[k]) for k in m_src if k.endswith(".rows"))
    lines = []  # the reused stages carry this run's fingerprint: the same command again is not refused
    assert run_pipeline(cfg, tmp_path, echo=lines.append)["metrics"] == out["metrics"]
    assert sum("done already, skipped" in x for x in lines) == 5
    cfg_tau = compose_cfg("trainer.lr=0.05", f"from_run={src}", "adapter.allocation.tau=0.5")  # the probe reads lr
    lines = []
    run_pipeline(cfg_tau, tmp_path / "tau", echo=lines.append)
    assert any("reusing probe" in x for x in lines) and any("allocating again" in x for x in lines)
    lines = []  # a probe made with other probe settings is not this run's: probe (and allocate) again
    run_pipeline(compose_cfg("trainer.lr=0.05", f"from_run={src}", "adapter.probe.epochs=1"), tmp_path / "ep",
                 echo=lines.append)
    assert any("probe settings differ (adapter.probe.epochs); probing again" in x for x in lines), lines
    assert not any("reusing" in x for x in lines) and any("allocation settings differ" in x for x in lines)


def test_uniform_sparsity_runs_without_probe(tmp_path):
    cfg = compose_cfg("adapter.sparsity=0.75")
    results = run_pipeline(cfg, tmp_path, echo=lambda s: None)
    assert not (tmp_path / "probe").exists()
    masks = json.loads((tmp_path / "extract/masks.json").read_text())
    assert all(la["rows"] == count(0.25, la["d_out"]) for la in masks["layers"].values())
    assert results["stages"]["retrain"]["init"] == "fresh"


@pytest.mark.parametrize("overrides, message", [
    (["adapter.probe.shots=500", "adapter.probe.short_classes=error"], "more than class"),
    (["adapter.allocation.tau=0"], "tau must be in (0, 1]"),
    (["adapter.allocation.grid=[]"], "grid is empty"),
    (["adapter.sparsity=-0.1"], "sparsity must be in [0, 1)"),
    (["retrain.init=warm"], "retrain.init"),
    (["adapter.mask.method=best"], "unknown adapter.mask.method"),
    (["from_run=/does/not/exist"], "not a plr run dir"),
])
def test_bad_partial_inputs_raise_one_line_errors(tmp_path, overrides, message):
    cfg = compose_cfg(*overrides)
    with pytest.raises(PlrError) as e:
        config.validate(cfg)
        run_pipeline(cfg, tmp_path, echo=lambda s: None)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not any(tmp_path.glob("*/done"))


def test_masks_from_another_model_are_rejected(five_stage_run, tmp_path):
    _, src, _, _ = five_stage_run
    with pytest.raises(PlrError, match="made for model 'tiny-bert'"):
        artifacts.read_masks(src, "tiny-roberta")
