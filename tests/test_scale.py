"""Scale: the SLURM launcher config, the tokenisation cache, torch.compile, and the lint check."""

import re
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


# Dense LoRA runs in the slow suite: the Partial-LoRA case trains the same retrain stage under DDP
# (with accumulation besides), and two processes take both of CI's cores for half a minute.
@pytest.mark.parametrize("adapter", [pytest.param("lora", marks=pytest.mark.slow), "partial"])
def test_two_process_data_parallel_matches_one_process(tmp_path, adapter):
    """torchrun with 2 CPU processes (gloo) trains the same adapter as one process: dense LoRA, and
    Partial-LoRA (probe, allocation search and a sparse retrain, all under the two processes).

    Dropout is off: with it, the processes draw other dropout masks than one process would. The
    learning rate is moderate: Adam's normalised step turns the float summation order of a
    near-zero gradient into a visible difference at high rates (5e-2 gave 1.2e-5 on one entry).
    """
    import json
    import os

    from safetensors.torch import load_file

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1"}
    # Partial-LoRA also accumulates (2 micro-batches of 4 per step): DDP's no_sync on the first.
    batch = ["trainer.batch_size=8"] if adapter == "lora" else ["trainer.batch_size=4", "trainer.grad_accum=2"]
    over = ["experiment=smoke", f"adapter={adapter}", "trainer.max_steps=8", *batch, "trainer.lr=0.01",
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
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a) and any(a[k].abs().max() > 1e-3 for k in a)
    ra, rb = (json.loads((tmp_path / d / "results.json").read_text())["metrics"] for d in ("one", "two"))
    assert ra == rb
    # Each process loaded only its half of every batch: 8 steps of 8 rows, 4 each.
    read = sorted(re.findall(r"rank (\d) of 2 trained on (\d+) examples in 8 steps", two.stdout))
    assert read == [("0", "32"), ("1", "32")], two.stdout[-2000:]
    # Rank 0 alone probed and searched: the other rank never ran those stages.
    if adapter == "partial":
        assert two.stdout.count("[plr] probe ...") == 1 and two.stdout.count("[plr] allocate ...") == 1
    assert two.stdout.count("[plr] retrain ...") == 2


def test_multi_process_launch_needs_an_explicit_run_dir(tmp_path):
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WORLD_SIZE": "2", "RANK": "0"}
    res = subprocess.run([sys.executable, "-m", "partial_lora.cli", "train", "experiment=smoke"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "add run_dir=<dir>" in res.stderr


def test_sharded_batches_split_the_one_process_batches_and_weigh_each_share():
    from partial_lora.distributed import ShardedBatches

    order = [7, 3, 9, 0, 5, 1, 8, 2, 6, 4]  # a sampler's order of 10 examples
    world, size = 3, 4
    shards = [ShardedBatches(order, size, r, world) for r in range(world)]
    per_rank = [list(s) for s in shards]
    assert all(len(s) == len(b) == 3 for s, b in zip(shards, per_rank))  # every rank takes the same steps
    for i, one in enumerate([order[0:4], order[4:8], order[8:10]]):
        got = [(b[i], s.rows(i)) for s, b in zip(shards, per_rank)]
        real = [rows[:mine] for rows, (mine, total) in got]
        assert sorted(x for r in real for x in r) == sorted(one)  # the ranks' rows are the one-process batch
        assert all(total == len(one) for _, (_, total) in got)
    # The last batch has 2 rows for 3 ranks: rank 2 gets a row lent to keep it in step, weighing nothing.
    assert per_rank[2][2] == [order[8]] and shards[2].rows(2) == (0, 2)
    assert [s.rows(0) for s in shards] == [(2, 4), (1, 4), (1, 4)]
