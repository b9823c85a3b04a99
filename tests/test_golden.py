"""Bit-identical results across refactors: five tiny runs against the tensors and metrics they gave.

Each case runs the whole pipeline on a tiny config and compares, with `torch.equal` and `==`,
every tensor of `extract/masks.safetensors` (when the run has masks), `retrain/adapter.safetensors`
and `retrain/head.safetensors`, and the metrics of `results.json`, with `tests/golden/<case>.safetensors`.
A change that is meant to alter results re-records them, and says so in its commit:

    PLR_RECORD_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py

Floating-point results depend on the CPU kernels, so a golden file holds the torch version and
the CPU capability it was recorded with; on another pair the case is skipped with both named.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fixtures import write_commonsense, write_glue
from partial_lora.stages import run_pipeline

GOLDEN = Path(__file__).parent / "golden"
RECORD = os.environ.get("PLR_RECORD_GOLDEN") == "1"
FILES = ("extract/masks.safetensors", "retrain/adapter.safetensors", "retrain/head.safetensors")


def _platform() -> dict[str, str]:
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}


def _case(name: str, data: Path) -> list[str]:
    """The overrides of each case (generated data under `data`)."""
    if name == "partial":  # the offline demo's shape: Partial-LoRA auto
        return ["experiment=smoke"]
    if name == "dense":
        return ["experiment=smoke", "adapter=lora"]
    if name == "uniform":
        return ["experiment=smoke", "adapter=uniform", "adapter.sparsity=0.75"]
    if name == "multi":
        return ["experiment=smoke", "task=multi", "task.names=[bbc-news,sst2]",
                f"+task.members.sst2.path={write_glue(data / 'glue', 'sst2')}", "trainer.lr=0.02"]
    if name == "causal":
        return ["experiment=smoke", "model=tiny-llama", "task=arc-e",
                f"task.path={write_commonsense(data / 'arc', 'arc-e')}", "trainer.lr=0.01"]
    raise KeyError(name)


def _outputs(run_dir: Path, results: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {}
    for f in FILES:
        if (run_dir / f).exists():
            tensors.update({f"{f}:{k}": v for k, v in load_file(run_dir / f).items()})
    metrics = {k: v for k, v in results["metrics"].items()}
    return tensors, {"metrics": metrics, "params": results["params"]}


@pytest.mark.parametrize("name", ["partial", "dense", "uniform", "multi", "causal"])
def test_results_are_bit_identical_to_the_recorded_ones(name, tmp_path):
    golden = GOLDEN / f"{name}.safetensors"
    if not RECORD:
        if not golden.exists():
            pytest.fail(f"{golden} is missing; record it with PLR_RECORD_GOLDEN=1")
        with safe_open(golden, "pt") as f:
            meta = f.metadata()
        recorded = json.loads(meta["platform"])
        if recorded != _platform():
            pytest.skip(f"golden results were recorded on {recorded}, this is {_platform()}")
    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        cfg = compose("config", overrides=_case(name, tmp_path / "data"))
    results = run_pipeline(cfg, tmp_path / "run", echo=lambda s: None)
    tensors, numbers = _outputs(tmp_path / "run", results)
    assert tensors, "the run wrote no tensors"
    if RECORD:
        GOLDEN.mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, golden,
                  metadata={"platform": json.dumps(_platform()), "results": json.dumps(numbers, sort_keys=True)})
        return
    want = load_file(golden)
    assert tensors.keys() == want.keys()
    changed = [k for k in want if not torch.equal(tensors[k], want[k])]
    assert not changed, f"tensors differ from the recorded ones: {changed[:5]}"
    assert numbers == json.loads(meta["results"])
