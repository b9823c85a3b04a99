"""Bit-identical results across refactors: five tiny runs against the tensors and metrics they gave.

Each case runs the whole pipeline on a tiny config and compares, with `torch.equal` and `==`,
every tensor of `extract/masks.safetensors` (when the run has masks), `retrain/adapter.safetensors`
and `retrain/head.safetensors`, and the metrics of `results.json`, with
`tests/golden/<platform>/<case>.safetensors`. A change that is meant to alter results re-records
them, and says so in its commit:

    PLR_RECORD_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py

Floating-point results depend on the CPU kernels: the same torch and the same capability string
(AVX512) on another CPU model gave other last bits (1e-6 on an adapter entry). So recordings are
kept per platform (torch version, CPU capability, CPU family/model, torch threads), and where one
exists for this platform the comparison is exact. The cases run at torch's default thread count
(the `default_threads` fixture), also under pytest-xdist, whose workers otherwise take a share of
the cores each (conftest.py). To add one, record on the commit before a change (so the change is
checked against what the code gave before it).

**On a platform with no recording** the case is compared with a recording of the same torch
version (the same thread count first) within a tolerance, so the guard runs on every machine:
- integer tensors (the masks' kept rows and columns), the tensors' names and shapes, the parameter
  counts and integer metrics are equal;
- each float tensor's largest difference is at most `RTOL` = 1e-3 of its largest magnitude, and each
  float metric is within `RTOL` (relative) or 1e-4 (absolute).
Why 1e-3: between the three recordings made on 2026-12-07 (AVX2 25.1, AVX512 6.167 and AVX512
25.17, all torch 2.14.1 at 2 threads) the largest such difference was 4.0e-5 (the dense case),
and every mask, count and metric was equal. A one-line change is far above it: label smoothing of
0.05 in the loss, or ranking rows and columns in the opposite order, fails the comparison
(`test_the_tolerance_catches_a_one_line_change`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from fixtures import write_commonsense, write_glue
from hydra import compose, initialize_config_module
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from partial_lora.pipeline.runner import run_pipeline

GOLDEN = Path(__file__).parent / "golden"
RECORD = os.environ.get("PLR_RECORD_GOLDEN") == "1"
FILES = ("extract/masks.safetensors", "retrain/adapter.safetensors", "retrain/head.safetensors")
RTOL = 1e-3  # relative to a tensor's largest magnitude; 25x the largest difference seen between platforms
ATOL_METRIC = 1e-4


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


def _reference(platform_dir: Path, name: str) -> Path | None:
    """This platform's recording of `name`, else one of the same torch version (same threads first)."""
    own = platform_dir / f"{name}.safetensors"
    if own.exists():
        return own
    p = _platform()
    prefix = f"torch{p['torch'].split('+')[0]}-"
    others = sorted((d for d in GOLDEN.glob(prefix + "*") if (d / f"{name}.safetensors").exists()),
                    key=lambda d: (not d.name.endswith(f"-t{p['threads']}"), d.name))
    return others[0] / f"{name}.safetensors" if others else None


def _read(golden: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(golden, "pt") as f:
        meta = f.metadata()
    return load_file(golden), {"platform": json.loads(meta["platform"]), "results": json.loads(meta["results"])}


def within_tolerance(got: dict[str, torch.Tensor], numbers: dict, want: dict[str, torch.Tensor],
                     want_numbers: dict) -> list[str]:
    """What differs beyond the cross-platform tolerance (empty: the results agree)."""
    if got.keys() != want.keys():
        return [f"tensors {sorted(set(got) ^ set(want))[:5]} are in one result only"]
    out = []
    for k, w in want.items():
        g = got[k]
        if g.shape != w.shape or g.dtype != w.dtype:
            out.append(f"{k}: {tuple(g.shape)} {g.dtype} != {tuple(w.shape)} {w.dtype}")
        elif not w.is_floating_point():
            if not torch.equal(g, w):
                out.append(f"{k}: integer entries differ")
        elif w.numel() and (g - w).abs().max() > RTOL * w.abs().max().clamp_min(1e-12):
            out.append(f"{k}: differs by {(g - w).abs().max().item():.2e} (max |x| {w.abs().max().item():.2e})")
    if numbers["params"] != want_numbers["params"]:
        out.append(f"params {numbers['params']} != {want_numbers['params']}")
    a, b = numbers["metrics"], want_numbers["metrics"]
    if a.keys() != b.keys():
        out.append(f"metrics {sorted(set(a) ^ set(b))} in one result only")
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        same = (x == y) if isinstance(y, int) and isinstance(x, int) else \
            math.isclose(x, y, rel_tol=RTOL, abs_tol=ATOL_METRIC)
        if not same:
            out.append(f"metric {k}: {x} != {y}")
    return out


def _run(name: str, tmp_path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        cfg = compose("config", overrides=_case(name, tmp_path / "data"))
    results = run_pipeline(cfg, tmp_path / "run", echo=lambda s: None)
    tensors, numbers = _outputs(tmp_path / "run", results)
    assert tensors, "the run wrote no tensors"
    return tensors, numbers


@pytest.mark.parametrize("name", ["partial", "dense", "uniform", "multi", "causal"])
def test_results_are_bit_identical_to_the_recorded_ones(name, tmp_path, default_threads):
    golden = _golden_dir() / f"{name}.safetensors"
    if RECORD:
        tensors, numbers = _run(name, tmp_path)
        golden.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, golden,
                  metadata={"platform": json.dumps(_platform()), "results": json.dumps(numbers, sort_keys=True)})
        return
    reference = _reference(golden.parent, name)
    if reference is None:
        pytest.skip(f"no golden results for torch {_platform()['torch']} ({golden.parent.name}); record them "
                    "with PLR_RECORD_GOLDEN=1 on the commit before a change")
    want, meta = _read(reference)
    tensors, numbers = _run(name, tmp_path)
    if reference == golden:  # this platform's own recording: bit for bit
        assert meta["platform"] == _platform(), f"{golden} was recorded on another platform"
        assert tensors.keys() == want.keys()
        changed = [k for k in want if not torch.equal(tensors[k], want[k])]
        assert not changed, f"tensors differ from the recorded ones: {changed[:5]}"
        assert numbers == meta["results"]
    else:
        diff = within_tolerance(tensors, numbers, want, meta["results"])
        assert not diff, f"results differ from {reference.parent.name}'s beyond the tolerance: {diff[:5]}"


def _nearest(name: str) -> Path:
    reference = _reference(_golden_dir(), name)
    if reference is None:
        pytest.skip(f"no golden results for torch {_platform()['torch']}")
    return reference


def test_the_recordings_agree_within_the_tolerance():
    """Every pair of recordings of one torch version passes the cross-platform comparison."""
    for name in ("partial", "dense", "uniform", "multi", "causal"):
        dirs = sorted(d for d in GOLDEN.iterdir() if (d / f"{name}.safetensors").exists())
        first = [_read(d / f"{name}.safetensors") for d in dirs]
        for (t0, m0), (t1, m1), d in zip(first, first[1:], dirs[1:]):
            if m0["platform"]["torch"] == m1["platform"]["torch"]:
                assert not within_tolerance(t1, m1["results"], t0, m0["results"]), (name, d.name)


@pytest.mark.parametrize("change", ["label smoothing in the loss", "rows and columns ranked in reverse"])
def test_the_tolerance_catches_a_one_line_change(change, tmp_path, default_threads, monkeypatch):
    """A one-line change to the loss or to the masks fails the cross-platform comparison."""
    import torch.nn.functional as F

    from partial_lora.adapter import masks

    if change.startswith("label"):
        name, ce = "dense", F.cross_entropy
        monkeypatch.setattr(F, "cross_entropy", lambda x, y, **kw: ce(x, y, label_smoothing=0.05, **kw))
    else:
        name, order = "partial", masks._order
        monkeypatch.setattr(masks, "_order", lambda scores: order(-scores))
    want, meta = _read(_nearest(name))
    tensors, numbers = _run(name, tmp_path)
    assert within_tolerance(tensors, numbers, want, meta["results"]), f"{change} passed the comparison"
