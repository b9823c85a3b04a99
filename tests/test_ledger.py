"""experiments/ledger.py: the study's finished runs in a file that outlives the run dirs."""

import json

import pytest
from fixtures import load_script


def write_run(out, model, task, arm, seed, acc, status="complete"):
    run = out / "runs" / model / task / arm / f"seed{seed}"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({
        "status": status, "main_metric": "accuracy", "metrics": {"test_accuracy": acc, "val_accuracy": acc},
        "params": {"adapter": 10 if arm != "head" else 0}, "wall_s": {"retrain": 60.0, "evaluate": 6.0},
        "label": arm, "predictions": list(range(1000))}))
    return run


def test_merge_keeps_finished_runs_replaces_newer_and_the_table_reads_either(tmp_path):
    ledger, table = load_script("ledger"), load_script("offline_table")
    out, into = tmp_path / "study", tmp_path / "docs/results/runs.jsonl"
    for seed, (r8, r1) in enumerate([(0.80, 0.75), (0.82, 0.74)]):
        write_run(out, "minilm", "rt-polarity", "lora", seed, r8)
        write_run(out, "minilm", "rt-polarity", "lora-r1", seed, r1)
    write_run(out, "minilm", "rt-polarity", "head", 0, 0.6, status="running")  # unfinished: not recorded
    assert ledger.merge(out, into) == (4, 4)
    records = [json.loads(line) for line in into.read_text().splitlines()]
    assert {(r["arm"], r["seed"]) for r in records} == {("lora", 0), ("lora", 1), ("lora-r1", 0), ("lora-r1", 1)}
    assert all("predictions" not in r for r in records)
    assert ledger.merge(out, into) == (4, 0)  # nothing new
    from_dirs = table.table(out)
    assert "+0.0650" in from_dirs  # r=8 - r=1: mean of +0.05 and +0.08
    # The run dirs go; the ledger still gives the same table.
    import shutil

    shutil.rmtree(out / "runs")
    assert table.table(out, ledger.read(into)) == from_dirs
    # A newer record of a run replaces the old one.
    write_run(out, "minilm", "rt-polarity", "lora", 0, 0.9)
    assert ledger.merge(out, into) == (4, 1)
    assert ledger.read(into)[("minilm", "rt-polarity", "lora", 0)]["metrics"]["test_accuracy"] == 0.9


def test_a_damaged_ledger_line_is_one_message(tmp_path):
    ledger = load_script("ledger")
    bad = tmp_path / "runs.jsonl"
    bad.write_text('{"model": "minilm"}\n')
    with pytest.raises(SystemExit, match="line 1 is not a run record"):
        ledger.read(bad)
