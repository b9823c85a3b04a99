"""The run dir as a contract: one process at a time (filelock), stage fingerprints, --rerun-from."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from partial_lora import artifacts, cli, ownership, rundir
from partial_lora.errors import PlrError
from partial_lora.pipeline.runner import run_pipeline
from tests.fixtures import write_glue
from tests.test_reliability import crash_at_step

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
# Uniform sparsity: allocate, extract, retrain, evaluate, and no probe (seconds on the tiny BERT).
FAST = ["experiment=smoke", "adapter=uniform", "adapter.allocation.ratio=0.5", "trainer.max_steps=2"]


def config(*overrides):
    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def train(capsys, *args):
    """`plr train` in-process: (exit code, stderr)."""
    capsys.readouterr()
    try:
        cli.main(["train", *args])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip()


@pytest.fixture(autouse=True)
def _no_full_error(monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)


def test_fingerprint_leaves_out_free_keys_and_what_only_later_stages_read():
    base = config("experiment=smoke")
    renamed = config("experiment=smoke", "label=x", "out_root=/elsewhere", "trainer.progress=true",
                     "trainer.num_workers=2", "trainer.device=cpu")
    for stage in artifacts.STAGES:
        assert rundir.fingerprint(base, stage) == rundir.fingerprint(renamed, stage)
    longer = config("experiment=smoke", "trainer.epochs=3")
    assert [s for s in artifacts.STAGES
            if rundir.fingerprint(base, s) != rundir.fingerprint(longer, s)] == ["retrain", "evaluate"]
    tau = config("experiment=smoke", "adapter.allocation.tau=0.5")
    assert [s for s in artifacts.STAGES if rundir.fingerprint(base, s) != rundir.fingerprint(tau, s)] == [
        "allocate", "extract", "retrain", "evaluate"]
    seed = config("experiment=smoke", "seed=1")
    assert all(rundir.fingerprint(base, s)["seed"] == 0 and rundir.fingerprint(seed, s)["seed"] == 1
               for s in artifacts.STAGES)


def test_rerun_with_other_settings_is_refused_and_the_run_dir_is_left_as_it_was(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, _ = train(capsys, *FAST, f"run_dir={run_dir}")
    assert code == 0
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != "train.log"}
    code, err = train(capsys, *FAST, "seed=1", "trainer.lr=0.05", f"run_dir={run_dir}")
    assert code == 2 and err.startswith("plr: error:") and "\n" not in err, err
    assert "seed 0 -> 1" in err and "trainer.lr 0.005 -> 0.05" in err and "--rerun-from allocate" in err
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != "train.log"}
    assert after == before  # .hydra/config.yaml included: a refused rerun rewrites nothing
    assert "seed: 0" in (run_dir / artifacts.HYDRA_CONFIG).read_text()


def test_rerun_from_redoes_that_stage_and_every_later_one_only(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train(capsys, *FAST, f"run_dir={run_dir}")[0] == 0
    masks = (run_dir / "extract" / artifacts.MASKS).read_bytes()
    extract_done = (run_dir / "extract" / artifacts.DONE).stat().st_mtime_ns
    code, err = train(capsys, *FAST[:-1], "trainer.max_steps=3", f"run_dir={run_dir}")
    assert code == 2 and "trainer.max_steps 2 -> 3" in err and "--rerun-from retrain" in err, err
    code, err = train(capsys, *FAST[:-1], "trainer.max_steps=3", f"run_dir={run_dir}", "--rerun-from", "retrain")
    assert code == 0, err
    results = json.loads((run_dir / artifacts.RESULTS).read_text())
    assert results["stages"]["retrain"]["steps"] == 3
    assert (run_dir / "extract" / artifacts.DONE).stat().st_mtime_ns == extract_done  # not redone
    assert (run_dir / "extract" / artifacts.MASKS).read_bytes() == masks
    assert "trainer.max_steps=3" in (run_dir / artifacts.HYDRA_OVERRIDES).read_text()
    code, err = train(capsys, *FAST, f"run_dir={run_dir}", "--rerun-from=nope")
    assert code == 2 and "--rerun-from takes a stage, one of probe, allocate" in err


def test_a_second_process_on_the_run_dir_is_refused_naming_the_holder(tmp_path, capsys):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from partial_lora import ownership
        with ownership.locked(Path({str(run_dir)!r})):
            print("held", flush=True)
            sys.stdin.readline()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, err = train(capsys, *FAST, f"run_dir={run_dir}")
        assert code == 2 and "\n" not in err, err
        assert f"is in use by pid {holder.pid} on " in err and "started 20" in err
        assert not (run_dir / ".hydra").exists() and not any(run_dir.rglob(artifacts.DONE))
    finally:
        holder.communicate("\n", timeout=30)
    assert holder.returncode == 0 and not (run_dir / ownership.HOLDER).exists()
    assert train(capsys, *FAST, f"run_dir={run_dir}")[0] == 0  # free again once the holder is gone


def test_a_stopped_stage_does_not_resume_under_another_seed(tmp_path, monkeypatch):
    over = ["experiment=smoke", "adapter=lora", "trainer.max_steps=6", "trainer.checkpoint_every=2"]
    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        first, other = compose("config", overrides=over), compose("config", overrides=[*over, "seed=1"])
    with monkeypatch.context() as m:
        crash_at_step(m, 4)
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(other, tmp_path, echo=lambda s: None)
    assert not artifacts.is_done(tmp_path, "retrain")
    with pytest.raises(PlrError, match=r"seed 1 -> 0; in retrain\)") as e:
        run_pipeline(first, tmp_path, echo=lambda s: None)
    assert "\n" not in str(e.value)


def test_a_corrupt_artifact_names_the_way_to_remake_it(tmp_path):
    (tmp_path / "allocate").mkdir()
    (tmp_path / "allocate" / artifacts.ALLOCATION).write_text("{not json")
    with pytest.raises(PlrError, match=rf"plr resume {tmp_path} --rerun-from allocate"):
        artifacts.read_json(tmp_path / "allocate" / artifacts.ALLOCATION)


def test_atomic_dir_appears_whole_or_not_at_all(tmp_path):
    """One folder writer for export and fetch: an error leaves the old folder as it was and no
    temporary folder; without replace a filled folder is refused; the result has the umask's modes."""
    import os

    from partial_lora import artifacts
    from partial_lora.errors import PlrError

    out = tmp_path / "out"
    with artifacts.atomic_dir(out, replace=True) as d:
        (d / "a.txt").write_text("one")
    assert (out / "a.txt").read_text() == "one"
    assert oct(os.stat(out).st_mode & 0o777) == oct(0o777 & ~artifacts.UMASK)
    with pytest.raises(RuntimeError), artifacts.atomic_dir(out, replace=True) as d:
        (d / "b.txt").write_text("two")
        raise RuntimeError("fill failed")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]
    with pytest.raises(PlrError, match="busy here"), artifacts.atomic_dir(out, replace=False, busy="busy here") as d:
        (d / "c.txt").write_text("three")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]
    with artifacts.atomic_dir(out, replace=True) as d:
        (d / "c.txt").write_text("three")
    assert sorted(p.name for p in out.iterdir()) == ["c.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left


def test_train_composes_validates_and_checks_the_run_dir_once(tmp_path, capsys, monkeypatch):
    """`plr train` composes its config once (a multi-task run's members beside it, at the edge),
    validates it once into the RunSpec and checks the run dir's fingerprints once."""
    import hydra._internal.hydra as hydra_app

    from partial_lora import config as plr_config
    from partial_lora.pipeline import runner

    calls = {"compose": 0, "validate": 0, "check": 0}

    def counted(key, fn):
        def wrapper(*a, **kw):
            calls[key] += 1
            return fn(*a, **kw)
        return wrapper

    monkeypatch.setattr(hydra_app.Hydra, "compose_config", counted("compose", hydra_app.Hydra.compose_config))
    monkeypatch.setattr(plr_config, "validate", counted("validate", plr_config.validate))
    monkeypatch.setattr(rundir, "check", counted("check", rundir.check))
    assert train(capsys, "experiment=smoke", "adapter=lora", "trainer.max_steps=1", f"run_dir={tmp_path / 'a'}")[0] == 0
    assert calls == {"compose": 1, "validate": 1, "check": 1}

    def stop(spec):  # a multi-task run: stop before the data loads, once the config is validated
        raise PlrError("stopped after validation")

    monkeypatch.setattr(runner, "data_identity", stop)
    calls.update(compose=0, validate=0, check=0)
    glue = write_glue(tmp_path / "glue", "sst2")
    code, err = train(capsys, "experiment=smoke", "task=multi", "task.names=[bbc-news,sst2]",
                      f"+task.members.sst2.path={glue}", f"run_dir={tmp_path / 'b'}")
    assert code == 2 and "stopped after validation" in err
    assert calls == {"compose": 3, "validate": 1, "check": 0}  # the run's config and its two members
