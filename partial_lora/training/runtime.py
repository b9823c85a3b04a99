"""Where and how a run computes: its seeds, its device, the autocast dtype, deterministic kernels.

`set_seed` comes before any model is built; `resolve_device` and `autocast_dtype` turn
`trainer.device` and `trainer.precision` into what `loop.fit` and `predict.predict` run on.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from partial_lora.errors import PlrError
from partial_lora.training.recipe import TrainConfig


def set_seed(seed: int) -> None:
    """Seed every RNG a run touches; call before any model is built."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PlrError(f"device '{name}' asked for but CUDA is not available; set trainer.device=cpu or auto")
    return torch.device(name)


def reset_peak_memory(device: torch.device) -> None:
    """Start counting the peak of `peak_memory` here (CUDA; a process's peak RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float | str | None]:
    """The peak memory of the training: on CUDA the most tensor memory allocated on the device since
    `reset_peak_memory` (`cuda_max_allocated`); elsewhere the process's peak resident set size
    (`max_rss`, from `resource.getrusage`), which counts everything the process ever held: the model,
    the data, Python, and the stages that ran before in the same process."""
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20,
                "peak_memory_measure": "cuda_max_allocated"}
    try:
        import resource
    except ImportError:  # not on Unix: no measure
        return {"peak_memory_mb": None, "peak_memory_measure": None}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"peak_memory_mb": rss / 2**20 if sys.platform == "darwin" else rss / 2**10,
            "peak_memory_measure": "max_rss"}


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.precision == "fp32" or (cfg.precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def to_device(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def use_deterministic_algorithms() -> None:
    """Deterministic kernels everywhere (`trainer.deterministic=true`).

    On CUDA this costs speed: cuBLAS needs a fixed workspace (`CUBLAS_WORKSPACE_CONFIG`, set
    here before the first CUDA matmul), cuDNN stops autotuning, some ops use slower
    deterministic kernels, and an op without one raises an error instead of running.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)
