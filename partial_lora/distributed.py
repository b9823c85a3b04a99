"""Data parallel training under `torchrun` / `accelerate launch`, on torch's DistributedDataParallel.

When the launcher sets `WORLD_SIZE` > 1:

- the stages that are not data parallel (the probe, the allocation search, extract, evaluate)
  run on rank 0 alone, inside `alone()`; the other ranks wait at a barrier and then read what
  rank 0 wrote (the run dir is the contract between them);
- the retrain stage trains under `DistributedDataParallel` (bucketed all-reduce overlapped with
  the backward pass; `no_sync` on the micro-batches of a gradient accumulation). Its loader
  draws the one-process order of examples from the same generator and batches it, and each
  process loads and collates only its rows of every batch (`ShardedBatches`), so the adapter
  after every step is the one a single process would have (up to float summation order).

With `trainer.strategy=fsdp` (for a base that does not fit one device) every process runs every
stage, on a model whose parameters are sharded over the processes with FSDP2's `fully_shard`
(`shard`): each repeated block is one unit, the backbone the root. A unit's parameters are
gathered for its forward and backward and freed after, so a process holds 1/W of the frozen base
between them. The probe and the retrain train data parallel as above (FSDP reduce-scatters the
gradients of the LoRA factors and the head); the allocation search, extract and evaluate compute
the same thing on every process. Whatever leaves the model (adapter and head files, checkpoints,
the W0 slices the masks come from) is gathered to whole tensors first (`full`), and whatever
goes in is cut back to this process's shard (`assign`), so the run dir holds the same plain
safetensors as a one-process run.

Rank 0 alone writes files. CPU processes use the gloo backend, CUDA processes NCCL with one GPU
per process (`LOCAL_RANK`).

    torchrun --nproc_per_node 4 -m partial_lora.cli train experiment=vtab task=cifar100 run_dir=<dir>
    accelerate launch --num_processes 4 -m partial_lora.cli train ... run_dir=<dir>
    torchrun --nproc_per_node 8 -m partial_lora.cli train experiment=commonsense trainer.strategy=fsdp run_dir=<dir>
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from collections.abc import Iterator, Sized

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Sampler

# The other ranks wait at a barrier while rank 0 probes and searches alone: give it time.
TIMEOUT = datetime.timedelta(hours=4)
STRATEGIES = ("ddp", "fsdp")
_alone = False
_strategy = "ddp"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Whether this process writes files (always, unless it is a non-zero rank of a launch)."""
    return rank() == 0


def launched() -> bool:
    """Whether this is one process of a multi-process launch."""
    return world_size() > 1


def use(strategy: str) -> None:
    """Set the multi-process strategy (`trainer.strategy`): ddp (replicated model) or fsdp (sharded)."""
    global _strategy
    if strategy not in STRATEGIES:
        raise ValueError(f"trainer.strategy '{strategy}' must be one of {', '.join(STRATEGIES)}")
    _strategy = strategy


def sharded() -> bool:
    """Whether this launch shards the model (FSDP): then every process runs every stage."""
    return launched() and _strategy == "fsdp"


def active() -> bool:
    """Whether training here is data parallel: a multi-process launch, outside `alone()`."""
    return launched() and not _alone


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Rank 0 runs a stage by itself: inside, it trains and evaluates as a single process would."""
    global _alone
    _alone, before = True, _alone
    try:
        yield
    finally:
        _alone = before


def init(device: torch.device) -> torch.device:
    """Join the process group (once) and return this process's device.

    A CUDA device becomes `cuda:<LOCAL_RANK>`; CPU stays CPU (gloo).
    """
    if not launched():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return device


def barrier() -> None:
    if active() and dist.is_initialized():
        dist.barrier()


def _all_reduce(value: float | int, dtype: torch.dtype, op: dist.ReduceOp.RedOpType) -> float | int:
    """`value` reduced over the processes with `op` (every process must call it)."""
    t = torch.tensor([value], dtype=dtype)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=op)
    return t.item()


def any_flag(flag: bool) -> bool:
    """True on every process when it is true on any (keeps skip decisions the same everywhere)."""
    return bool(_all_reduce(float(flag), torch.float32, dist.ReduceOp.MAX)) if active() else flag


def sum_int(n: int) -> int:
    """The sum of `n` over the processes (every process must call it)."""
    return int(_all_reduce(n, torch.int64, dist.ReduceOp.SUM)) if active() else n


def wrap(model: torch.nn.Module, device: torch.device, *, find_unused: bool) -> torch.nn.Module:
    """The model under DistributedDataParallel when training is data parallel, else itself.

    `find_unused`: some trainable parameters may get no gradient in a step (a multi-task model's
    heads of the tasks absent from a batch, some PEFT adapters).
    """
    if not active() or sharded():
        return model  # one process, or sharded by `shard` when it was built (FSDP syncs the gradients itself)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused)


def sync_unless(model: torch.nn.Module, last_micro_batch: bool) -> contextlib.AbstractContextManager:
    """No gradient sync on the micro-batches before the last one of a gradient accumulation:
    DDP's `no_sync`, FSDP's `set_requires_gradient_sync(False)`."""
    if last_micro_batch:
        return contextlib.nullcontext()
    if sharded():
        return _fsdp_no_sync(model)
    no_sync = getattr(model, "no_sync", None)
    return contextlib.nullcontext() if no_sync is None else no_sync()


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module) -> Iterator[None]:
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for u in units:
        u.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for u in units:
            u.set_requires_gradient_sync(True, recurse=False)


def shard(root: nn.Module, blocks: list[nn.Module]) -> None:
    """FSDP2 over all processes: each of `blocks` is one unit, `root` holds the rest (embeddings,
    final norm, head). Frozen and trainable parameters alike are cut into W shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    kind = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(kind, (world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(root, mesh=mesh)


def _is_dtensor(t: object) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: Tensor) -> Tensor:
    """The whole tensor: a sharded parameter (or its optimizer state, or a gradient norm) is
    gathered from every process, so under FSDP every process must call this together."""
    return t.full_tensor() if _is_dtensor(t) else t  # type: ignore[attr-defined]


def local_like(value: Tensor, like: Tensor) -> Tensor:
    """`value` (a whole tensor, the same on every process) cut like the sharded `like`; as is if `like` is whole."""
    if not _is_dtensor(like):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.detach().to(like.device), like.device_mesh, like.placements,  # type: ignore[attr-defined]
                             src_data_rank=None)  # every process holds the whole value: no communication


def assign(param: Tensor, value: Tensor) -> None:
    """Copy a whole tensor into a parameter, sharded or not (under no_grad)."""
    with torch.no_grad():
        param.copy_(local_like(value.to(param.dtype), param))


def owned_numel(model: nn.Module, *, trainable: bool) -> int:
    """Elements of the (frozen or trainable) parameters this process holds: its shards under FSDP."""
    return sum((p.to_local() if _is_dtensor(p) else p).numel()  # type: ignore[attr-defined]
               for p in model.parameters() if p.requires_grad == trainable)


class ShardedBatches(Sampler[list[int]]):
    """The one-process batches of `sampler`'s order, each split over the processes.

    Batch i holds the examples i·B .. i·B+B-1 of the order (B = `batch_size`, the global batch);
    this process takes its rows `rank, rank + W, ...` of it, so it loads and collates only those.
    Every process yields the same number of batches. A last batch with fewer rows than processes
    leaves some with no row: they get its first row, and `rows(i)` says it weighs nothing.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, rank: int, world: int) -> None:
        self.sampler, self.batch_size, self.rank, self.world = sampler, batch_size, rank, world
        self.n = len(sampler) if isinstance(sampler, Sized) else 0

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        batch: list[int] = []
        for idx in self.sampler:
            batch.append(idx)
            if len(batch) == self.batch_size:
                yield batch[self.rank::self.world] or batch[:1]
                batch = []
        if batch:
            yield batch[self.rank::self.world] or batch[:1]

    def rows(self, i: int) -> tuple[int, int]:
        """(this process's rows, the global batch's rows) of batch i of an epoch."""
        total = max(0, min(self.batch_size, self.n - i * self.batch_size))
        return len(range(self.rank, total, self.world)), total
