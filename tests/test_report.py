"""`plr report`: discovery, status of unfinished runs, grouping, mean ± std, and the files it writes.

Run dirs are generated here (config, stage markers, results.json); nothing is trained.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from partial_lora import report
from partial_lora.cli import main
from partial_lora.errors import PlrError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
SPARSE = ["probe", "allocate", "extract", "retrain", "evaluate"]
DENSE = ["retrain", "evaluate"]

# test accuracy per (task, label) over seeds 0, 1, 2
ACC = {("t1", "a"): [0.90, 0.92, 0.94], ("t1", "b"): [0.80, 0.80, 0.80],
       ("t2", "a"): [0.70, 0.75, 0.80], ("t2", "b"): [0.60, 0.65, 0.70]}
PARAMS = {"a": 100, "b": 800}


def make_run(run_dir: Path, *, task: str = "t1", label: str | None = "a", seed: int = 0, acc: float = 0.9,
             adapter_params: int = 100, sparsity: object = "auto", done: list[str] | None = None,
             results: bool = True, label_in_results: bool = True, macro_f1: bool = True,
             extra_metrics: dict | None = None, model: str = "tiny-bert") -> Path:
    """A run dir as `plr train` leaves it: config, stage dirs (done markers for `done`), results.json."""
    dense = sparsity in (0, 0.0)
    cfg = {"seed": seed, "label": label if label is not None else "${adapter.name}", "name": f"{task}-tiny",
           "run_dir": "${out_root}/${now:%Y}",  # needs Hydra's resolver: must not break the report
           "task": {"name": task, "metric": "accuracy", "metrics": ["accuracy", "macro_f1"]},
           "model": {"name": model},
           "adapter": {"name": "lora" if dense else "partial", "r": 8, "sparsity": sparsity,
                       "allocation": {"allocator": "threshold"}, "mask": {"method": "subspace"}}}
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(cfg), run_dir / ".hydra" / "config.yaml")
    stages = DENSE if dense else SPARSE
    done = stages if done is None else done
    for stage in stages:
        (run_dir / stage).mkdir()
        if stage in done:
            (run_dir / stage / "metrics.json").write_text("{}")
            (run_dir / stage / "done").write_text("")
    if results:
        metrics = {"val_accuracy": acc, "val_loss": 0.3, "test_accuracy": acc, "test_loss": 0.3, "test_examples": 50,
                   **({"test_macro_f1": acc - 0.01} if macro_f1 else {}), **(extra_metrics or {})}
        res = {"status": "complete", "run_dir": str(run_dir), "name": cfg["name"], "seed": seed,
               "model": model, "task": task,
               "adapter": {"name": cfg["adapter"]["name"], "method": cfg["adapter"]["name"], "r": 8,
                           "sparsity": sparsity},
               "main_metric": "accuracy", "task_metrics": ["accuracy", "macro_f1"], "metrics": metrics,
               "params": {"adapter": adapter_params, "dense_lora_same_rank": 800, "head": 10,
                          "reduction_pct": None if dense else 100 * (1 - adapter_params / 800)},
               "stages": {s: {} for s in stages}}
        if label_in_results:
            res["label"] = label
        (run_dir / "results.json").write_text(json.dumps(res))
    return run_dir


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """2 tasks × 2 labels × 3 seeds (complete), one more label on t1 only (1 seed), and broken runs."""
    root = tmp_path / "outputs"
    for (task, label), accs in ACC.items():
        for seed, acc in enumerate(accs):
            make_run(root / task / label / f"seed{seed}", task=task, label=label, seed=seed, acc=acc,
                     adapter_params=PARAMS[label], macro_f1=task == "t1",
                     extra_metrics={"test_mismatched_accuracy": acc - 0.1, "test_mismatched_loss": 0.5,
                                    "test_mismatched_examples": 40} if task == "t2" else None)
    make_run(root / "t1" / "c" / "seed0", label="c", acc=0.99, adapter_params=400)
    # killed during retrain: no retrain/done, no evaluate/done, no results.json
    make_run(root / "t1" / "a" / "seed3", seed=3, acc=0.1, done=["probe", "allocate", "extract"], results=False)
    broken = make_run(root / "t1" / "a" / "seed4", seed=4, acc=0.1)
    (broken / "results.json").write_text('{"status": "compl')
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_report_csv_has_exact_means_and_stds(runs, tmp_path):
    report.write(report.build([str(runs)]), tmp_path / "rep")
    rows = {(r["task"], r["label"]): r for r in read_csv(tmp_path / "rep" / "report.csv")}
    assert set(rows) == {*ACC, ("t1", "c")}
    a1 = rows["t1", "a"]
    assert float(a1["accuracy_mean"]) == 0.92 and float(a1["accuracy_std"]) == 0.02
    assert float(a1["macro_f1_mean"]) == 0.91 and float(a1["macro_f1_std"]) == 0.02
    assert a1["n_seeds"] == "3" and a1["seeds"] == "0 1 2" and a1["model"] == "tiny-bert" and a1["r"] == "8"
    assert float(a1["adapter_params_mean"]) == 100 and float(a1["reduction_pct_mean"]) == 87.5
    assert float(rows["t2", "a"]["accuracy_mean"]) == 0.75 and float(rows["t2", "a"]["accuracy_std"]) == 0.05
    assert float(rows["t1", "b"]["accuracy_std"]) == 0.0
    # extra eval sets (MNLI's mismatched) are a metric column of their task only
    assert float(rows["t2", "b"]["mismatched_accuracy_mean"]) == 0.55
    assert rows["t1", "a"]["mismatched_accuracy_mean"] == ""
    assert not any(k.startswith(("loss", "examples", "mismatched_loss", "mismatched_examples")) for k in a1)
    # a single seed: no std
    assert rows["t1", "c"]["n_seeds"] == "1" and rows["t1", "c"]["accuracy_std"] == ""


def test_markdown_summary_and_mean_over_tasks(runs):
    md = report.markdown(report.build([str(runs)]))
    assert "| method | t1 | t2 | mean over tasks | adapter params |" in md
    assert "| a | 0.9200 ± 0.0200 | 0.7500 ± 0.0500 | 0.8350 | 100 |" in md
    assert "| b | 0.8000 ± 0.0000 | 0.6500 ± 0.0500 | 0.7250 | 800 |" in md
    assert "| c | 0.9900 | - | 0.9900 (1/2 tasks) | 400 |" in md
    assert "15 runs: 13 complete, 2 incomplete or failed" in md
    assert "| t1 | a | tiny-bert | 8 | 3 | 0, 1, 2 | 0.9200 ± 0.0200 | 0.9100 ± 0.0200 | - | 100 | 87.5% |" in md


def test_unfinished_runs_are_listed_not_averaged(runs, tmp_path):
    rep = report.build([str(runs)])
    by_seed = {r.seed: r for r in rep.runs if r.task == "t1" and r.label == "a"}
    killed, broken = by_seed[3], by_seed[4]
    assert killed.status == "incomplete" and killed.missing == ["retrain", "evaluate"]
    assert broken.status == "failed" and broken.reason == "unreadable results.json"
    assert rep.group("t1", "a").seeds == [0, 1, 2]
    md = report.markdown(rep)
    section = md.split("## Incomplete or failed runs")[1]
    assert "| incomplete | missing: retrain, evaluate; no results.json |" in section
    assert "| failed | unreadable results.json |" in section
    report.write(rep, tmp_path / "rep")
    rows = {r["run_dir"]: r for r in read_csv(tmp_path / "rep" / "runs.csv")}
    assert len(rows) == 15
    row = next(r for d, r in rows.items() if d.endswith("seed3"))
    assert row["status"] == "incomplete" and row["missing_stages"] == "retrain evaluate" and row["seed"] == "3"


def test_stages_expected_by_kind_and_unreadable_config(tmp_path):
    make_run(tmp_path / "dense", sparsity=0.0, done=["retrain"], results=False, label=None)
    uniform = make_run(tmp_path / "uniform", sparsity=0.5, done=[], results=False)
    (uniform / "probe").rmdir()  # a uniform run has no probe
    bad = make_run(tmp_path / "bad", results=False)
    (bad / ".hydra" / "config.yaml").write_text("seed: [1, 2\n  label: {")
    runs = {r.run_dir.name: r for r in report.build([str(tmp_path)]).runs}
    assert runs["dense"].missing == ["evaluate"] and runs["dense"].label == "lora"  # ${adapter.name} resolved
    assert runs["uniform"].missing == ["allocate", "extract", "retrain", "evaluate"]
    assert runs["bad"].status == "failed" and runs["bad"].reason == "unreadable .hydra/config.yaml"


def test_label_falls_back_to_adapter_name_and_repeated_seeds_are_noted(tmp_path):
    for method in ("partial", "partial-rand"):
        make_run(tmp_path / method, label="partial", label_in_results=False)
    rep = report.build([str(tmp_path)])
    assert [(g.label, g.seeds) for g in rep.groups] == [("partial", [0, 0])]
    assert any("seed(s) 0 repeat" in n for n in rep.notes) and "## Notes" in report.markdown(rep)


def test_globs_multirun_roots_and_dedup(runs, tmp_path):
    sweep = tmp_path / "multirun" / "t1-tiny" / "2026-01-01_00-00-00"
    for i in range(3):
        make_run(sweep / str(i), seed=i, label="sweep")
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    dirs, unmatched = report.find_run_dirs([str(tmp_path / "multirun")])
    assert [d.name for d in dirs] == ["0", "1", "2"] and unmatched == []
    dirs, _ = report.find_run_dirs([str(runs / "t*" / "a" / "seed0")])
    assert sorted(d.parent.parent.name for d in dirs) == ["t1", "t2"]
    dirs, _ = report.find_run_dirs([str(runs / "**" / "results.json")])
    assert len(dirs) == 14  # every run with a results.json, the corrupt one included
    dirs, unmatched = report.find_run_dirs([str(runs), str(runs / "t1"), str(runs / "t1" / "a" / "seed0"), "nope/*"])
    assert len(dirs) == 15 and unmatched == ["nope/*"]


def test_nothing_matched_or_unknown_metric_raises(runs, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PlrError, match="'does/not/exist' does not exist"):
        report.build(["does/not/exist"])
    for paths in ([str(tmp_path / "empty")], [str(tmp_path / "nope*")]):
        with pytest.raises(PlrError, match="no run dirs found"):
            report.build(paths)
    with pytest.raises(PlrError, match="unknown metric 'f1'.*choose one of: accuracy, macro_f1, mismatched_accuracy"):
        report.build([str(runs)], metric="f1")


def test_metric_option_switches_the_summary(runs):
    rep = report.build([str(runs)], metric="macro_f1")
    assert rep.summary == {"t1": "test_macro_f1", "t2": None}
    md = report.markdown(rep)
    assert "Metric: test_macro_f1 (not reported by t2)." in md
    assert "| a | 0.9100 ± 0.0200 | 0.9100 | 100 |" in md


def test_outputs_written_and_png(runs, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", str(runs), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    for name in ("report.md", "report.csv", "runs.csv", "report.png"):
        assert (out / name).is_file(), name
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stdout.startswith((out / "report.md").read_text())
    assert stdout.rstrip().splitlines()[-1] == f"[plr] report: wrote {out}/report.md, report.csv, runs.csv, report.png"
    assert not list(out.glob(".*.tmp"))


def test_no_complete_run_writes_tables_but_no_png(tmp_path):
    make_run(tmp_path / "runs" / "x", done=["probe"], results=False)
    out = tmp_path / "rep"
    (out).mkdir()
    (out / "report.png").write_bytes(b"stale")
    written = report.write(report.build([str(tmp_path / "runs")]), out)
    assert [p.name for p in written] == ["report.md", "report.csv", "runs.csv"]
    assert not (out / "report.png").exists()
    assert "No complete runs yet." in (out / "report.md").read_text()


def _plr(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "partial_lora.cli", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=120)


def test_cli_report_subprocess(runs, tmp_path):
    res = _plr("report", str(runs), "--out", "rep", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("# plr report") and (tmp_path / "rep" / "report.md").is_file()
    assert res.stdout.rstrip().endswith("[plr] report: wrote rep/report.md, report.csv, runs.csv, report.png")


@pytest.mark.parametrize("args", [["report", "no/such/dir"], ["report"], ["report", ".", "--bogus"]])
def test_cli_report_errors_are_one_line(tmp_path, args):
    res = _plr(*args, cwd=tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("plr: error: "), res.stderr


def test_one_method_on_two_backbones_stays_two_rows(tmp_path):
    for model, acc in (("vit-b", 0.9), ("vit-b-timm", 0.8)):
        make_run(tmp_path / model, model=model, acc=acc)
    rep = report.build([str(tmp_path)])
    assert [(g.label, g.stat("test_accuracy").mean)
            for g in rep.groups] == [("a · vit-b", 0.9), ("a · vit-b-timm", 0.8)]


def test_failed_sweep_job_shows_its_error(tmp_path):
    run = make_run(tmp_path / "r", done=[], results=False)
    (run / "error.txt").write_text("CUDA out of memory\ntraceback ...")
    (r,) = report.build([str(tmp_path)]).runs
    assert r.status == "failed" and r.reason == "CUDA out of memory" and r.missing == SPARSE
