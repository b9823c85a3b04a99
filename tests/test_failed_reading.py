"""A failed reading is never silent (issue 37 item 4): an allocation with every layer at the grid's
floor, or a validation score near the constant-prediction level, is one line of the run's results
table, results.json and log."""

import json
import logging
import math

import datasets
import numpy as np
import pytest
from hydra import compose, initialize_config_module

from partial_lora.pipeline.results import format_results
from partial_lora.pipeline.runner import run_pipeline
from partial_lora.training import failed_reading


def test_constant_level_is_the_best_score_of_a_constant_prediction():
    labels = np.array([0, 0, 0, 1, 2])
    assert failed_reading.constant_level(3, labels, "accuracy") == pytest.approx(0.6)       # the majority class
    assert failed_reading.constant_level(3, labels,
                                         "macro_f1") == pytest.approx(0.75 / 3)  # F1 0.75 on class 0, 0 on the others
    assert failed_reading.constant_level(3, labels, "mcc") == 0.0
    positive = np.array([1] * 7 + [0] * 3)
    assert failed_reading.constant_level(2, positive, "f1") == pytest.approx(2 * 0.7 / 1.7)  # always positive: 2p/(1+p)
    assert failed_reading.constant_level(1, np.array([0.5, 1.0, 2.0]),
                                         "pearson") == 0.0     # regression: no correlation
    assert failed_reading.constant_level(1, np.array([0.5, 1.0]), "accuracy") is None
    assert failed_reading.constant_level(4, np.array([0, 1]), "log_likelihood") is None      # generation: not checked


def test_near_is_two_standard_errors_of_the_level():
    assert failed_reading.tolerance("accuracy", 0.55, 1000) == pytest.approx(2 * math.sqrt(0.55 * 0.45 / 1000))  # 0.031
    assert failed_reading.tolerance("accuracy", 1.0, 1000) == 0.01  # at least 0.01
    assert failed_reading.tolerance("pearson", 0.0, 400) == pytest.approx(0.1)
    # the case: 0.55 majority class; 0.57 on 1,000 examples is near it, 0.66 is not
    assert failed_reading.constant_line("accuracy", 0.57, 0.55, 1000, 5e-3, 2.28, sparse=True) is not None
    assert failed_reading.constant_line("accuracy", 0.66, 0.55, 1000, 5e-3, 2.28, sparse=True) is None
    assert failed_reading.constant_line("accuracy", None, 0.55, 1000, 5e-3, 1.0, sparse=False) is None  # not evaluated
    line = failed_reading.constant_line("mcc", 0.05, 0.0, 200, 5e-3, 1.0, sparse=False)
    assert line is not None and "a constant prediction's score" in line and "lr_scale_per_layer" not in line


def test_floor_line_only_for_a_search_that_sent_every_layer_to_the_floor():
    grid = [1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125]
    al = {"allocator": "threshold", "floor_share": 1.0, "target": 0.18, "joint_accuracy": 0.2}
    line = failed_reading.floor_line(al, grid, 2304, "probe")
    assert "every layer ended at the grid's floor (keep ratio 0.03125, 2,304 adapter entries)" in line
    assert "adapter.allocation.relative_to=gain" in line and "\n" not in line
    assert "adapter.allocation.tau" in failed_reading.floor_line(al, grid, 2304, "gain")
    assert failed_reading.floor_line({**al, "floor_share": 11 / 12}, grid, 2304, "probe") is None
    assert failed_reading.floor_line({**al, "allocator": "uniform"}, grid, 2304,
                                     "probe") is None  # a ratio, not a finding
    assert failed_reading.floor_line(al, [1.0], 2304, "probe") is None                            # nothing searched


# --- tiny runs that trigger each line, and ones that do not -----------------------------------------
def run(run_dir, *overrides: str) -> dict:
    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", *overrides])
    return run_pipeline(cfg, run_dir, echo=lambda s: None)


def _said_everywhere(run_dir, res, caplog, start: str) -> str:
    """The line starting with `start`: in results.json, the results table and the log, once each."""
    [line] = [x for x in res["failed_reading"] if x.startswith(start)]
    assert json.loads((run_dir / "results.json").read_text())["failed_reading"] == res["failed_reading"]
    assert f"  ! {line}" in format_results(res).splitlines()
    assert [r.getMessage() for r in caplog.records if r.name == "plr"].count(line) == 1
    return line


def test_every_layer_at_the_floor_is_said(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="plr")
    # τ = 0.01: the target is met by any mask, so the search sends every layer to the floor
    res = run(tmp_path / "floor", "trainer.max_steps=2", "adapter.allocation.tau=0.01")
    assert res["allocation"]["floor_share"] == 1.0
    line = _said_everywhere(tmp_path / "floor", res, caplog, "failed reading: every layer ended at the grid's floor")
    assert f"{res['params']['adapter']:,} adapter entries" in line
    # one small ratio everywhere by choice (adapter=uniform) is not a failed search
    res = run(tmp_path / "uniform", "trainer.max_steps=2", "adapter=uniform", "adapter.sparsity=0.97")
    assert not any("floor" in x for x in res["failed_reading"])


def _learnable_sst2(root):
    """An SST-2-shaped local copy a tiny random BERT learns in seconds: "good" or "bad" gives the
    label; 70% positive, so always answering "positive" scores 0.7."""
    rng = np.random.default_rng(0)
    feats = datasets.Features({"sentence": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["negative", "positive"]),
                               "idx": datasets.Value("int32")})
    words = "the a cat dog sat ran on under mat tree".split()
    (root / "sst2").mkdir(parents=True)
    for split, n in (("train", 200), ("validation", 40), ("test", 20)):
        labels = (np.arange(n) % 10 < 7).astype(int)
        text = [" ".join([*rng.choice(words, 5), "good" if y else "bad", *rng.choice(words, 3)]) for y in labels]
        datasets.Dataset.from_dict({"sentence": text, "label": labels.tolist(), "idx": list(range(n))},
                                   features=feats).to_parquet(root / "sst2" / f"{split}-00000-of-00001.parquet")
    return root


def test_a_score_near_the_constant_prediction_level_is_said(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="plr")
    task = ["task=sst2", f"task.path={_learnable_sst2(tmp_path / 'data')}", "adapter=lora",
            "task.max_train_samples=200"]
    # a learning rate of ~0: nothing moves from the fresh head's answers
    res = run(tmp_path / "lr0", *task, "trainer.epochs=1", "trainer.lr=1e-12", "trainer.head_lr=1e-12")
    ev = res["stages"]["evaluate"]
    assert ev["constant_level"] == pytest.approx(0.7) and ev["constant_n"] == 20
    assert res["metrics"]["val_accuracy"] <= 0.7 + failed_reading.tolerance("accuracy", 0.7, 20)
    line = _said_everywhere(tmp_path / "lr0", res, caplog, "failed reading: validation accuracy")
    assert "trainer.lr 1e-12" in line and "what always predicting one class scores on the 20 validation" in line
    # the same run at a learning rate that learns the task: no line
    res = run(tmp_path / "learns", *task, "trainer.epochs=3", "trainer.lr=0.05", "trainer.head_lr=0.05")
    assert res["metrics"]["val_accuracy"] > 0.7 + failed_reading.tolerance("accuracy", 0.7, 20)
    assert res["failed_reading"] == []
    assert "failed reading" not in format_results(res)
