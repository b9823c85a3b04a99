"""Bit-identical results across refactors: five tiny runs against the tensors and metrics they gave.

Each case runs the whole pipeline on a tiny config and compares, with `torch.equal` and `==`,
every tensor of `extract/masks.safetensors` (when the run has masks), `retrain/adapter.safetensors`
and `retrain/head.safetensors`, and the metrics of `results.json`, with
`tests/golden/<platform>/<case>.safetensors`. A change that is meant to alter results re-records
them, and says so in its commit:

    PLR_RECORD_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py

Floating-point results depend on the CPU kernels: the same torch and the same capability string
(AVX512) on another CPU model gave other last bits (1e-6 on an adapter entry). So recordings are
kept per platform (torch version, CPU capability, CPU family/model, torch threads); on a platform
with no recording the case is skipped with the platform named. The cases run at torch's default
thread count (the `default_threads` fixture), also under pytest-xdist, whose workers otherwise take
a share of the cores each (conftest.py). To add one, record on the commit
before a change (so the change is checked against what the code gave before it).
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


def _cpu_model() -> str:
    """`<family>.<model>` from /proc/cpuinfo (Linux), else the platform's processor string."""
    import platform

    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return f"{fields.get('cpu family', '?')}.{fields.get('model', '?')}"


def _platform() -> dict[str, str]:
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(), "cpu_model": _cpu_model(),
            "threads": str(torch.get_num_threads())}


def _golden_dir() -> Path:
    p = _platform()
    return GOLDEN / f"torch{p['torch'].split('+')[0]}-{p['cpu']}-{p['cpu_model']}-t{p['threads']}"


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
def test_results_are_bit_identical_to_the_recorded_ones(name, tmp_path, default_threads):
    golden = _golden_dir() / f"{name}.safetensors"
    if not RECORD:
        if not golden.exists():
            pytest.skip(f"no golden results for this platform {_platform()} ({golden.parent.name}); record them "
                        "with PLR_RECORD_GOLDEN=1 on the commit before a change")
        with safe_open(golden, "pt") as f:
            meta = f.metadata()
        assert json.loads(meta["platform"]) == _platform(), f"{golden} was recorded on another platform"
    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        cfg = compose("config", overrides=_case(name, tmp_path / "data"))
    results = run_pipeline(cfg, tmp_path / "run", echo=lambda s: None)
    tensors, numbers = _outputs(tmp_path / "run", results)
    assert tensors, "the run wrote no tensors"
    if RECORD:
        golden.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, golden,
                  metadata={"platform": json.dumps(_platform()), "results": json.dumps(numbers, sort_keys=True)})
        return
    want = load_file(golden)
    assert tensors.keys() == want.keys()
    changed = [k for k in want if not torch.equal(tensors[k], want[k])]
    assert not changed, f"tensors differ from the recorded ones: {changed[:5]}"
    assert numbers == json.loads(meta["results"])
