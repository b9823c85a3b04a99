"""The `plr` command end to end, in subprocesses, on tiny configs."""

import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from partial_lora.commands.overrides import CONF_DIR

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}


def plr(*args, cwd, env=ENV, timeout=300):
    return subprocess.run([sys.executable, "-m", "partial_lora.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cli")
    run_dir = cwd / "run"
    res = plr("train", "experiment=smoke", f"run_dir={run_dir}", cwd=cwd)
    assert res.returncode == 0, res.stderr[-2000:]
    return cwd, run_dir, res


def test_train_writes_the_run_dir_contract(smoke_run):
    _, run_dir, res = smoke_run
    for rel in [".hydra/config.yaml", "git.json", "env.json", "probe/init.safetensors", "probe/adapter.safetensors",
                "allocate/allocation.json", "allocate/allocation.png", "extract/masks.safetensors",
                "retrain/adapter.safetensors", "retrain/head.safetensors",
                "retrain/metrics.jsonl", "retrain/metrics.json", "retrain/done", "evaluate/metrics.json",
                "evaluate/done", "results.json"]:
        assert (run_dir / rel).is_file(), rel
    env = json.loads((run_dir / "env.json").read_text())
    assert env["packages"]["torch"] and env["packages"]["transformers"]
    assert "sha" in json.loads((run_dir / "git.json").read_text())
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "complete"
    assert results["model"] == "tiny-bert" and results["task"] == "bbc-news"
    assert 0 <= results["metrics"]["test_accuracy"] <= 1
    assert results["params"]["dense_lora_same_rank"] == 2 * 2 * 8 * (32 + 32)  # 2 layers x (q, v), r=8, 32 wide
    assert 0 < results["params"]["adapter"] < results["params"]["dense_lora_same_rank"]
    curve = [json.loads(line) for line in (run_dir / "retrain/metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in curve) and any("val_accuracy" in r for r in curve)
    assert "plr results" in res.stdout and "dense LoRA at r=8: 2,048" in res.stdout
    assert "reduction vs dense LoRA" in res.stdout and "probe few-shot accuracy" in res.stdout


def test_rerun_in_same_dir_skips_finished_stages(smoke_run):
    cwd, run_dir, _ = smoke_run
    before = (run_dir / "retrain/adapter.safetensors").stat().st_mtime_ns
    res = plr("train", "experiment=smoke", f"run_dir={run_dir}", cwd=cwd)
    assert res.returncode == 0, res.stderr[-2000:]
    for stage in ("probe", "allocate", "extract", "retrain", "evaluate"):
        assert f"{stage}: done already, skipped" in res.stdout
    assert (run_dir / "retrain/adapter.safetensors").stat().st_mtime_ns == before


def test_dense_lora_runs_retrain_and_evaluate_only(tmp_path):
    run_dir = tmp_path / "run"
    res = plr("train", "experiment=smoke", "adapter=lora", f"run_dir={run_dir}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(p.name for p in run_dir.iterdir() if (p / "done").exists()) == ["evaluate", "retrain"]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["params"]["adapter"] == results["params"]["dense_lora_same_rank"] == 2048


def test_multirun_over_seeds(tmp_path):
    res = plr("train", "-m", "experiment=smoke", "adapter=lora", "seed=0,1", f"out_root={tmp_path}",
              "task.max_train_samples=16", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    results = sorted(tmp_path.glob("multirun/*/*/*/results.json"))
    assert len(results) == 2
    assert sorted(json.loads(p.read_text())["seed"] for p in results) == [0, 1]


def test_usage_is_built_from_each_commands_parser(capsys):
    """`plr --help`: one line per command of the table, with the usage its own parser prints."""
    from partial_lora import cli

    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, command in cli.COMMANDS.items():
        assert f"  {name:<8} {command.summary}" in out
        assert command.parser().format_usage().removeprefix("usage: ").splitlines()[0].strip() in out
    with pytest.raises(SystemExit) as e:
        cli.main(["nope"])
    assert e.value.code == 2 and capsys.readouterr().err.strip() == (
        "plr: error: unknown command 'nope'; run `plr --help` for the commands")


def test_help_lists_groups_and_options(tmp_path):
    res = plr("train", "--help", cwd=tmp_path)
    assert res.returncode == 0
    for group in ("model", "task", "adapter", "trainer", "logger", "experiment"):
        assert f"{group}:" in res.stdout
    assert "minilm" in res.stdout and "bbc-news" in res.stdout


# Bad inputs through a real subprocess (exit code, stderr, no traceback): one refused while the config
# is composed, one while the model loads. The full battery of more than 40 cases, the config
# validation's among them, runs in-process in test_reliability.py.
@pytest.mark.parametrize("args, message", [
    (["model=nope"], "unknown model 'nope'; choose one of:"),
    (["model=roberta-base"], "cannot be reached"),
])
def test_bad_input_one_line_error_and_no_run_dir(tmp_path, args, message):
    run_dir = tmp_path / "run"
    res = plr("train", "experiment=smoke", f"run_dir={run_dir}", *args, cwd=tmp_path)
    assert res.returncode != 0
    err = res.stderr.strip()
    assert err.startswith("plr: error:") and "\n" not in err, err
    assert message in err
    assert "Traceback" not in res.stderr
    assert not run_dir.exists()


# The timm loader here; the transformers loader's unreachable case is in the bad-input list above.
@pytest.mark.parametrize("model", ["vit-b-timm"])
def test_unreachable_hub_model_fails_fast_in_one_line_without_offline_vars(tmp_path, model):
    env = {k: v for k, v in ENV.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_HOME"] = str(tmp_path / "hf")  # an empty cache: the name cannot be served locally
    task = "task=bbc-news" if model.startswith("deberta") else "task=digits"
    res = plr("train", "experiment=smoke", f"model={model}", task, f"run_dir={tmp_path / 'run'}", cwd=tmp_path, env=env)
    err = res.stderr.strip()
    assert res.returncode != 0 and err.startswith("plr: error:") and "\n" not in err, err
    assert "model.source=" in err and "Traceback" not in res.stderr


def test_wandb_without_api_key_falls_back_and_never_crashes(tmp_path):
    env = {k: v for k, v in ENV.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    env["HOME"] = str(tmp_path)  # no ~/.netrc with a wandb login
    run_dir = tmp_path / "run"
    res = plr("train", "experiment=smoke", "adapter=lora", "logger=wandb", "logger.mode=online",
              f"run_dir={run_dir}", cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "no API key" in res.stderr
    assert (run_dir / "results.json").exists() and (run_dir / "wandb").is_dir()


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_every_experiment_config_composes(experiment):
    from partial_lora import config

    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}"])
    config.validate(cfg)


def test_every_model_and_task_config_composes():
    from partial_lora import config

    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        for model in sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")):
            config.lora_config(compose("config", overrides=[f"model={model}"]))
        for task in sorted(p.stem for p in (CONF_DIR / "task").glob("*.yaml")):
            if task == "multi":  # a multi-task run needs task.names; its members are the other configs
                assert len(config.member_tasks(compose("config",
                                                       overrides=["task=multi", "task.names=[cola,sst2]"]))) == 2
                continue
            cfg = compose("config", overrides=[f"task={task}", "task.path=/x"] if task.startswith("hf-")
                          else [f"task={task}"])
            for node in config.member_tasks(cfg) if config.is_multi(cfg) else [cfg.task]:
                config.task_spec(OmegaConf.create({"task": node}))


def test_vision_smoke_with_timm_fused_qkv(tmp_path):
    run_dir = tmp_path / "run"
    res = plr("train", "experiment=smoke-vision", f"run_dir={run_dir}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["model"] == "tiny-vit-timm" and results["task"] == "digits"
    from safetensors.torch import load_file

    keys = load_file(str(run_dir / "retrain/adapter.safetensors")).keys()
    assert "blocks.0.attn.qkv.q.lora_A" in keys and "blocks.0.attn.qkv.v.lora_B" in keys
