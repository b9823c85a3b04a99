"""experiments/probe_patience.py: early stopping of the probe replayed from its validation curve."""

import json

import pytest
from fixtures import load_script


def write_curve(out, arm, seed, scores, model="minilm", task="rt-polarity", finished=True):
    probe = out / "runs" / model / task / arm / f"seed{seed}" / "probe"
    probe.mkdir(parents=True)
    lines = []
    for epoch, score in enumerate(scores):
        lines.append(json.dumps({"step": epoch * 5 + 1, "epoch": epoch, "loss": 0.7, "lr": 1e-3}))  # a step record
        # the metric the probe selects on is not the first `val_` key: the replay must read it by name
        lines.append(json.dumps({"step": epoch * 5 + 5, "epoch": epoch, "val_loss": 1.0 - score,
                                 "val_macro_f1": 0.1, "val_accuracy": score}))
    (probe / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if finished:
        (probe / "metrics.json").write_text(json.dumps({"metric": "accuracy", "best_epoch": scores.index(max(scores))}))


@pytest.mark.parametrize("scores,patience,kept,ran", [
    ([0.5, 0.6, 0.6, 0.6, 0.9], 2, 1, 4),   # two epochs without a strict improvement: stops, misses epoch 4
    ([0.5, 0.6, 0.6, 0.6, 0.9], 3, 4, 5),   # three: reaches the best
    ([0.5, 0.5, 0.7, 0.7, 0.7], 1, 0, 2),   # a tie is no improvement
    ([0.5, 0.6, 0.7], 1, 2, 3),             # always improving: runs to the end
])
def test_stop_keeps_the_first_best_epoch_before_the_patience_runs_out(scores, patience, kept, ran):
    assert load_script("probe_patience").stop(scores, patience) == (kept, ran)


def test_table_counts_distinct_probes_and_the_epochs_saved(tmp_path, capsys):
    pp = load_script("probe_patience")
    out = tmp_path / "study"
    write_curve(out, "partial", 0, [0.5, 0.6, 0.6, 0.6, 0.9])  # best 4
    write_curve(out, "partial@lr4", 0, [0.5, 0.6, 0.6, 0.6, 0.9])  # the same probe again: counted once
    write_curve(out, "partial", 1, [0.5, 0.7, 0.6, 0.6, 0.6])  # best 1
    (out / "runs/minilm/rt-polarity/uniform/seed0").mkdir(parents=True)  # no probe: skipped
    write_curve(out, "partial", 2, [0.5, 0.9], finished=False)  # a probe still running: skipped
    assert pp.main(["--out", str(out), "--patience", "2", "3"]) == 0
    text = capsys.readouterr().out
    assert "2 probe curves, 10 probe epochs in all; the full probe's best epoch: 4, 1" in text
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[2:]}
    assert rows["2"][:3] == ["1", "1", "2"]  # seed 0 stops at epoch 3 on the wrong epoch; seed 1 at 3 on the right one
    assert rows["3"][:3] == ["2", "0", "0"]  # both reach their last epoch before three epochs without a gain


def test_no_curves_or_a_bad_patience_is_one_line(tmp_path):
    pp = load_script("probe_patience")
    with pytest.raises(SystemExit, match="no finished probe under"):
        pp.main(["--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="whole numbers >= 1"):
        pp.main(["--out", str(tmp_path), "--patience", "0"])
