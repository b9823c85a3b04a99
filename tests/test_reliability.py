"""Reliability: resume after kill -9, the bad-input battery, the NaN guard, determinism, checkpoints."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from safetensors.torch import load_file

from partial_lora import config
from partial_lora.errors import PlrError
from partial_lora.pipeline.runner import run_pipeline
from partial_lora.training import checkpoint

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
# 120 small steps of dense LoRA on the tiny BERT: long enough to be killed in the middle of.
LONG = ["experiment=smoke", "adapter=lora", "trainer.max_steps=120", "trainer.batch_size=4",
        "trainer.checkpoint_every=10", "trainer.eval_every_epochs=2", "task.max_train_samples=64"]


def cfg_of(*overrides):
    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        return compose("config", overrides=["experiment=smoke", *overrides])


# --- resume ---------------------------------------------------------------------------------


def test_kill_9_during_retrain_then_resume_matches_an_uninterrupted_run(tmp_path, capsys, monkeypatch):
    """Only the killed run is a subprocess (SIGKILL needs one); the uninterrupted reference and `plr resume`
    run in-process through `cli.main`, at the same thread count, which saves two interpreter start-ups."""
    from partial_lora import cli

    monkeypatch.chdir(tmp_path)
    ref = tmp_path / "ref"
    assert cli.main(["train", *LONG, f"run_dir={ref}"]) == 0

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "partial_lora.cli", "train", *LONG, f"run_dir={run_dir}"],
                            cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = run_dir / "retrain" / checkpoint.FILE
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert ckpt.exists() and not (run_dir / "retrain" / "done").exists(), "the run finished before it was killed"

    capsys.readouterr()
    assert cli.main(["resume", str(run_dir)]) == 0
    assert "resuming from" in capsys.readouterr().out
    a, b = (json.loads((d / "results.json").read_text()) for d in (ref, run_dir))
    assert a["metrics"] == b["metrics"]
    ta, tb = (load_file(d / "retrain" / "adapter.safetensors") for d in (ref, run_dir))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not ckpt.exists()  # a finished stage drops its checkpoint
    records = [json.loads(line) for line in (run_dir / "retrain" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "lr" in r]
    assert steps == list(range(1, 121))  # the resumed curve has every step once


def crash_at_step(monkeypatch, n: int) -> None:
    """Make the n-th optimizer step raise, as a crash in the middle of a stage would."""
    calls = {"n": 0}
    real = torch.optim.AdamW.step

    def step(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt("simulated crash")
        return real(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


def test_rerun_into_the_same_run_dir_resumes_from_the_checkpoint(tmp_path, monkeypatch):
    over = ["adapter=lora", "trainer.max_steps=7", "trainer.checkpoint_every=2"]
    full = run_pipeline(cfg_of(*over), tmp_path / "full", echo=lambda s: None)
    run_dir = tmp_path / "run"
    with monkeypatch.context() as m:
        crash_at_step(m, 6)
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(cfg_of(*over), run_dir, echo=lambda s: None)
    assert (run_dir / "retrain" / checkpoint.FILE).exists() and not (run_dir / "retrain" / "done").exists()
    lines = []
    again = run_pipeline(cfg_of(*over), run_dir, echo=lines.append)
    assert again["metrics"] == full["metrics"]
    ta, tb = (load_file(d / "retrain" / "adapter.safetensors") for d in (tmp_path / "full", run_dir))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("stage", ["probe", "retrain"])
def test_a_crash_in_the_probe_or_a_sparse_retrain_resumes_to_the_same_tensors(tmp_path, monkeypatch, capsys, stage):
    """Partial-LoRA (the smoke default: a sparse adapter) stopped mid-probe or mid-retrain, then rerun,
    ends with the masks, adapter and metrics of an uninterrupted run."""
    over = ["trainer.max_steps=7", "trainer.checkpoint_every=2"]
    full = run_pipeline(cfg_of(*over), tmp_path / "full", echo=lambda s: None)
    assert full["params"]["reduction_pct"] > 0  # the retrain is sparse
    probe_steps = sum("lr" in json.loads(r)
                      for r in (tmp_path / "full" / "probe" / "metrics.jsonl").read_text().splitlines())
    assert probe_steps >= 4
    run_dir = tmp_path / "run"
    with monkeypatch.context() as m:
        crash_at_step(m, 3 if stage == "probe" else probe_steps + 5)
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(cfg_of(*over), run_dir, echo=lambda s: None)
    assert (run_dir / stage / checkpoint.FILE).exists() and not (run_dir / stage / "done").exists()
    capsys.readouterr()
    again = run_pipeline(cfg_of(*over), run_dir, echo=print)
    out = capsys.readouterr().out
    assert f"resuming from {run_dir / stage / checkpoint.FILE}" in out, out
    assert again["metrics"] == full["metrics"]
    for f in ("extract/masks.safetensors", "retrain/adapter.safetensors", "retrain/head.safetensors"):
        ta, tb = (load_file(d / f) for d in (tmp_path / "full", run_dir))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), f


def test_checkpoint_from_other_settings_is_refused_in_one_line(tmp_path, monkeypatch):
    over = ["adapter=lora", "trainer.max_steps=7", "trainer.checkpoint_every=2"]
    with monkeypatch.context() as m:
        crash_at_step(m, 4)
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(cfg_of(*over), tmp_path, echo=lambda s: None)
    (tmp_path / "retrain" / "fingerprint.json").unlink()  # as in a run dir from before stage fingerprints
    with pytest.raises(PlrError, match="written by a run with other settings") as e:
        run_pipeline(cfg_of(*over, "trainer.lr=0.1"), tmp_path, echo=lambda s: None)
    assert "\n" not in str(e.value) and "delete it" in str(e.value) and "lr" in str(e.value)


def test_truncated_checkpoint_names_the_file(tmp_path):
    run_dir = tmp_path / "run"
    cfg = cfg_of("adapter=lora", "trainer.max_steps=2")
    (run_dir / "retrain").mkdir(parents=True)
    (run_dir / "retrain" / checkpoint.FILE).write_bytes(b"\x00" * 10)
    with pytest.raises(PlrError, match=f"checkpoint {run_dir / 'retrain' / checkpoint.FILE} is unreadable"):
        run_pipeline(cfg, run_dir, echo=lambda s: None)


# --- NaN guard ------------------------------------------------------------------------------


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    cfg = cfg_of("adapter=lora", "trainer.max_steps=8", "trainer.checkpoint_every=2", "trainer.lr=1e30",
                 "trainer.max_grad_norm=0")
    config.validate(cfg)
    with pytest.raises(PlrError, match="non-finite loss") as e:
        run_pipeline(cfg, tmp_path, echo=lambda s: None)
    msg = str(e.value)
    assert "\n" not in msg and "trainer.max_bad_steps" in msg and "trainer.lr" in msg
    assert not (tmp_path / "retrain" / "done").exists()


def test_bad_steps_up_to_the_limit_are_skipped(tmp_path):
    from partial_lora.training.recipe import TrainConfig

    with pytest.raises(PlrError, match="max_bad_steps"):
        TrainConfig(max_bad_steps=-1)


# --- determinism ----------------------------------------------------------------------------


def test_same_seed_same_allocation_masks_and_metrics(tmp_path):
    over = ["trainer.max_steps=3", "adapter.probe.epochs=1"]
    a = run_pipeline(cfg_of(*over), tmp_path / "a", echo=lambda s: None)
    b = run_pipeline(cfg_of(*over), tmp_path / "b", echo=lambda s: None)
    assert a["metrics"] == b["metrics"]
    alloc = [json.loads((tmp_path / d / "allocate" / "allocation.json").read_text()) for d in "ab"]
    for x in alloc:
        x.pop("search_wall_s", None)
    assert alloc[0] == alloc[1]
    ma, mb = (load_file(tmp_path / d / "extract" / "masks.safetensors") for d in "ab")
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_deterministic_flag_turns_on_deterministic_algorithms(tmp_path):
    cfg = cfg_of("adapter=lora", "trainer.max_steps=1", "trainer.deterministic=true")
    try:
        run_pipeline(cfg, tmp_path, echo=lambda s: None)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


# --- the bad-input battery ------------------------------------------------------------------


def corrupt_run(tmp_path: Path) -> Path:
    """A finished smoke run whose retrain adapter file is then truncated (evaluate not done)."""
    run_dir = tmp_path / "corrupt"
    run_pipeline(cfg_of("adapter=lora", "trainer.max_steps=1"), run_dir, echo=lambda s: None)
    (run_dir / "evaluate" / "done").unlink()
    (run_dir / "retrain" / "adapter.safetensors").write_bytes(b"\x00\x01")
    return run_dir


SPLITS = ["task=hf-text", "task.val_split=validation", "task.test_split=test"]  # a folder of three split files

BATTERY = [
    (["model=nope"], "unknown model 'nope'"),
    (["task=nope"], "unknown task 'nope'"),
    (["adapter=nope"], "unknown adapter 'nope'"),
    (["trainer.lerning_rate=1"], "unknown config key 'trainer.lerning_rate'"),
    (["adapter.r=0"], "adapter.r must be a positive rank"),
    (["trainer.lr=-0.1"], "trainer.lr must be positive"),
    (["adapter.sparsity=1.0"], "adapter.sparsity must be in [0, 1)"),
    (["adapter.sparsity=-0.1"], "adapter.sparsity must be in [0, 1)"),
    (["adapter.allocation.tau=0"], "adapter.allocation.tau"),
    (["adapter.allocation.grid=[]"], "grid"),
    (["adapter.targets=[nothing_here]"], "match no nn.Linear"),
    (["task=hf-text"], "task.path is required"),
    (["task=hf-text", "task.path=/does/not/exist"], "does not exist; set task.path"),
    (["task=hf-text", "task.path=DATA", "task.text_column=review"], "task.text_column='review' is not a column"),
    (["trainer.batch_size=0"], "trainer.batch_size must be at least 1"),
    (["+task.num_labels=7"], "task.num_labels=7 but the data has 5 labels"),
    (["from_run=/no/such/run"], "from_run=/no/such/run is not a plr run dir"),
    (["adapter=lora", "trainer.max_steps=1", "run_dir=CORRUPT"], "adapter.safetensors"),
    (["out_root=/proc/plr-cannot-write"], "cannot be written"),
    (["seed=-1"], "seed must be >= 0"),
    (["trainer.schedule=triangle"], "trainer.schedule 'triangle' is unknown"),
    (["adapter.mask.method=best"], "unknown adapter.mask.method 'best'"),
    (["retrain.init=warm"], "retrain.init must be rewind or fresh"),
    (["+task.protocol=vtab2k"], "task.protocol='vtab2k' is unknown"),
    (["adapter=lora_matched"], "adapter=lora_matched needs a target"),
    (["trainer.max_bad_steps=-2"], "trainer.max_bad_steps must be >= 0"),
    (["trainer.checkpoint_every=-1"], "trainer.checkpoint_every must be >= 0"),
    (["adapter.probe.short_classes=maybe"], "adapter.probe.short_classes must be error or shrink"),
    (["+task.val_max=0"], "task.val_max=0 must be a positive number"),
    (["adapter=peft_lora", "+adapter.peft.nonsense=1"], "PEFT rejected the settings"),
    (["adapter=uniform", "adapter.match.budget=10", "adapter.match.run=x"], "adapter.match takes one of"),
    # wrong types are refused, never coerced
    (["seed=abc"], "seed='abc' must be a whole number, got a string"),
    (["seed=1.5"], "seed=1.5 must be a whole number, got float"),
    (["adapter.r=1.5"], "adapter.r=1.5 must be a whole number"),
    (["adapter.r=abc"], "adapter.r='abc' must be a whole number"),
    (["trainer.lr=abc"], "trainer.lr='abc' must be a number"),
    (["adapter.dropout=abc"], "adapter.dropout='abc' must be a number"),
    (["adapter.allocation.grid=[abc]"], "adapter.allocation.grid=['abc'] must be a list of numbers"),
    (["adapter.probe.shots=2.5"], "adapter.probe.shots=2.5 must be a whole number"),
    (["trainer.progress=3"], "trainer.progress=3 must be true or false"),
    # values out of range that used to train (max_steps=-5: one step at lr 0) or end in a traceback
    (["trainer.max_steps=-5"], "trainer.max_steps must be >= 1"),
    (["trainer.eval_every_epochs=0"], "trainer.eval_every_epochs must be >= 1"),
    (["trainer.num_workers=-1"], "trainer.num_workers must be >= 0"),
    (["trainer.device=gpu"], "trainer.device 'gpu' must be auto, cpu, cuda"),
    (["trainer.strategy=zero3"], "trainer.strategy 'zero3' must be one of ddp, fsdp"),
    (["model.max_length=0"], "model.max_length must be >= 1"),
    (["--rerun-from", "training"], "--rerun-from takes a stage"),
    # model.source faults (SRC: folders the battery_data fixture makes, each broken in one way)
    (["model.source=SRC/empty", "model.pretrained=true"], "Should have a `model_type` key"),
    (["model.source=SRC/no-weights", "model.pretrained=true"], "no file named model.safetensors"),
    (["model.source=SRC/bad-config", "model.pretrained=true"], "is not a valid JSON file"),
    (["model.source=SRC/truncated", "model.pretrained=true"], "Error while deserializing header"),
    (["model.source=SRC/small-vocab", "model.pretrained=true"],
     "has 30,522 tokens but model tiny-bert's embeddings hold 100"),
    (["model.source=SRC/small-vocab"], "would be ignored: model tiny-bert has pretrained=false"),
    # messages that named the wrong key or said nothing useful
    (["adapter.probe.epochs=0"], "adapter.probe.epochs must be positive"),
    (["task=hf-text", "task.path=DATA_DIR/blank-label.csv"], "has 2 blank cells (the first at data row 3 of split "
                                                             "train)"),
    (["task=hf-text", "task.path=DATA_DIR/latin1.csv"], "is not UTF-8 text (it holds the byte 0xe9)"),
    (["task=hf-text", "task.path=DATA_DIR/empty.csv"], "is an empty file (0 bytes)"),
    (["task=hf-text", "task.path=DATA", "task.data_format=xml"], "task.data_format='xml' is not supported"),
    # issue 35: each of these was a traceback, a silent exit 0 or a wrong message, most leaving a half-made run dir
    (["~adapter.r"], "'~adapter.r' deletes adapter.r, which plr reads; set it instead"),
    (["adapter.allocation=5"], "adapter.allocation=5 replaces a group of settings with one value"),
    (["model=tiny-vit"], "model 'tiny-vit' (hf-vision) reads images, but task 'bbc-news' is a text task"),
    (["model.max_length=100000"], "model.max_length=100000 is more than the 128 positions model tiny-bert has"),
    (["seed=99999999999999999999"], "seed must be in [0, 4294967295], got 99999999999999999999"),
    (["task.split_seed=-3"], "task.split_seed must be in [0, 4294967295]"),
    (["trainer.epochs=inf"], "trainer.epochs=inf is not a finite number"),
    (["trainer.max_grad_norm=nan"], "trainer.max_grad_norm=nan is not a finite number"),
    (["adapter.allocation.budget=nan"], "adapter.allocation.budget=nan is not a finite number"),
    (["adapter.allocation.floor_warning=nan"], "adapter.allocation.floor_warning=nan is not a finite number"),
    (["adapter.alpha=nan"], "adapter.alpha=nan is not a finite number"),
    (["adapter.alpha=inf"], "adapter.alpha=inf is not a finite number"),
    (["trainer.weight_decay=inf"], "trainer.weight_decay=inf is not a finite number"),
    (["adapter.allocation.grid=[0.5,nan]"],
     "adapter.allocation.grid=[0.5, nan] holds nan, which is not a finite number"),
    (["retrain.lr_scale_cap=0"], "retrain.lr_scale_cap must be positive"),
    (["run_dir="], "run_dir= is empty"),
    (["out_root="], "out_root= is empty"),
    (["run_dir=DATA"], "data.csv is a file; name a new folder"),
    (["adapter.r"], "'adapter.r' is not an override; write key=value"),
    (["hydra/launcher=joblib"], "unknown hydra/launcher 'joblib'; choose one of plr's launchers: slurm"),
    (["hydra.run.dir=."], "'hydra.run.dir=.' would bypass plr's checks of the run dir; set run_dir=<dir> instead"),
    (["run_dir=W/ré sult ☃/x"], "quote a value that holds spaces or other characters: \"run_dir='W/ré sult ☃/x'\""),
    (["task=hf-text", "task.path=DATA", "+task.regression=true"], "metric 'accuracy' scores classes"),
    (["model.source=SRC/pickle-only", "model.pretrained=true"], "holds only a pickle checkpoint (pytorch_model.bin)"),
    (["model.source=SRC/partial", "model.pretrained=true"], "lacks 22 of model tiny-bert's pretrained weights"),
    (["model=tiny-vit-timm", "task=digits", "model.pretrained=true", "model.config.architecture=null",
      "model.source=SRC/timm-pickle"], "holds only a pickle checkpoint (pytorch_model.bin)"),
    (["model=tiny-vit-timm", "task=digits", "model.pretrained=true", "model.config.architecture=null",
      "model.source=SRC/timm-partial"], "lacks 25 of model tiny-vit-timm's pretrained weights"),
    ([*SPLITS, "task.path=DATA_DIR/columns"], "validation.csv has {'label'} and lacks {'category'}"),
    ([*SPLITS, "task.path=DATA_DIR/header-only"], "header-only/train.csv (split train) holds a header and no rows"),
    ([*SPLITS, "task.path=DATA_DIR/empty-val"], "empty-val/validation.csv (split validation) is an empty file"),
    ([*SPLITS, "task.path=DATA_DIR/bad-parquet"], "could not read DATA_DIR/bad-parquet/train.parquet of task.path"),
    ([*SPLITS, "task.path=DATA_DIR/bad-jsonl"], "could not read DATA_DIR/bad-jsonl/train.jsonl of task.path"),
    ([*SPLITS, "task.path=DATA_DIR/inf-score", "+task.regression=true", "task.metrics=[pearson]",
      "task.metric=pearson"],
     "split 'test' row 0 is inf (1 such row); a regression target must be a finite number"),
    ([*SPLITS, "task.path=DATA_DIR/mixed-types"], "do not agree on their columns' types"),
]


@pytest.fixture(scope="module")
def battery_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("battery")
    (root / "data.csv").write_text("text,label\n" + "".join(f"sample {i},{i % 2}\n" for i in range(40)))
    rows = [f"sample {i},{'' if i in (2, 7) else i % 2}\n" for i in range(40)]
    (root / "blank-label.csv").write_text("text,label\n" + "".join(rows))  # int ids, two cells blank
    (root / "latin1.csv").write_bytes(("text,label\n"
                                       + "".join(f"caf\u00e9 {i},{i % 2}\n" for i in range(40))).encode("latin1"))
    (root / "empty.csv").write_bytes(b"")
    from transformers import BertConfig, BertForSequenceClassification

    good = root / "src" / "small-vocab"  # loads, but its 100 embeddings cannot take the MiniLM tokenizer's ids
    BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32)).save_pretrained(good)
    (root / "src" / "empty").mkdir()
    (root / "src" / "no-weights").mkdir()
    (root / "src" / "no-weights" / "config.json").write_bytes((good / "config.json").read_bytes())
    for name in ("bad-config", "truncated"):
        shutil.copytree(good, root / "src" / name)
    (root / "src" / "bad-config" / "config.json").write_text("{not json")
    weights = root / "src" / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _bad_sources(root / "src", good)
    _bad_folders(root)
    return root


def _bad_sources(src: Path, good: Path) -> None:
    """Model folders a pickle-only or a partial checkpoint, for transformers and for timm."""
    import timm
    from safetensors.torch import save_file

    state = load_file(good / "model.safetensors")
    (src / "pickle-only").mkdir()
    (src / "pickle-only" / "config.json").write_bytes((good / "config.json").read_bytes())
    torch.save(state, src / "pickle-only" / "pytorch_model.bin")
    shutil.copytree(good, src / "partial")
    first = sorted(state)[0]
    save_file({first: state[first]}, src / "partial" / "model.safetensors", metadata={"format": "pt"})
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8, embed_dim=32, depth=2,
                            num_heads=2).state_dict()
    for name in ("timm-pickle", "timm-partial"):
        (src / name).mkdir()
        (src / name / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "num_classes": 10}))
    torch.save(vit, src / "timm-pickle" / "pytorch_model.bin")
    save_file({k: vit[k].contiguous() for k in sorted(vit)[:5]}, src / "timm-partial" / "model.safetensors")


def _bad_folders(root: Path) -> None:
    """Folders of train/validation/test files, each broken in one way."""
    import pandas as pd

    def rows(n: int, at: int, label: str = "label") -> str:
        return f"text,{label}\n" + "".join(f"sample {at + i} is {'good' if i % 2 else 'bad'},{i % 2}\n"
                                           for i in range(n))

    def folder(name: str, train: str = "label") -> Path:
        d = root / name
        d.mkdir()
        (d / "train.csv").write_text(rows(40, 0, train))
        (d / "validation.csv").write_text(rows(10, 100))
        (d / "test.csv").write_text(rows(10, 200))
        return d

    folder("columns", train="category")                        # train names its label column otherwise
    (folder("header-only") / "train.csv").write_text("text,label\n")
    (folder("empty-val") / "validation.csv").write_bytes(b"")
    d = folder("bad-parquet")
    for split in ("train", "validation", "test"):
        pd.read_csv(d / f"{split}.csv").to_parquet(d / f"{split}.parquet")
        (d / f"{split}.csv").unlink()
    (d / "train.parquet").write_bytes((d / "train.parquet").read_bytes()[:300])  # truncated
    d = folder("bad-jsonl")
    for split in ("train", "validation", "test"):
        frame = pd.read_csv(d / f"{split}.csv")
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in frame.to_dict("records")))
        (d / f"{split}.csv").unlink()
    lines = (d / "train.jsonl").read_text().splitlines()
    (d / "train.jsonl").write_text("\n".join([*lines[:3], lines[3][:-3], *lines[4:]]) + "\n")  # one broken line
    d = folder("inf-score")  # a regression target of inf; the others are scores
    for split, n, at in (("train", 40, 0), ("validation", 10, 100), ("test", 10, 200)):
        (d / f"{split}.csv").write_text("text,label\n" + "".join(
            f"sample {at + i},{'inf' if split == 'test' and i == 0 else (i % 9) / 7}\n" for i in range(n)))
    d = folder("mixed-types")  # each file reads alone; a decimal label in test only
    (d / "test.csv").write_text("text,label\n" + "".join(f"sample {200 + i},{i / 7}\n" for i in range(10)))


@pytest.mark.parametrize("args, message", BATTERY, ids=[" ".join(a) for a, _ in BATTERY])
def test_bad_input_battery(args, message, battery_data, tmp_path, capsys, monkeypatch):
    """Each mistake: exit code 2, one `plr: error:` line naming the fix, no traceback, and no run dir left.

    Run in-process through `cli.main` (the subprocess path is covered in test_cli.py).
    """
    from partial_lora import cli

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # a case that would write into the working folder writes here
    args = [a.replace("DATA_DIR", str(battery_data)).replace("DATA", str(battery_data / "data.csv"))
            .replace("SRC", str(battery_data / "src")) for a in args]
    message = message.replace("DATA_DIR", str(battery_data))
    run_dir = None
    if any("CORRUPT" in a for a in args):
        corrupt = str(corrupt_run(tmp_path))
        args = [a.replace("CORRUPT", corrupt) for a in args]
    elif not any(a.startswith(("run_dir=", "out_root=")) for a in args):
        run_dir = tmp_path / "run"
        args = [*args, f"run_dir={run_dir}"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "experiment=smoke", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("plr: error:") and "\n" not in err, err
    assert message in err, err
    assert "Traceback" not in err
    if run_dir is not None:
        # no half-made run dir (.lock, .hydra, a fingerprint) for the next command to trip on
        assert not run_dir.exists()
    assert not any((tmp_path / "cwd").iterdir())


def test_a_full_disk_is_one_line_leaves_no_partial_file_and_a_rerun_completes(tmp_path, capsys, monkeypatch):
    """ENOSPC while retrain writes (its checkpoint or adapter): exit 2, one line, the finished stages kept,
    no temporary file left behind; once there is space again the same command finishes the run."""
    from partial_lora import artifacts, cli

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    real = artifacts.save_file

    def full_disk(tensors, path, metadata=None):
        if Path(path).parent.name == "retrain":
            Path(path).write_bytes(b"\0" * 64)  # the device filled up part way through the file
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real(tensors, path, metadata=metadata)

    run_dir = tmp_path / "run"
    args = ["train", "experiment=smoke", "trainer.checkpoint_every=2", f"run_dir={run_dir}"]
    monkeypatch.setattr(artifacts, "save_file", full_disk)
    with pytest.raises(SystemExit) as e:
        cli.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("plr: error: no space left on the disk of") and "\n" not in err, err
    assert "rerun the same command" in err
    assert [s for s in artifacts.STAGES if artifacts.is_done(run_dir, s)] == ["probe", "allocate", "extract"]
    assert not list(run_dir.rglob("*.tmp")) and not list((run_dir / "retrain").glob("*.safetensors"))
    monkeypatch.setattr(artifacts, "save_file", real)
    cli.main(args)
    assert json.loads((run_dir / "results.json").read_text())["status"] == "complete"


def test_battery_has_at_least_twenty_cases():
    assert len(BATTERY) >= 20


def test_full_error_shows_the_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-m", "partial_lora.cli", "train", "experiment=smoke", "adapter.r=0",
                          f"run_dir={tmp_path / 'run'}"], cwd=tmp_path, env={**ENV, "HYDRA_FULL_ERROR": "1"},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_tensors_json_and_tables_share_one_file_mode(tmp_path):
    """safetensors writes a fresh owner-only file; the run dir's files must all get the umask's mode."""
    import stat

    from partial_lora import artifacts

    artifacts.save_tensors(tmp_path / "a.safetensors", {"x": torch.zeros(2)})
    artifacts.write_json(tmp_path / "m.json", {"x": 1})
    artifacts.write_predictions(tmp_path / "p.parquet", {"index": [0, 1], "label": [1, 0]})
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert set(modes.values()) == {0o666 & ~artifacts.UMASK}, modes


def test_ctrl_c_prints_one_line_with_the_way_back_and_exits_130(tmp_path):
    run_dir = tmp_path / "run"
    # SIGINT as a terminal sends it, also when the tests run as a background job (which starts with it ignored)
    proc = subprocess.Popen([sys.executable, "-m", "partial_lora.cli", "train", *LONG,
                             f"run_dir={run_dir}"], cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ckpt = run_dir / "retrain" / checkpoint.FILE
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("plr:")]
    assert len(lines) == 1 and lines[0].startswith("plr: interrupted at retrain step ")
    assert lines[0].endswith(f"resume with `plr resume {run_dir}`")
    assert ckpt.exists() and not (run_dir / "retrain" / "done").exists()  # resumable, not marked done


def test_first_line_of_an_error_is_empty_not_an_index_error_when_the_message_is():
    from partial_lora.errors import first_line

    assert first_line(ValueError("bad value\n  at line 3")) == "bad value"
    assert first_line(OSError()) == "" and first_line(RuntimeError("\n")) == ""  # was IndexError in 4 places
    assert first_line("  padded \nrest") == "padded"
