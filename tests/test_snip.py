"""SNIP importance |W0 ⊙ ∂L/∂W0| (partial_lora.adapter.snip) and the compact adapter ranked by it
(`adapter.mask.method=snip`): a hand-computed case, then tiny runs at one ratio and at
Partial-LoRA's own allocation."""

import json

import pytest
import torch
from hydra import compose, initialize_config_module
from safetensors.torch import load_file
from torch import nn

from partial_lora import artifacts, config
from partial_lora.adapter import snip as snip_importance
from partial_lora.adapter.masks import MASKERS, LayerInfo, rank_group, rank_layer
from partial_lora.errors import PlrError
from partial_lora.pipeline.runner import run_pipeline

# W0 of a bias-free linear layer y = W0·x, and the loss L = ½‖y − t‖², so ∂L/∂W0 = (W0·x − t)·xᵀ.
W0 = torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, -1.0]])
# batch 1: x = (1, -1), t = 0 -> residual (-1, 3, 1), gradient [[-1, 1], [3, -3], [1, -1]],
#          |W0 ⊙ g| = [[1, 2], [9, 0], [0, 1]]
# batch 2: x = (0, 1), t = 0 -> residual (2, 0, -1), gradient [[0, 2], [0, 0], [0, -1]],
#          |W0 ⊙ g| = [[0, 4], [0, 0], [0, 1]]
BATCHES = [(torch.tensor([1.0, -1.0]), torch.zeros(3)), (torch.tensor([0.0, 1.0]), torch.zeros(3))]
EXPECTED = torch.tensor([[1.0, 6.0], [9.0, 0.0], [0.0, 2.0]])


def _linear() -> nn.Linear:
    layer = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(W0)
    layer.weight.requires_grad_(False)  # frozen, as a pretrained weight under an adapter
    return layer


def _loss(layer: nn.Linear):
    return lambda batch: 0.5 * (layer(batch[0]) - batch[1]).pow(2).sum()


def test_importance_of_a_linear_layer_is_the_hand_computed_one():
    layer = _linear()
    s = snip_importance.importance(_loss(layer), {"w": layer.weight}, BATCHES)["w"]
    assert torch.equal(s, EXPECTED)
    assert not layer.weight.requires_grad and layer.weight.grad is None  # frozen again, no gradient left behind


def test_rows_and_columns_rank_by_their_summed_importance():
    assert torch.equal(snip_importance.row_scores(EXPECTED), torch.tensor([7.0, 9.0, 2.0], dtype=torch.float64))
    assert torch.equal(snip_importance.col_scores(EXPECTED), torch.tensor([10.0, 8.0], dtype=torch.float64))
    info = LayerInfo("w", W0, None, EXPECTED)
    ranking = rank_layer("snip", info)
    assert ranking.rows.tolist() == [1, 0, 2] and ranking.cols.tolist() == [0, 1]
    rows, cols = ranking.keep(0.5)  # round(1.5) = 2 rows, 1 column
    assert rows.tolist() == [0, 1] and cols.tolist() == [0]
    # an input group: the column sums over both members' rows (member 2 makes column 1 the larger)
    other = LayerInfo("v", W0, None, torch.tensor([[0.0, 5.0], [0.0, 0.0], [0.0, 0.0]]))
    assert rank_group("snip", [info, other]).tolist() == [1, 0]


def test_elements_rank_by_their_importance_in_row_major_order():
    assert snip_importance.top_entries(EXPECTED,
                                       2).tolist() == [[0, 1], [1, 0]]      # 9 at (1, 0), 6 at (0, 1): rows, cols
    assert snip_importance.top_entries(EXPECTED, 3).tolist() == [[0, 1, 2], [1, 0, 1]]  # and 2 at (2, 1)
    ties = snip_importance.top_entries(torch.zeros(2, 2), 3)  # all equal: the first three in row-major order
    assert ties.tolist() == [[0, 0, 1], [0, 1, 0]]
    with pytest.raises(PlrError, match="cannot keep 7 entries"):
        snip_importance.top_entries(EXPECTED, 7)


def test_absolute_values_are_summed_so_opposite_batches_do_not_cancel():
    layer = _linear()
    x = torch.tensor([1.0, 0.0])
    # the two batches' gradients are opposite: (W0·x − 0)·xᵀ and (W0·x − 2·W0·x)·xᵀ
    s = snip_importance.importance(_loss(layer), {"w": layer.weight}, [(x, torch.zeros(3)), (x, 2 * (W0 @ x))])["w"]
    assert torch.equal(s, torch.tensor([[2.0, 0.0], [18.0, 0.0], [0.0, 0.0]]))


def test_snip_rows_are_drawn_with_the_seed():
    a, b = snip_importance.examples(100, 4, 8, seed=0), snip_importance.examples(100, 4, 8, seed=0)
    assert a == b and len(a) == 32 and len(set(a)) == 32
    assert snip_importance.examples(100, 4, 8, seed=1) != a
    assert sorted(snip_importance.examples(10, 4, 8, seed=0)) == list(range(10))  # fewer rows than asked: all of them


def test_snip_is_a_mask_method():
    assert "snip" in MASKERS
    with pytest.raises(PlrError, match="no SNIP importance"):
        rank_layer("snip", LayerInfo("w", W0, None))


# --- tiny runs ------------------------------------------------------------------------------------
FAST = ["experiment=smoke", "trainer.max_steps=2"]


def cfg_of(*overrides: str):
    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        return compose("config", overrides=[*FAST, *overrides])


def run(run_dir, *overrides: str) -> dict:
    return run_pipeline(cfg_of(*overrides), run_dir, echo=lambda s: None)


def _kept(run_dir) -> dict:
    t = load_file(run_dir / "extract" / "masks.safetensors")
    return {k: v.tolist() for k, v in t.items()}


@pytest.fixture(scope="module")
def partial_run(tmp_path_factory):
    """A finished Partial-LoRA run (threshold allocation) to match and to reuse."""
    d = tmp_path_factory.mktemp("snip") / "partial"
    return d, run(d)


def test_snip_rows_at_one_ratio_matched_to_a_partial_run(tmp_path, partial_run):
    p_dir, partial = partial_run
    res = run(tmp_path / "a", "adapter=snip", f"adapter.match.run={p_dir}")
    target = partial["params"]["adapter"]
    # one keep ratio everywhere (4 equal layers, r = 8): the closest is within one row and one column per layer
    assert abs(res["params"]["adapter"] - target) <= 4 * 2 * 8
    info = json.loads((tmp_path / "a" / "extract" / "masks.json").read_text())
    assert info["method"] == "snip" and "probe" not in res["stages"]
    assert info["snip"]["batches"] == 4 and info["snip"]["batch_size"] == 16 and info["snip"]["seed"] == 0
    assert len(info["snip"]["examples"]) == 64 == len(set(info["snip"]["examples"]))
    ratios = {la["ratio"] for la in info["layers"].values()}
    assert len(ratios) == 1  # uniform
    # a budget it can reach exactly: every layer keeps 10 of 32 rows and columns
    res = run(tmp_path / "b", "adapter=snip", "adapter.match.budget=640")
    assert res["params"]["adapter"] == 640
    # the same seed reads the same rows and keeps the same rows and columns; another seed's batches differ
    again = run(tmp_path / "c", "adapter=snip", "adapter.match.budget=640")
    assert _kept(tmp_path / "b") == _kept(tmp_path / "c")
    other = run(tmp_path / "d", "adapter=snip", "adapter.match.budget=640", "seed=1")
    assert json.loads((tmp_path / "d" / "extract"
                       / "masks.json").read_text())["snip"]["examples"] != info["snip"]["examples"]
    assert again["params"]["adapter"] == other["params"]["adapter"] == 640


def test_snip_rows_and_columns_differ_from_the_subspace_ones(tmp_path):
    run(tmp_path / "snip", "adapter=uniform", "adapter.sparsity=0.75", "adapter.mask.method=snip")
    run(tmp_path / "sub", "adapter=uniform", "adapter.sparsity=0.75", "adapter.mask.method=subspace")
    snip, sub = _kept(tmp_path / "snip"), _kept(tmp_path / "sub")
    assert snip.keys() == sub.keys()
    assert all(len(snip[k]) == len(sub[k]) for k in snip) and snip != sub


def test_snip_rows_at_partial_lora_allocation_reuse_its_probe_and_allocation(tmp_path, partial_run):
    p_dir, partial = partial_run
    lines = []
    res = run_pipeline(cfg_of(f"from_run={p_dir}", "adapter.mask.method=snip",
                              "adapter.allocation.search_masks=subspace"),
                       tmp_path / "s", echo=lines.append)
    assert any("reusing probe" in m for m in lines) and any("reusing allocate" in m for m in lines), lines
    # the same per-layer ratios, so the same row and column counts: exactly Partial-LoRA's budget
    assert res["params"]["adapter"] == partial["params"]["adapter"]
    ours = json.loads((tmp_path / "s" / "extract" / "masks.json").read_text())
    theirs = json.loads((p_dir / "extract" / "masks.json").read_text())
    assert ours["method"] == "snip" and theirs["method"] == "subspace"
    assert {k: (v["rows"], v["cols"]) for k, v in ours["layers"].items()} == \
           {k: (v["rows"], v["cols"]) for k, v in theirs["layers"].items()}
    assert "snip" in ours and "snip" not in theirs


def test_snip_settings_are_extract_settings_not_probe_settings():
    from partial_lora import rundir

    a = config.validate(cfg_of("adapter.mask.method=snip")).settings
    b = config.validate(cfg_of("adapter.mask.method=snip", "adapter.snip.batches=2")).settings
    assert rundir.changed(rundir.fingerprint(a, artifacts.PROBE), rundir.fingerprint(b, artifacts.PROBE)) == {}
    assert set(rundir.changed(rundir.fingerprint(a, artifacts.EXTRACT),
                              rundir.fingerprint(b, artifacts.EXTRACT))) == {"adapter.snip.batches"}
    # a search that ranks with SNIP allocates again when the batches change; one that ranks by subspace does not
    s1 = config.validate(cfg_of("adapter.mask.method=snip"))
    s2 = config.validate(cfg_of("adapter.mask.method=snip", "adapter.snip.batches=2"))
    assert rundir.allocation_settings(s1) != rundir.allocation_settings(s2)
    fixed = ["adapter.allocation.search_masks=subspace"]
    s3 = config.validate(cfg_of("adapter.mask.method=snip", *fixed))
    s4 = config.validate(cfg_of("adapter.mask.method=snip", "adapter.snip.batches=2", *fixed))
    assert rundir.allocation_settings(s3) == rundir.allocation_settings(s4)


def test_a_search_that_ranks_with_snip_runs_end_to_end(tmp_path):
    res = run(tmp_path, "adapter.mask.method=snip")
    assert res["status"] == "complete" and set(res["stages"]) == set(artifacts.STAGES)
    assert json.loads((tmp_path / "allocate" / "allocation.json").read_text())["settings"]["search_masks"] == "snip"
