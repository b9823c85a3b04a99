"""Scale: the SLURM launcher config, the tokenisation cache, torch.compile, and the lint check."""

import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from hydra import compose, initialize_config_module

from partial_lora import config
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
    from partial_lora.pipeline.runner import run_pipeline

    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", "adapter=lora", "trainer.max_steps=1",
                                           "trainer.compile=true"])
    import shutil

    if not any(shutil.which(c) for c in ("cc", "gcc", "clang", "g++")):
        pytest.skip("torch.compile's inductor needs a C compiler, and this machine has none (cc, gcc, clang)")
    res = run_pipeline(cfg, tmp_path, echo=lambda s: None)  # with a compiler, any failure is a real one
    assert res["status"] == "complete"


def test_ruff_finds_nothing():
    """The lint `make test` runs first (pyproject's [tool.ruff]: pyflakes, pycodestyle, import order)."""
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def _overrides(adapter: str) -> list[str]:
    # Partial-LoRA also accumulates (2 micro-batches of 4 per step): no gradient sync on the first.
    batch = ["trainer.batch_size=8"] if adapter == "lora" else ["trainer.batch_size=4", "trainer.grad_accum=2"]
    return ["experiment=smoke", f"adapter={adapter}", "trainer.max_steps=8", *batch, "trainer.lr=0.01",
            "+model.config.hidden_dropout_prob=0", "+model.config.attention_probs_dropout_prob=0"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The one-process run of each adapter (shared by the DDP and FSDP comparisons)."""
    import os

    runs: dict[str, Path] = {}

    def get(adapter: str) -> Path:
        if adapter not in runs:
            d = tmp_path_factory.mktemp(f"one-{adapter}")
            res = subprocess.run([sys.executable, "-m", "partial_lora.cli", "train", *_overrides(adapter),
                                  f"run_dir={d / 'run'}"], cwd=d, env={**os.environ, **_ENV},
                                 capture_output=True, text=True, timeout=300)
            assert res.returncode == 0, res.stderr[-2000:]
            runs[adapter] = d / "run"
        return runs[adapter]

    return get


# Dense LoRA runs in the slow suite: the Partial-LoRA cases train the same retrain stage (with
# accumulation besides), and two processes take both of CI's cores for half a minute each.
@pytest.mark.parametrize(("adapter", "strategy"), [pytest.param("lora", "ddp", marks=pytest.mark.slow),
                                                   ("partial", "ddp"), ("partial", "fsdp")])
def test_two_process_data_parallel_matches_one_process(tmp_path, one_process, adapter, strategy):
    """torchrun with 2 CPU processes (gloo) trains the same adapter as one process: dense LoRA, and
    Partial-LoRA (probe, allocation search and a sparse retrain, all under the two processes), on
    DDP (rank 0 alone probes and searches) and on FSDP (the model sharded; both ranks run every stage).

    Dropout is off: with it, the processes draw other dropout masks than one process would. The
    learning rate is moderate: Adam's normalised step turns the float summation order of a
    near-zero gradient into a visible difference at high rates (5e-2 gave 1.2e-5 on one entry).
    """
    import json
    import os

    from safetensors.torch import load_file

    one = one_process(adapter)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29511" if strategy == "ddp" else "29512", "-m", "partial_lora.cli", "train",
                          *_overrides(adapter), f"trainer.strategy={strategy}", f"run_dir={tmp_path / 'two'}"],
                         cwd=tmp_path, env={**os.environ, **_ENV}, capture_output=True, text=True, timeout=300)
    said = [ln for ln in two.stderr.splitlines() if ln.startswith(("plr", "[plr]", "Traceback")) or "Error" in ln]
    assert two.returncode == 0, "\n".join(said[-30:]) or two.stderr[-2000:]  # plr's lines, not torchrun's report
    for f in ("extract/masks.safetensors",) if adapter == "partial" else ():
        ma, mb = load_file(one / f), load_file(tmp_path / "two" / f)
        assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)  # the same allocation
    for f in ("retrain/adapter.safetensors", "retrain/head.safetensors"):  # plain tensors, keyed as one process's
        a, b = load_file(one / f), load_file(tmp_path / "two" / f)
        assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a) and any(a[k].abs().max() > 1e-3 for k in a)
    ra, rb = (json.loads((d / "results.json").read_text())["metrics"] for d in (one, tmp_path / "two"))
    assert ra == rb
    # Each process loaded only its half of every batch: 8 steps of 8 rows, 4 each.
    read = sorted(re.findall(r"rank (\d) of 2 trained on (\d+) examples in 8 steps", two.stdout))
    assert read == [("0", "32"), ("1", "32")], two.stdout[-2000:]
    if strategy == "ddp" and adapter == "partial":  # rank 0 alone probed and searched
        assert two.stdout.count("[plr] probe ...") == 1 and two.stdout.count("[plr] allocate ...") == 1
    if strategy == "fsdp":  # every rank ran every stage, each holding half of the frozen base
        assert two.stdout.count("[plr] probe ...") == 2 and two.stdout.count("[plr] allocate ...") == 2
        held = re.findall(r"fsdp: rank (\d) of 2 holds ([\d,]+) of ([\d,]+) frozen", two.stdout)
        assert {r for r, _, _ in held} == {"0", "1"}
        for _, mine, total in held:
            assert abs(int(mine.replace(",", "")) - int(total.replace(",", ""))
                       / 2) <= 0.01 * int(total.replace(",", ""))
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


@pytest.mark.slow
def test_two_processes_train_a_multi_task_causal_lm_as_one_process_does(tmp_path):
    """tiny-llama on ARC-e + BoolQ with gradient checkpointing, 2 CPU processes, DDP and FSDP: the
    adapter matches one process's and the metrics are equal. The LLM's loss is a mean over answer
    tokens, which the two processes' rows hold unequally, so each process's loss weighs its share
    of the tokens (with a share of the rows instead the adapters differed by 1.2e-3). Under FSDP
    the model scores through the root's forward (which gathers the embeddings and the tied LM head)."""
    import json
    import os

    from fixtures import write_commonsense
    from safetensors.torch import load_file

    arc, boolq = write_commonsense(tmp_path / "arc", "arc-e"), write_commonsense(tmp_path / "boolq", "boolq")
    over = ["experiment=smoke", "model=tiny-llama", "task=multi", "task.names=[arc-e,boolq]",
            f"+task.members.arc-e.path={arc}", f"+task.members.boolq.path={boolq}", "adapter.probe.shots=3",
            "adapter.probe.val_shots=3", "trainer.lr=0.01", "+model.gradient_checkpointing=true", "trainer.max_steps=6"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    for name, cmd in (("one", [sys.executable]), ("ddp", [*launch, "29513"]), ("fsdp", [*launch, "29514"])):
        res = subprocess.run([*cmd, "-m", "partial_lora.cli", "train", *over, f"run_dir={tmp_path / name}",
                              *([f"trainer.strategy={name}"] if name != "one" else [])], cwd=tmp_path,
                             env={**os.environ, **_ENV}, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
    want = load_file(tmp_path / "one" / "retrain" / "adapter.safetensors")
    metrics = json.loads((tmp_path / "one" / "results.json").read_text())["metrics"]
    for name in ("ddp", "fsdp"):
        got = load_file(tmp_path / name / "retrain" / "adapter.safetensors")
        assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], atol=1e-5) for k in want), name
        assert json.loads((tmp_path / name / "results.json").read_text())["metrics"] == metrics, name


def test_fsdp_refuses_the_peft_baselines_in_one_line(monkeypatch):
    """trainer.strategy=fsdp shards plr's own layers: a PEFT baseline is refused before any process
    group is joined (so the error reaches the user instead of a hang)."""
    from partial_lora import distributed
    from partial_lora.errors import PlrError
    from partial_lora.working_set.build import setup

    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", "adapter=peft_lora", "trainer.strategy=fsdp"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed, "_strategy", "fsdp")
    with pytest.raises(PlrError, match="adapter=peft_lora .*runs with trainer.strategy=ddp"):
        setup(config.validate(cfg))
