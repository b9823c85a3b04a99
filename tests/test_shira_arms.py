"""PEFT's SHiRA with a mask plr draws at another run's budget: `adapter=shira_random` (Random Masking)
and `adapter=shira_snip` (SHiRA's SNIP mask), on tiny runs."""

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_module
from safetensors.torch import load_file
from torch import nn

from partial_lora.adapter import peft_baselines
from partial_lora.errors import PlrError
from partial_lora.pipeline.runner import run_pipeline
from partial_lora.training.recipe import lr_scale_auto

# tiny-bert, targets q and v: 2 layers x 2 modules, each 32 x 32
LAYERS, ENTRIES = 4, 32 * 32
PER_RANK = 4 * (32 + 32)
FAST = ["experiment=smoke", "trainer.max_steps=2"]


def run(run_dir, *overrides: str) -> dict:
    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        cfg = compose("config", overrides=[*FAST, *overrides])
    return run_pipeline(cfg, run_dir, echo=lambda s: None)


def test_random_entries_are_pefts_random_mask_at_its_own_size():
    from peft.tuners.shira.mask_functions import random_mask

    layer = nn.Linear(48, 32)
    for r, seed in ((1, 0), (2, 7), (5, 123)):
        theirs = torch.stack(torch.where(random_mask(layer, r, random_seed=seed) == 1))
        assert torch.equal(peft_baselines.random_entries(32, 48, r * (32 + 48), seed), theirs)
    assert peft_baselines.random_entries(32, 48, 37, 7).shape == (2, 37)  # and any other count


def test_shira_counts_split_the_target_exactly_at_one_density():
    shapes = {"a": (32, 32), "b": (32, 64), "c": (16, 16)}
    total = sum(o * i for o, i in shapes.values())
    for target in (10, 1001, 2048, total):
        counts = peft_baselines.shira_counts(target, shapes)
        assert sum(counts.values()) == target
        for k, (o, i) in shapes.items():
            assert abs(counts[k] - target * o * i / total) < 1  # the same density in every layer, to one entry
    for target, message in ((0, "outside what the adapted layers hold"), (total + 1, "outside"),
                            (2, "leaves layer c with none")):
        with pytest.raises(PlrError, match=message):
            peft_baselines.shira_counts(target, shapes)


@pytest.fixture(scope="module")
def partial_run(tmp_path_factory):
    """A finished Partial-LoRA run to match (uniform sparsity keeps it fast and above the floor)."""
    d = tmp_path_factory.mktemp("shira") / "partial"
    return d, run(d, "adapter.sparsity=0.7")


def _saved_entries(run_dir) -> dict[str, torch.Tensor]:
    """The SHiRA indices PEFT saved with the trained adapter, by module name."""
    saved = load_file(run_dir / "retrain" / "adapter.safetensors")
    return {k.split("base_model.model.", 1)[1].split(".shira_indices")[0]: v.long()
            for k, v in saved.items() if "shira_indices" in k}


@pytest.mark.parametrize("mask", ["random", "snip"])
def test_shira_arm_trains_exactly_the_matched_budget(tmp_path, partial_run, mask):
    p_dir, partial = partial_run
    target = partial["params"]["adapter"]
    res = run(tmp_path / "a", f"adapter=shira_{mask}", f"adapter.match.run={p_dir}")
    assert res["status"] == "complete" and list(res["stages"]) == ["extract", "retrain", "evaluate"]
    gap = (res["params"]["adapter"] - target) / target
    assert abs(gap) <= 0.02 and res["params"]["adapter"] == target  # measured gap: 0
    assert res["stages"]["extract"]["gap_pct"] == 0.0
    info = json.loads((tmp_path / "a" / "extract" / "masks.json").read_text())
    assert info["granularity"] == "shira" and info["method"] == mask and info["target"] == target
    assert sum(la["params"] for la in info["layers"].values()) == target
    assert len({round(la["density"], 3) for la in info["layers"].values()}) == 1  # one density (equal layers)
    assert ("snip" in info) == (mask == "snip")
    # PEFT trained the entries plr drew, saved them with the adapter, and evaluate reloaded them
    masks = load_file(tmp_path / "a" / "extract" / "masks.safetensors")
    saved = _saved_entries(tmp_path / "a")
    assert saved.keys() == set(info["layers"])
    assert all(torch.equal(saved[m], masks[f"{m}.entries"]) for m in saved)
    # the same lr rule as Partial-LoRA at that density (retrain.adapter_lr_scale=auto)
    density = target / res["params"]["dense_lora_same_rank"]
    assert math.isclose(res["stages"]["retrain"]["adapter_lr_scale"], lr_scale_auto(density))


def test_shira_masks_are_seeded_and_snip_is_not_random(tmp_path, partial_run):
    p_dir, _ = partial_run

    def entries(name, *overrides):
        run(tmp_path / name, *overrides, f"adapter.match.run={p_dir}")
        return {k: v.tolist() for k, v in load_file(tmp_path / name / "extract" / "masks.safetensors").items()}

    snip = entries("snip", "adapter=shira_snip")
    assert entries("snip2", "adapter=shira_snip") == snip
    assert entries("snip_seed1", "adapter=shira_snip", "seed=1") != snip  # other rows, another head
    rand = entries("random", "adapter=shira_random")
    assert rand != snip and entries("random_seed1", "adapter=shira_random", "seed=1") != rand
    # per-layer seeds: two equal-shaped layers do not share one random support
    assert len({json.dumps(v) for v in rand.values()}) == LAYERS


@pytest.mark.parametrize("overrides, expected", [
    (["adapter.match.budget=1001"], 1001),
    (["adapter.match.rank=8"], 8 * PER_RANK),  # the entries of adapter=shira (PEFT's own) at r = 8
])
def test_shira_arm_takes_a_budget_or_a_rank_as_its_target(tmp_path, overrides, expected):
    res = run(tmp_path, "adapter=shira_random", *overrides)
    assert res["params"]["adapter"] == expected


def test_pefts_own_shira_is_unchanged(tmp_path):
    res = run(tmp_path, "adapter=shira")
    assert list(res["stages"]) == ["retrain", "evaluate"] and res["params"]["adapter"] == 8 * PER_RANK


@pytest.mark.parametrize("args, message", [
    (["adapter.mask.method=snop"], "unknown adapter.mask.method 'snop'; use one of: subspace, random, probe_magnitude, "
                                   "snip"),
    (["adapter=snip", "adapter.snip.batches=0"], "adapter.snip.batches must be >= 1 batch"),
    (["adapter=snip", "adapter.snip.batch_size=0"], "adapter.snip.batch_size must be >= 1"),
    (["adapter=snip", "adapter.snip.batches=2.5"], "adapter.snip.batches=2.5 must be a whole number"),
    (["adapter=shira_snip", "adapter.snip.batches=-1", "adapter.match.budget=100"],
     "adapter.snip.batches must be >= 1"),
    (["adapter=shira_random"], "has none to match: set adapter.match.run=<a finished Partial-LoRA run dir>"),
    (["adapter=shira_snip"], "adapter=shira_snip (adapter.shira.mask=snip) trains SHiRA at another run's budget and "
                             "has none to match"),
    (["adapter=shira_random", "adapter.shira.mask=grad", "adapter.match.budget=100"],
     "unknown adapter.shira.mask 'grad'"),
    (["adapter=lora", "+adapter.shira.mask=random"], "adapter.shira.mask applies to SHiRA"),
    (["adapter=shira_random", "adapter.match.run=/no/such/run"], "adapter.match.run=/no/such/run has no results.json"),
    (["adapter=shira_random", "adapter.match.budget=100", "+adapter.peft.random_seed=3"],
     "adapter.peft.random_seed does not apply to adapter=shira_random"),
    (["adapter=shira_random", "adapter.match.budget=5000"],
     "a SHiRA budget of 5,000 entries is outside what the adapted layers hold (1 to 4,096)"),
])
def test_bad_input_of_the_new_arms_is_one_line(args, message, tmp_path, capsys, monkeypatch):
    """Exit code 2, one `plr: error:` line naming the fix, no stage done (as tests/test_reliability.py's battery)."""
    from partial_lora import cli

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    run_dir = tmp_path / "run"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "experiment=smoke", *args, f"run_dir={run_dir}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("plr: error:") and "\n" not in err, err
    assert message in err, err
    assert not run_dir.exists() or not any(run_dir.rglob("done"))


def test_matching_at_the_ledgers_minilm_budgets():
    """The matching rules at MiniLM's shapes (12 q/v layers of 384 x 384, r = 8) for every MiniLM Partial-LoRA
    budget in the study's ledger: SHiRA's split is exact; one keep ratio (adapter=snip, as adapter=uniform)
    lands on these budgets exactly too (each is a multiple of 192 = 12 layers x 2 sides x r)."""
    from pathlib import Path

    from partial_lora.allocation import allocators

    ledger = Path(__file__).resolve().parents[1] / "docs" / "results" / "study-runs.jsonl"
    rows = [json.loads(line) for line in ledger.read_text().splitlines() if line.strip()]
    budgets = sorted({r["params"]["adapter"] for r in rows if r["model"] == "minilm" and r["arm"] == "partial"})
    assert len(budgets) >= 10
    layers = [allocators.Layer(f"layer{i}", 384, 384) for i in range(12)]
    for b in budgets:
        assert sum(peft_baselines.shira_counts(b, {la.name: (384, 384) for la in layers}).values()) == b
        uniform = allocators.rescale_to_budget(allocators.uniform(layers, 8, 0.5), b).params()
        assert abs(uniform - b) <= 0.02 * b and (b % 192 or uniform == b)


def test_an_unfinished_shira_run_is_expected_to_run_extract_retrain_and_evaluate(tmp_path):
    """`plr report` lists what an unfinished run has still to do from its config: a SHiRA whose mask plr draws
    runs extract too (its mask), not only retrain and evaluate."""
    from partial_lora.report.runs import expected_stages

    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        for adapter, stages in (("adapter=shira_random", ["extract", "retrain", "evaluate"]),
                                ("adapter=shira", ["retrain", "evaluate"]), ("adapter=lora", ["retrain", "evaluate"])):
            cfg = compose("config", overrides=[*FAST, adapter, "adapter.match.budget=300"] if "random" in adapter
                          else [*FAST, adapter])
            assert expected_stages(None, cfg, tmp_path) == stages, adapter
