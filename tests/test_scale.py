"""Scale: the SLURM launcher config, the tokenisation cache, torch.compile, and the lint check."""

import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from hydra import compose, initialize_config_module

from partial_lora.data.collate import TextCollate, pretokenize

ROOT = Path(__file__).resolve().parents[1]


def test_slurm_launcher_config_composes():
    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                           "experiment=vtab", "task=dtd"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.partition, launcher.tasks_per_node) == (1, "gpu", 1)


def test_pretokenised_batches_equal_on_the_fly_ones():
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "sat", "on", "mat", "a", "dog"]
    path = ROOT / "tests" / ".vocab.txt"
    tok = None
    try:
        path.write_text("\n".join(vocab))
        tok = BertTokenizerFast(vocab_file=str(path))
    finally:
        path.unlink(missing_ok=True)
    ds = datasets.Dataset.from_dict({"text": ["the cat sat on the mat", "a dog", "the dog sat"],
                                     "text_pair": ["a cat", "the mat on the mat", "dog"], "label": [0, 1, 0]})
    rows = [ds[i] for i in range(3)]
    pre = pretokenize(ds, tok, max_length=8)
    assert set(pre.column_names) == {"input_ids", "token_type_ids", "attention_mask", "label"}
    a, b = TextCollate(tok, 8)(rows), TextCollate(tok, 8)([pre[i] for i in range(3)])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["input_ids"].shape[1] == 8  # truncated to max_length


@pytest.mark.slow  # inductor compiles for about a minute on 2 CPU cores
def test_compile_flag_trains(tmp_path):
    from partial_lora.stages import run_pipeline

    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", "adapter=lora", "trainer.max_steps=1",
                                           "trainer.compile=true"])
    import shutil

    if not any(shutil.which(c) for c in ("cc", "gcc", "clang", "g++")):
        pytest.skip("torch.compile's inductor needs a C compiler, and this machine has none (cc, gcc, clang)")
    res = run_pipeline(cfg, tmp_path, echo=lambda s: None)  # with a compiler, any failure is a real one
    assert res["status"] == "complete"


def test_no_unused_imports_or_undefined_names():
    res = subprocess.run([sys.executable, "-m", "pyflakes", "partial_lora", "tests", "experiments", "benchmarks"],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("adapter", ["lora", "partial"])
def test_two_process_data_parallel_matches_one_process(tmp_path, adapter):
    """torchrun with 2 CPU processes (gloo) trains the same adapter as one process: dense LoRA, and
    Partial-LoRA (probe, allocation search and a sparse retrain, all under the two processes).

    Dropout is off: with it, the processes draw other dropout masks than one process would.
    """
    import json
    import os

    from safetensors.torch import load_file

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1"}
    over = ["experiment=smoke", f"adapter={adapter}", "trainer.max_steps=8", "trainer.batch_size=8", "trainer.lr=0.05",
            "+model.config.hidden_dropout_prob=0", "+model.config.attention_probs_dropout_prob=0"]
    one = subprocess.run([sys.executable, "-m", "partial_lora.cli", "train", *over, f"run_dir={tmp_path / 'one'}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29511", "-m", "partial_lora.cli", "train", *over, f"run_dir={tmp_path / 'two'}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    for f in ("extract/masks.safetensors",) if adapter == "partial" else ():
        ma, mb = (load_file(tmp_path / d / f) for d in ("one", "two"))
        assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)  # the same allocation
    a, b = (load_file(tmp_path / d / "retrain" / "adapter.safetensors") for d in ("one", "two"))
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a) and any(a[k].abs().max() > 1e-3 for k in a)
    ra, rb = (json.loads((tmp_path / d / "results.json").read_text())["metrics"] for d in ("one", "two"))
    assert ra.keys() == rb.keys() and all(abs(ra[k] - rb[k]) < 1e-4 for k in ra)


def test_multi_process_launch_needs_an_explicit_run_dir(tmp_path):
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WORLD_SIZE": "2", "RANK": "0"}
    res = subprocess.run([sys.executable, "-m", "partial_lora.cli", "train", "experiment=smoke"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "add run_dir=<dir>" in res.stderr
