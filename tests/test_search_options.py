"""The method search's options: one-sided masks, the truncation and budget-proportional allocators."""

import json

import pytest
import torch
from hydra import compose, initialize_config_module

from partial_lora import config
from partial_lora.adapter.masks import count, kept, rank_random
from partial_lora.allocation import allocators, search
from partial_lora.errors import PlrError
from partial_lora.pipeline.plan import plan
from partial_lora.pipeline.results import format_results
from partial_lora.pipeline.runner import run_pipeline

LAYERS = [allocators.Layer("a", 64, 32), allocators.Layer("b", 64, 32), allocators.Layer("c", 64, 32)]


@pytest.mark.parametrize("sides, expected", [("both", (16, 8)), ("rows", (16, 32)), ("cols", (64, 8))])
def test_one_sided_masks_keep_every_row_or_column_of_the_other_side(sides, expected):
    assert kept(0.25, 64, 32, sides) == expected
    rows, cols = rank_random(64, 32, seed=0, layer="x").keep(0.25, sides)
    assert (len(rows), len(cols)) == expected
    if sides == "rows":
        assert cols.tolist() == list(range(32))
    alloc = allocators.uniform(LAYERS, 4, 0.25, sides)
    assert alloc.params() == 3 * 4 * sum(expected)
    with pytest.raises(PlrError, match="adapter.mask.sides must be one of both, rows, cols"):
        kept(0.5, 4, 4, "diag")


def test_budget_rescaling_honours_the_sides():
    alloc = allocators.uniform(LAYERS, 4, 0.5, "rows")
    out = allocators.rescale_to_budget(alloc, 3 * 4 * (16 + 32))  # rows at 1/4, every column: exactly reachable
    assert out.sides == "rows" and out.params() == 3 * 4 * (16 + 32)
    assert all(la.rows == 16 and la.cols == 32 for la in out.layers)


def test_threshold_search_records_its_name_and_sides():
    cfg = allocators.AllocationConfig(tau=0.9, grid=(1.0, 0.5, 0.25))
    alloc = search.threshold(LAYERS, 4, cfg, evaluate=lambda ratios: 1.0, a_ref=1.0, a_0=0.5, sides="cols",
                             allocator="truncation")
    assert alloc.allocator == "truncation" and alloc.sides == "cols"
    assert all((la.rows, la.cols) == (64, count(0.25, 32)) for la in alloc.layers)


def sensitive(drops):
    """Few-shot accuracy 1.0 minus each layer's drop when it is below 1 (a known answer)."""
    return lambda ratios: 1.0 - sum(drops[k] for k, rho in ratios.items() if rho < 1)


def test_proportional_splits_the_budget_by_sensitivity():
    cfg = allocators.AllocationConfig(allocator="proportional", grid=(1.0, 0.5, 0.125))
    budget = 0.3 * 4 * 3 * (64 + 32)
    alloc = search.proportional(LAYERS, 4, cfg, budget, evaluate=sensitive({"a": 0.3, "b": 0.1, "c": 0.0}),
                                a_ref=1.0, a_0=0.4)
    la = {x.name: x for x in alloc.layers}
    assert la["a"].sensitivity == pytest.approx(0.3) and la["c"].sensitivity == pytest.approx(0.0)
    params = {k: 4 * (x.rows + x.cols) for k, x in la.items()}
    assert params["a"] > params["b"] > params["c"] > 0  # in the order of the sensitivities; c keeps a little
    # weights 0.3 + 0.05·m, 0.1 + 0.05·m, 0.05·m with m the mean sensitivity 0.1333: shares 0.69, 0.25, 0.05
    assert params["a"] / sum(params.values()) == pytest.approx(0.3067 / 0.4333, abs=0.05)
    assert abs(alloc.params() - budget) <= 4 * len(LAYERS)
    assert alloc.allocator == "proportional" and alloc.joint_accuracy == pytest.approx(0.6)


def test_proportional_without_any_sensitivity_is_an_even_split():
    cfg = allocators.AllocationConfig(allocator="proportional")
    alloc = search.proportional(LAYERS, 4, cfg, 0.25, evaluate=lambda r: 0.8, a_ref=0.8, a_0=0.5)
    assert len({(la.rows, la.cols) for la in alloc.layers}) == 1
    assert abs(alloc.params() - 0.25 * alloc.dense_params()) <= 4 * len(LAYERS)


def _cfg(*overrides):
    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        return compose("config", overrides=["experiment=smoke", "trainer.max_steps=2",
                                            "adapter.allocation.grid=[1,0.5,0.25]", *overrides])


def test_truncation_allocator_end_to_end(tmp_path):
    # The few-shot loss (not the tiny model's flat accuracy) shows what each ratio does.
    cfg = _cfg("adapter.allocation.allocator=truncation", "adapter.allocation.metric=loss")
    assert plan(config.validate(cfg))[0] == "probe"
    results = run_pipeline(cfg, tmp_path / "run", echo=lambda s: None)
    alloc = json.loads((tmp_path / "run/allocate/allocation.json").read_text())
    assert alloc["allocator"] == "truncation" and results["status"] == "complete"
    assert all(set(la["tried"]) <= {"0.5", "0.25"} and la["tried"] for la in alloc["layers"])
    # the same probe, searched by masking instead: a_ref and a_0 agree, what each ratio does differs
    masked = run_pipeline(_cfg(f"from_run={tmp_path / 'run'}", "adapter.allocation.metric=loss"), tmp_path / "masked",
                          echo=lambda s: None)
    other = json.loads((tmp_path / "masked/allocate/allocation.json").read_text())
    assert other["a_ref"] == alloc["a_ref"] and other["a_0"] == alloc["a_0"]
    assert [la["tried"] for la in other["layers"]] != [la["tried"] for la in alloc["layers"]]
    assert masked["status"] == "complete"


def test_one_sided_masks_and_proportional_budget_end_to_end(tmp_path):
    cfg = _cfg("adapter.mask.sides=rows", "adapter.allocation.allocator=proportional",
               "adapter.allocation.budget=0.6")  # one side whole: at least half of dense
    config.validate(cfg)
    results = run_pipeline(cfg, tmp_path / "run", echo=lambda s: None)
    # the results table has no threshold to show for a budget split (it crashed on target=None)
    table = format_results(results)
    assert "keep ratio per layer (proportional)" in table and "target" not in table
    assert f"allocation {results['allocation']['joint_accuracy']:.4f}" in table
    masks = json.loads((tmp_path / "run/extract/masks.json").read_text())
    for la in masks["layers"].values():
        assert la["cols"] == la["d_in"] and la["rows"] <= la["d_out"]
    alloc = json.loads((tmp_path / "run/allocate/allocation.json").read_text())
    assert alloc["sides"] == "rows" and abs(alloc["params"] - 0.6 * alloc["dense_params"]) <= 8 * len(alloc["layers"])
    assert alloc["settings"]["mask_sides"] == "rows"


@pytest.mark.parametrize("overrides, message", [
    (["adapter.mask.sides=diag"], "adapter.mask.sides must be one of both, rows, cols"),
    (["adapter.mask.sides=rows", "adapter.mask.granularity=element", "adapter.mask.method=random"],
     "sides applies to row/column masks"),
])
def test_bad_search_options_fail_before_any_work(overrides, message):
    with pytest.raises(PlrError, match=message):
        config.validate(_cfg(*overrides))


def test_proportional_needs_a_budget(tmp_path):
    with pytest.raises(PlrError, match="allocator=proportional splits a budget"):
        run_pipeline(_cfg("adapter.allocation.allocator=proportional"), tmp_path / "run", echo=lambda s: None)


def test_truncation_restores_the_pretrained_weights(tmp_path):
    """After the search, W0 is the pretrained weight again (the retrain starts from the real model)."""
    from partial_lora.adapter.inject import base_weights
    from partial_lora.stages import allocate
    from partial_lora.training.runtime import set_seed
    from partial_lora.working_set.build import setup

    cfg = _cfg("adapter.allocation.allocator=truncation")
    run_pipeline(cfg, tmp_path / "run", echo=lambda s: None)
    captured = {}
    real_setup = allocate.setup

    def spy(c):
        s = real_setup(c)
        captured["s"] = s
        return s

    allocate.setup = spy
    try:
        (tmp_path / "run/allocate/done").unlink()
        allocate.run(config.validate(cfg), tmp_path / "run")
    finally:
        allocate.setup = real_setup
    set_seed(0)
    fresh = base_weights(setup(config.validate(cfg)).built.model.net)
    after = base_weights(captured["s"].built.model.net)
    assert fresh.keys() == after.keys() and all(torch.equal(fresh[k], after[k]) for k in fresh)
