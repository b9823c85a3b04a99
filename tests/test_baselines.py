"""Baselines at matched budgets: lora_matched, uniform, and the PEFT-backed methods."""

import math

import pytest
from hydra import compose, initialize_config_module
from safetensors.torch import load_file

from partial_lora import config
from partial_lora.errors import PlrError
from partial_lora.pipeline.runner import run_pipeline

# tiny-bert, targets q and v: 2 layers x 2 modules x (32 + 32) = 256 parameters per unit of rank
PER_RANK = 256
FAST = ["experiment=smoke", "trainer.max_steps=2"]


def cfg_of(*overrides: str):
    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        cfg = compose("config", overrides=[*FAST, *overrides])
    config.validate(cfg)
    return cfg


def run(tmp_path, *overrides: str) -> dict:
    return run_pipeline(cfg_of(*overrides), tmp_path, echo=lambda s: None)


@pytest.mark.parametrize("budget", [300, 1000, 1900, 5000])
def test_lora_matched_hits_the_budget_within_one_rank_step(tmp_path, budget):
    res = run(tmp_path, "adapter=lora_matched", f"adapter.match.budget={budget}")
    r = res["adapter"]["r"]
    assert res["params"]["adapter"] == r * PER_RANK
    assert abs(res["params"]["adapter"] - budget) <= PER_RANK / 2  # the closest rank
    assert r == max(1, round(budget / PER_RANK))


def test_lora_matched_to_a_partial_run_and_uniform_matched_to_it(tmp_path):
    partial = run(tmp_path / "partial", "adapter.sparsity=0.7")
    target = partial["params"]["adapter"]
    matched = run(tmp_path / "matched", "adapter=lora_matched", f"adapter.match.run={tmp_path / 'partial'}")
    assert abs(matched["params"]["adapter"] - target) <= PER_RANK / 2
    uniform = run(tmp_path / "uniform", "adapter=uniform", f"adapter.match.run={tmp_path / 'partial'}")
    # one ratio everywhere: within one row or column per layer (r = 8 parameters each) of the target
    assert abs(uniform["params"]["adapter"] - target) <= 4 * 8
    assert uniform["adapter"]["mask"]["method"] == "random" and "probe" not in uniform["stages"]


def test_partial_at_the_budget_of_a_lower_rank(tmp_path):
    res = run(tmp_path, "adapter.sparsity=0.5", "adapter.r=16", "adapter.match.rank=4")
    assert res["adapter"]["r"] == 16 and abs(res["params"]["adapter"] - 4 * PER_RANK) <= 4 * 16


@pytest.mark.parametrize("overrides, message", [
    (["adapter=lora_matched"], "needs a target"),
    (["adapter=lora_matched", "adapter.match.budget=100", "adapter.match.rank=2"], "one of run, budget or rank"),
    (["adapter=lora_matched", "adapter.match.budget=-3"], "positive integer"),
    (["adapter=uniform", "adapter.match.budget=500", "adapter.allocation.budget=0.5"], "keep one"),
    (["adapter=peft_lora", "adapter.sparsity=0.5"], "dense PEFT baseline"),
])
def test_bad_baseline_settings_are_one_line_errors(overrides, message):
    with pytest.raises(PlrError, match=message) as e:
        cfg_of(*overrides)
    assert "\n" not in str(e.value)


def test_match_run_must_be_a_finished_run(tmp_path):
    with pytest.raises(PlrError, match="not a finished plr run"):
        run(tmp_path / "x", "adapter=lora_matched", f"adapter.match.run={tmp_path}")


@pytest.mark.parametrize("method, params", [
    ("peft_lora", 8 * PER_RANK),                       # the same count as plr's LoRA at r=8
    ("dora", 8 * PER_RANK + 4 * 32),                   # + one magnitude vector per layer
    ("adalora", None),                                 # rank budget changes during training
    ("vera", 4 * (256 + 32)),                          # per layer: d (256) and b (d_out) vectors
    ("shira", 8 * PER_RANK),                           # as many entries as a rank-8 LoRA
])
def test_peft_baseline_trains_two_steps_and_reloads(tmp_path, method, params):
    res = run(tmp_path, f"adapter={method}")
    assert res["status"] == "complete" and res["stages"]["retrain"]["steps"] == 2
    assert math.isfinite(res["metrics"]["test_accuracy"])
    assert res["params"]["dense_lora_same_rank"] == 8 * PER_RANK
    if params is not None:
        assert res["params"]["adapter"] == params
    else:  # AdaLoRA: pruned from init_r=12 towards target_r=8 on average
        assert 0 < res["params"]["adapter"]
    saved = load_file(tmp_path / "retrain" / "adapter.safetensors")
    assert saved and all(k.startswith("base_model.") for k in saved)  # PEFT's own keys
    assert "classifier.weight" in load_file(tmp_path / "retrain" / "head.safetensors")


def test_peft_baselines_adapt_whole_modules_of_timm_vits(tmp_path):
    with pytest.raises(PlrError, match=r"set adapter.targets=\[qkv\]"):
        run(tmp_path / "a", "experiment=smoke-vision", "adapter=peft_lora")
    res = run(tmp_path / "b", "experiment=smoke-vision", "adapter=peft_lora", "adapter.targets=[qkv]")
    assert res["status"] == "complete" and res["params"]["adapter"] == 8 * 2 * (32 + 96)
