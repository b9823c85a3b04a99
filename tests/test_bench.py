"""benchmarks/: step_time.py prints its ratio rows and target lines, the DeBERTa-v3-base size is
the real model's shape, gpu_check.py refuses a machine without CUDA in one line, and the make
targets print their commands. No timing is asserted anywhere."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_check  # noqa: E402
import step_time  # noqa: E402
from bench import report  # noqa: E402  (owns DEMO_RUNS, read by find_demo_run)

TARGET_LINES = ["dense LoRA (ours) time ≤ 1.00× PEFT LoRA", "dense LoRA (ours) memory ≤ 1.00× PEFT LoRA",
                "Partial-LoRA ρ=0.125 time ≤ 1.05× the floor",
                "Partial-LoRA ρ=0.125 memory above the floor ≤ 0.30× dense LoRA's",
                "Partial-LoRA ρ=0.125, shared input memory above the floor ≤ 0.16× dense LoRA's (the goal)"]
VARIANTS = ["floor (frozen, no adapter)", "PEFT LoRA", "dense LoRA (ours)", "Partial-LoRA ρ=0.5",
            "Partial-LoRA ρ=0.25", "Partial-LoRA ρ=0.125", "Partial-LoRA ρ=0.125, shared input"]


def write_run(run: Path, walls: dict, status: str = "complete") -> Path:
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"status": status, "wall_s": walls}))
    return run


def target_line(out: str, size: str, what: str) -> str:
    lines = [ln for ln in out.splitlines() if f"{size}: {what}" in ln]
    assert len(lines) == 1, (size, what, out)
    return lines[0]


@pytest.fixture
def one_thread():
    """`--threads 1` sets torch's global thread count: put it back (tiny models, shared CPUs)."""
    before = torch.get_num_threads()
    yield ["--threads", "1"]
    torch.set_num_threads(before)


def test_step_time_tiny_prints_ratio_rows_and_targets(tmp_path, capsys, one_thread):
    run = write_run(tmp_path / "demo", {"probe": 40.0, "allocate": 10.0, "extract": 1.0, "retrain": 45.0,
                                        "evaluate": 4.0})
    assert step_time.main(["--sizes", "tiny", "--steps", "2", "--warmup", "1", "--demo-run", str(run),
                           *one_thread]) == 0
    out = capsys.readouterr().out
    for size in ("tiny-bert", "tiny-vit", "tiny-deberta"):
        assert f"### {size}:" in out
        for what in TARGET_LINES:  # measured in this run: met or not, never "not measured"
            assert target_line(out, size, what).lstrip().startswith(("[met]", "[NOT MET]"))
    assert "| variant | time / floor | memory / floor | memory above floor / dense LoRA's | its analytic limit |" in out
    for v in VARIANTS:
        assert out.count(f"| {v} |") == 2 * 3  # the main table and the ratio table, three sizes
    assert "## Targets" in out
    share = [ln for ln in out.splitlines() if "allocation ≤ 15% of the pipeline" in ln]
    assert len(share) == 1 and share[0].lstrip().startswith("[met]") and "10.0%" in share[0]
    assert "allocate 10.0 s (10.0%)" in out
    goal = target_line(out, "tiny-vit", TARGET_LINES[-1])
    assert "the analytic limit of this ratio is" in goal and "per-layer column sets: limit" in goal


def test_step_time_without_a_demo_run_says_make_demo(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "DEMO_RUNS", tmp_path / "bbc-news-minilm-partial")
    lines, target = step_time.demo_target(None)
    assert target.met is None and "make demo" in lines[0]
    assert "[not measured]" in target.line()


def test_demo_run_default_is_the_newest_complete_run(tmp_path, monkeypatch):
    runs = tmp_path / "bbc-news-minilm-partial"
    old = write_run(runs / "2026-01-01_00-00-00", {"probe": 10.0, "allocate": 30.0, "retrain": 60.0})
    new = write_run(runs / "2026-01-02_00-00-00", {"probe": 10.0, "allocate": 10.0, "retrain": 80.0})
    write_run(runs / "2026-01-03_00-00-00", {"probe": 10.0, "allocate": None}, status="incomplete")
    os.utime(old / "results.json", (1, 1))
    monkeypatch.setattr(report, "DEMO_RUNS", runs)
    assert step_time.find_demo_run() == new
    _, target = step_time.demo_target(None)
    assert target.value == pytest.approx(0.1) and target.met
    _, target = step_time.demo_target(str(old / "results.json"))
    assert target.value == pytest.approx(0.3) and target.met is False and "NOT MET" in target.line()


@pytest.mark.parametrize("density, shared", [(1.0, False), (0.125, False), (0.125, True)])
def test_the_memory_above_the_floor_is_the_analytic_limit(density, shared, one_thread):
    """What plr's branches save for backward plus AdamW's moments, above the floor, is exactly what
    `adapter_limit` counts: the rank-r code, x at the kept columns (per layer), x itself once
    per shared input (dense), or one x_U per input group (shared input), nothing more."""
    torch.set_num_threads(1)
    size = step_time.SIZES["tiny-vit"]
    backbone = step_time.build_backbone(size)
    batch = step_time.make_batch(size, backbone, 2, 16, torch.device("cpu"))
    floor = step_time.make_floor(backbone, size)
    ours = step_time.make_ours(backbone, size, 8, 16.0, density, shared=shared)
    assert ours.shared == shared and ours.label.endswith(", shared input") == shared
    base, adapted = (step_time.Stepper(v.model, batch, torch.device("cpu"), None) for v in (floor, ours))
    base_mib, adapted_mib = base.memory()[0], adapted.memory()[0]
    assert adapted.limit_mib is not None and adapted.limit_mib > 0
    assert adapted_mib - base_mib == pytest.approx(adapted.limit_mib, rel=1e-9)
    if shared:  # one x_U per block instead of x_Cq and x_Cv: less than the per-layer variant's
        per_layer = step_time.Stepper(step_time.make_ours(backbone, size, 8, 16.0, density).model, batch,
                                      torch.device("cpu"), None)
        assert adapted_mib < per_layer.memory()[0] and adapted.limit_mib < per_layer.limit_mib


def test_target_verdicts():
    assert step_time.Target("x", 1.0, 1.0).met and not step_time.Target("x", 1.001, 1.0).met
    assert step_time.Target("x", None, 1.0).met is None


def test_deberta_v3_base_size_is_the_real_models_shape():
    from transformers import AutoModelForSequenceClassification

    from partial_lora.adapter.inject import LoRAConfig, find_targets

    size = step_time.SIZES["deberta-v3-base"]
    cfg = size.config()
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size,
            cfg.vocab_size) == (768, 12, 12, 3072, 128100)
    assert cfg.relative_attention and cfg.position_buckets == 256 and list(cfg.pos_att_type) == ["p2c", "c2p"]
    assert cfg.share_att_key and cfg.norm_rel_ebd == "layer_norm" and not cfg.position_biased_input
    with torch.device("meta"):  # shapes only: no 184M-parameter init
        net = AutoModelForSequenceClassification.from_config(cfg)
    n = sum(p.numel() for p in net.parameters())
    assert 183e6 < n < 186e6  # DeBERTa-v3-base: 86M backbone + 98M embedding
    found = find_targets(net, LoRAConfig(targets=size.targets, exclude=size.head_modules))
    assert len(found) == 24 and all(k.endswith(("query_proj", "value_proj")) for k in found)
    for head in size.head_modules:
        net.get_submodule(head)


def test_gpu_check_without_cuda_exits_with_one_line(tmp_path):
    out = tmp_path / "gpu-check.txt"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("plr: gpu-check: no CUDA device"), proc.stderr
    assert proc.stdout == "" and not out.exists()


def test_gpu_check_bench_part_runs_on_cpu(tmp_path, capsys):
    out = tmp_path / "gc.txt"
    rc = gpu_check.main(["--cpu", "--skip-train", "--steps", "1", "--warmup", "0", "--batch", "2",
                         "--out", str(out)])
    assert rc == 0
    text = out.read_text()
    assert text == capsys.readouterr().out
    assert "## 1. device" in text and "## 3. step time: tiny-vit" in text and "every part ran" in text
    assert "tiny-vit batch 2: Partial-LoRA ρ=0.125 time ≤ 1.05× the floor" in text
    assert "| Partial-LoRA ρ=0.125 |" in text and "| Partial-LoRA ρ=0.5 |" not in text


@pytest.mark.slow  # three `plr train experiment=smoke` subprocesses: about a minute on 2 cores
def test_gpu_check_train_part_runs_on_cpu(tmp_path):
    out = tmp_path / "gc.txt"
    assert gpu_check.main(["--cpu", "--skip-bench", "--out", str(out)]) == 0
    text = out.read_text()
    assert "[ok] Partial-LoRA (default adapter): exit 0, status complete" in text
    assert "[ok] dense LoRA (adapter=lora): exit 0, status complete" in text
    assert "[ok] causal LM, multi-task (tiny-llama on ARC-e + BoolQ): exit 0, status complete, test mean" in text
    assert "wall time: probe" in text and "allocate" in text


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("target, script", [("bench", "benchmarks/step_time.py"),
                                            ("gpu-check", "benchmarks/gpu_check.py")])
def test_make_targets_print_their_commands(target, script):
    def dry(*extra: str) -> str:
        proc = subprocess.run(["make", "-n", target, *extra], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    line = next(ln for ln in dry().splitlines() if script in ln)
    assert line.startswith(".venv/bin/python ")
    if target == "bench":
        assert "--sizes vit-b deberta-v3-base --device cpu" in line
        assert any(ln.endswith(f"{script} --sizes tiny") for ln in dry("BENCH_ARGS=--sizes tiny").splitlines())
    else:
        assert any(ln.endswith(f"{script} --skip-train")
                   for ln in dry("GPU_CHECK_ARGS=--skip-train").splitlines())
    helped = subprocess.run(["make", "help"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    assert f"  {target} " in helped


def test_allocation_replay_finds_the_same_allocation_with_and_without_replay(tmp_path, capsys):
    import allocation_replay
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from partial_lora.pipeline.runner import run_pipeline

    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", "trainer.lr=0.05"])
    run_dir = tmp_path / "run"
    run_pipeline(cfg, run_dir, echo=lambda s: None)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra/config.yaml")
    assert allocation_replay.main([str(run_dir), "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "ratio replay/full:" in out and "identical: True" in out
    assert allocation_replay.main([str(tmp_path)]) == 2  # not a run dir with a probe: one line, exit 2


def test_stage_profile_counts_each_second_once_in_the_innermost_part():
    import stage_profile

    ticks = iter([0.0, 1.0, 3.0, 4.0, 10.0, 10.5])  # a 4 s call holding a 2 s one, then 0.5 s of another
    clock = stage_profile.Clock(timer=lambda: next(ticks))
    clock.stage = "probe"
    with clock.part("other"):
        with clock.part("train"):
            pass
    clock.stage = "allocate"
    with clock.part("search"):
        pass
    assert dict(clock.spent) == {("probe", "other"): 2.0, ("probe", "train"): 2.0, ("allocate", "search"): 0.5}


def test_stage_profile_splits_each_stage_and_puts_plr_back(capsys):
    import stage_profile

    from partial_lora.pipeline import runner as stages
    from partial_lora.training import predict
    from partial_lora.working_set import loaders as base

    before = (predict.evaluate, base.evaluate, dict(stages.REGISTRY))
    clock = stage_profile.main(["--threads", "1", "experiment=smoke"])
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    for stage in ("probe", "allocate", "extract", "retrain", "evaluate"):
        wall, seconds = float(rows[stage][1]), [float(x) for x in rows[stage][2::2]]
        assert len(seconds) == len(stage_profile.ORDER) and abs(sum(seconds) - wall) < 0.1 * len(seconds)
    # the printed seconds are rounded to 0.1 s, which a tiny model's parts can be under: read the clock
    assert clock.spent["probe", "train"] > 0 and clock.spent["retrain", "train"] > 0  # both train
    assert clock.spent["allocate", "search"] > 0 and ("probe", "search") not in clock.spent  # only the search searches
    assert (predict.evaluate, base.evaluate, dict(stages.REGISTRY)) == before


def test_flop_rate_measures_the_peak_the_eval_forward_and_the_train_step(capsys, one_thread):
    import flop_rate

    before = torch.is_grad_enabled()
    rates = flop_rate.main([*one_thread, "--repeats", "1", "--batch", "8", "--train-batch", "4", "--peak-n", "256",
                            "experiment=smoke"])
    out = capsys.readouterr().out
    assert [r.name for r in rates] == ["eval forward", "train step"] and [r.batch for r in rates] == [8, 4]
    forward, step = rates
    # a train step on half the rows still counts more matrix FLOPs than the forward (backward ≈ 2× forward)
    assert 0 < forward.flops < step.flops and all(r.seconds > 0 for r in rates)
    assert all(0 < share <= 1 for r in rates for _, share in r.top) and len(forward.top) == 5
    assert all(0 < r.matmul_flops <= r.flops and 0 < r.matmul_share < 1 for r in rates)
    assert "matmul peak (256x256)" in out and "top ops, train step:" in out and "tiny-bert" in out
    assert "matrix products of the eval forward:" in out
    assert torch.is_grad_enabled() == before


def test_flop_rate_count_is_the_matrix_products():
    import flop_rate

    a, b = torch.randn(16, 32), torch.randn(32, 8)
    c = torch.randn(2, 16, 32)
    total, by_op = flop_rate.count_flops(lambda: (a @ b, torch.bmm(c, b.expand(2, 32, 8))))
    assert by_op == {"mm": 2 * 16 * 32 * 8, "bmm": 2 * 2 * 16 * 32 * 8} and total == sum(by_op.values())


def test_flop_rate_bad_input_is_one_line(capsys, one_thread):
    import flop_rate

    with pytest.raises(SystemExit) as e:
        flop_rate.main(["--batch", "0", "experiment=smoke"])
    assert e.value.code == 2 and "'0' is not a whole number >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="^flop_rate: task.path is required"):
        flop_rate.main([*one_thread, "experiment=smoke", "task=hf-text"])
    with pytest.raises(SystemExit, match="^flop_rate: .*no-such-task"):
        flop_rate.main([*one_thread, "task=no-such-task"])


def test_study_jobs_needs_two_cores(capsys):
    import study_jobs

    with pytest.raises(SystemExit) as e:
        study_jobs.main(["--cores", "1"])
    assert e.value.code == 2 and "--cores must be >= 2" in capsys.readouterr().err
