"""Data parallel training under `torchrun` / `accelerate launch`, with nothing to change for the user.

When the launcher sets `WORLD_SIZE` > 1, every process runs the same pipeline on the same
data (all stages are deterministic given the seed), and only the training step is split:
each process takes its share of every batch, and the adapter's gradients are summed over the
processes before the optimizer step, so every process holds the same weights after every step
(the adapter is small: the all-reduce is cheap). Rank 0 alone writes files; the others wait at
a barrier around every stage, so all of them see the same finished stages.

    torchrun --nproc_per_node 4 -m partial_lora.cli train experiment=vtab task=cifar100 run_dir=<dir>
    accelerate launch --num_processes 4 -m partial_lora.cli train ... run_dir=<dir>

CPU processes use the gloo backend, CUDA processes NCCL with one GPU per process (`LOCAL_RANK`).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Whether this process writes files (always, unless it is a non-zero rank of a launch)."""
    return rank() == 0


def active() -> bool:
    return world_size() > 1


def init(device: torch.device) -> torch.device:
    """Join the process group (once) and return this process's device.

    A CUDA device becomes `cuda:<LOCAL_RANK>`; CPU stays CPU (gloo).
    """
    if not active():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def barrier() -> None:
    if active() and dist.is_initialized():
        dist.barrier()


def shard(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
    """This process's rows of a batch, and their share of the batch (weights the local loss)."""
    if not active():
        return batch, 1.0
    n = len(batch["labels"])
    mine = {k: v[rank()::world_size()] for k, v in batch.items()}
    return mine, len(mine["labels"]) / n


def any_flag(flag: bool) -> bool:
    """True on every process when it is true on any (keeps skip decisions the same everywhere)."""
    if not active():
        return flag
    t = torch.tensor([float(flag)])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients over processes (each local loss was weighted by its share of the batch)."""
    if not active():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
