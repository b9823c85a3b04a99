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


def test_predictions_outlive_the_run_dirs_and_restore_gives_the_claims_table(tmp_path):
    import numpy as np
    import pandas as pd

    from partial_lora import study

    ledger = load_script("ledger")
    out, into = tmp_path / "study", tmp_path / "docs/results/runs.jsonl"
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    for seed in (0, 1):
        for arm, wrong in (("lora", 20), ("partial", 30)):  # partial errs on 10 more test examples
            pred = labels.copy()
            pred[:wrong] = 1 - pred[:wrong]
            run = write_run(out, "minilm", "rt-polarity", arm, seed, float((pred == labels).mean()))
            (run / "evaluate").mkdir()
            val = pd.DataFrame({"split": "val", "index": range(50), "label": 0, "prediction": 0})
            test = pd.DataFrame({"split": "test", "index": range(200), "label": labels, "prediction": pred})
            pd.concat([val, test]).to_parquet(run / "evaluate/predictions.parquet", index=False)
    assert ledger.merge(out, into) == (4, 4)
    kept = pd.read_parquet(into.parent / "predictions/minilm/rt-polarity/partial/seed1.parquet")
    assert set(kept["split"]) == {"test"} and len(kept) == 200  # the test split only
    before = study.claims.claim_rows(study.claims.collect(out), n_boot=200)
    import shutil

    shutil.rmtree(out)
    dest = tmp_path / "restored"
    assert ledger.restore(into, dest) == 4
    after = study.claims.claim_rows(study.claims.collect(dest), n_boot=200)
    c3 = [r for r in after if r.claim.key == "C3"]
    assert len(c3) == 1 and c3[0].comparison.mean == pytest.approx(-5.0)  # points: 10 of 200 examples
    assert [(r.claim.key, r.comparison.mean, r.comparison.low) for r in after] == \
        [(r.claim.key, r.comparison.mean, r.comparison.low) for r in before]
    assert ledger.merge(dest, into) == (4, 0)  # restored dirs are not merged back as new runs
    with pytest.raises(SystemExit, match="real run dir"):
        write_run(dest, "minilm", "rt-polarity", "head", 0, 0.6)
        (dest / "runs/minilm/rt-polarity/head/seed0").rename(dest / "runs/minilm/rt-polarity/lora/seed9")
        rec = json.loads(into.read_text().splitlines()[0])
        rec["seed"] = 9
        into.write_text(into.read_text() + json.dumps(rec) + "\n")
        ledger.restore(into, dest)


def test_tuned_runs_and_their_peak_memory_go_through_the_ledger_and_the_choice_reads_them_back(tmp_path):
    """A tuned run's arm dir (`<arm>+<key>+<value>`) is an arm like any other in the ledger; its record keeps the
    retrain's peak memory, and the restored dirs give the same choice."""
    import pandas as pd

    from partial_lora.study import choice
    from partial_lora.study.claims import collect
    from partial_lora.study.run import RESTORED

    ledger = load_script("ledger")
    assert ledger.RESTORED == RESTORED  # the mark the study reads is the one the ledger writes
    out, into = tmp_path / "study", tmp_path / "docs/results/runs.jsonl"
    for arm, acc in (("partial", 0.7), ("partial+retrain.lr+0.002", 0.72), ("partial+retrain.lr+0.01", 0.8)):
        run = write_run(out, "minilm", "rt-polarity", arm, 0, acc)
        results = json.loads((run / "results.json").read_text())
        (run / "results.json").write_text(json.dumps({**results, "peak_memory": {"mb": 812.5, "measure": "max_rss"}}))
        (run / "evaluate").mkdir()
        pd.DataFrame({"split": "test", "index": range(4), "label": [0, 1, 0, 1],
                      "prediction": [0, 1, 1, 1]}).to_parquet(
            run / "evaluate/predictions.parquet", index=False)
    assert ledger.merge(out, into) == (3, 3)
    rec = ledger.read(into)[("minilm", "rt-polarity", "partial+retrain.lr+0.01", 0)]
    assert rec["peak_memory"] == {"mb": 812.5, "measure": "max_rss"}
    assert ledger.restore(into, tmp_path / "restored") == 3
    for where in (out, tmp_path / "restored"):
        (found,) = choice.choices(collect(where))
        assert (found.arm, found.key, found.value, found.scores, found.shared) == (
            "partial", "retrain.lr", "0.01", {"0.002": 0.72, "0.01": 0.8}, 0.7)
