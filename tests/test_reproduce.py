"""The reproduction driver behind `make reproduce-vision/glue/commonsense`: its commands, and a real tiny sweep."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures import load_script, write_glue

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}


def load_reproduce():
    return load_script("reproduce")


def test_dry_run_deals_tasks_to_gpus_and_prints_the_report_command(capsys):
    rep = load_reproduce()
    assert rep.main(["vision", "--dry-run", "--gpus", "0,1,2", "--out", "out"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[reproduce] vision: 48 runs on 3 sweep(s)")
    sweeps = [ln for ln in lines if "train -m" in ln]
    assert [ln.split()[0] for ln in sweeps] == ["CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1", "CUDA_VISIBLE_DEVICES=2"]
    assert "task=cifar100,flowers102,eurosat " in sweeps[0] and "task=dtd,svhn " in sweeps[2]
    for ln in sweeps:
        assert "experiment=vtab" in ln and "adapter=lora,partial" in ln and "seed=0,1,2" in ln and "model=vit-b" in ln
        assert "hydra.sweep.dir=out/runs" in ln and "'hydra.sweep.subdir=${task.name}/${label}/seed${seed}'" in ln
    assert lines[-1].endswith("report out/runs --out out/report")
    assert not Path("out").exists()  # a dry run writes nothing


def test_glue_sweeps_the_per_task_experiments(capsys):
    rep = load_reproduce()
    assert rep.main(["glue", "--dry-run", "--tasks", "rte,stsb", "--seeds", "0", "--", "trainer.num_workers=2"]) == 0
    sweep = next(ln for ln in capsys.readouterr().out.splitlines() if "train -m" in ln)
    assert "experiment=glue-rte,glue-stsb" in sweep and "seed=0 " in sweep and sweep.endswith("trainer.num_workers=2 "
                                                                                                "> outputs/reproduce-glue/logs/gpu0.log 2>&1")


def test_commonsense_is_one_multi_task_run_per_method_and_seed_with_seeds_dealt_to_gpus(capsys):
    rep = load_reproduce()
    assert rep.main(["commonsense", "--dry-run", "--gpus", "0,1", "--out", "out"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[reproduce] commonsense: 6 runs on 2 sweep(s)")
    sweeps = [ln for ln in lines if "train -m" in ln]
    assert "seed=0,2 " in sweeps[0] and "seed=1 " in sweeps[1]
    for ln in sweeps:
        assert "experiment=commonsense " in ln and "model=llama-7b" in ln and "task.names" not in ln
    assert rep.main(["commonsense", "--dry-run", "--tasks", "boolq,arc-c", "--model", "qwen2.5-0.5b"]) == 0
    sweep = next(ln for ln in capsys.readouterr().out.splitlines() if "train -m" in ln)
    assert "'task.names=[boolq,arc-c]'" in sweep and "model=qwen2.5-0.5b" in sweep


def test_unknown_task_is_refused():
    rep = load_reproduce()
    with pytest.raises(SystemExit) as e:
        rep.main(["glue", "--dry-run", "--tasks", "cifar100"])
    assert e.value.code == 2


def test_make_dry_target_prints_without_running():
    res = subprocess.run(["make", "-s", "reproduce-glue-dry", "GPUS=0,1", "TASKS=rte", "SEEDS=0"], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "experiment=glue-rte adapter=lora,partial seed=0 " in res.stdout  # one task: one sweep on GPU 0


def test_tiny_sweep_runs_continues_past_a_failed_run_and_reports(tmp_path):
    data = write_glue(tmp_path / "glue", "rte")
    out = tmp_path / "repro"
    res = subprocess.run([sys.executable, str(ROOT / "experiments" / "reproduce.py"), "glue", "--gpus", "cpu",
                          "--tasks", "rte", "--methods", "lora", "--seeds", "0,-1", "--out", str(out), "--",
                          "model=tiny-deberta", f"task.path={data}", "trainer.max_steps=2", "trainer.num_workers=0"],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 1  # one run failed; the sweep still finished the other and the report ran
    ok = json.loads((out / "runs" / "rte" / "lora" / "seed0" / "results.json").read_text())
    assert ok["status"] == "complete" and ok["label"] == "lora"
    assert "seed must be >= 0" in (out / "runs" / "rte" / "lora" / "seed-1" / "error.txt").read_text()
    report = (out / "report" / "report.md").read_text()
    assert "| rte | lora | tiny-deberta | 8 | 1 | 0 |" in report
    assert "failed | missing: retrain, evaluate; seed must be >= 0, got -1 |" in report
