"""Training checkpoints that resume a killed run exactly, without pickle.

One file per stage, `<stage dir>/checkpoint.safetensors`, replaced atomically: the tensors are
the trainable parameters, the best state so far, the optimizer's state and the RNG states; its
metadata holds the rest as JSON (step, epoch, batches done in the epoch, best metric, history,
the optimizer's param groups, the scheduler's counters, numpy's and Python's RNG states, and a
fingerprint of the run that wrote it). Loading it back restores every one of them, so a resumed
run takes the same steps on the same batches as an uninterrupted one.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from partial_lora import artifacts, distributed
from partial_lora.errors import PlrError

FILE = "checkpoint.safetensors"


@dataclass
class Progress:
    """Where training stands (everything but tensors)."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0        # batches of `epoch` already consumed
    best: float = float("-inf")
    best_epoch: int = -1
    run_loss: float = 0.0
    bad_steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    epoch_gen_state: list[int] | None = None  # the data-order generator at the start of `epoch`


def save(path: Path, *, trainable: dict[str, Tensor], best_state: dict[str, Tensor], opt: torch.optim.Optimizer,
         sched: torch.optim.lr_scheduler.LRScheduler, progress: Progress, fingerprint: dict[str, Any]) -> None:
    """Write the whole training state to `path` (atomically).

    Under FSDP every process calls this: the sharded tensors are gathered whole, and rank 0 writes.
    """
    tensors: dict[str, Tensor] = {}
    tensors.update({f"param.{k}": distributed.full(v.detach()) for k, v in trainable.items()})
    tensors.update({f"best.{k}": v for k, v in best_state.items()})
    opt_state = opt.state_dict()
    for idx, state in opt_state["state"].items():
        for key, value in state.items():
            tensors[f"opt.{idx}.{key}"] = distributed.full(value) if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    sched_state = {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}
    meta = {
        "progress": asdict(progress),
        "param_groups": opt_state["param_groups"],
        "scheduler": sched_state,
        "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python_rng": random.getstate(),
        "fingerprint": fingerprint,
    }
    artifacts.save_tensors(path, {k: v.contiguous().cpu() for k, v in tensors.items()},
                           {"plr_checkpoint": json.dumps(meta, default=artifacts.json_default)})


def load(path: Path, *, trainable: dict[str, Tensor], opt: torch.optim.Optimizer,
         sched: torch.optim.lr_scheduler.LRScheduler,
         fingerprint: dict[str, Any]) -> tuple[Progress, dict[str, Tensor]]:
    """Restore a checkpoint into the live objects; return the progress and the best state.

    Raises:
        PlrError: a truncated file, or one written by another run (other settings or shapes).
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("plr_checkpoint", "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise PlrError(f"checkpoint {path} is unreadable ({e}); delete it to restart the stage from its "
                       "beginning") from None
    if not isinstance(meta, dict):
        raise PlrError(f"{path} is not a plr checkpoint; delete it to restart the stage from its beginning")
    ours = json.loads(json.dumps(fingerprint, default=artifacts.json_default))  # as it was stored
    if meta.get("fingerprint") != ours:
        theirs = meta.get("fingerprint") or {}
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise PlrError(f"checkpoint {path} was written by a run with other settings ({', '.join(diff)}); "
                       "delete it to restart the stage, or rerun with the settings it was made with")
    with torch.no_grad():
        for k, p in trainable.items():
            saved = tensors.get(f"param.{k}")
            if saved is None or saved.shape != p.shape:
                raise PlrError(f"checkpoint {path} does not fit this model ({k}); delete it to restart the stage")
            distributed.assign(p, saved.to(p.device))
    best_state = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")}
    opt_state: dict[str, Any] = {"state": {}, "param_groups": meta["param_groups"]}
    params = [p for g in opt.param_groups for p in g["params"]]  # the optimizer's index -> its parameter
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, key = k.split(".", 2)
            # A moment of a sharded parameter is sharded like it (FSDP); the step count stays whole.
            like = params[int(idx)] if v.shape == params[int(idx)].shape else v
            opt_state["state"].setdefault(int(idx), {})[key] = distributed.local_like(v.to(like.device), like)
    opt.load_state_dict(opt_state)
    sched_state = sched.state_dict()
    sched_state.update(meta["scheduler"])
    sched.load_state_dict(sched_state)
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    name, keys, *rest = meta["numpy_rng"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    version, state, gauss = meta["python_rng"]
    random.setstate((version, tuple(state), gauss))
    return Progress(**meta["progress"]), best_state


@dataclass
class Training:
    """What a checkpoint holds, live: the tensors that learn, the best of them so far, the optimizer,
    the schedule and the progress. `start` resumes it from `path` when that file exists."""

    trainable: dict[str, Tensor]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    fingerprint: dict[str, Any]
    path: Path | None
    progress: Progress = field(default_factory=Progress)
    best_state: dict[str, Tensor] = field(default_factory=dict)
    resumed: bool = False

    def snapshot(self) -> dict[str, Tensor]:
        # Everything that learns (adapter and head, plr's or PEFT's) and nothing else: small.
        # Whole tensors (FSDP gathers them), so a checkpoint stores them as they are.
        return {n: distributed.full(p.detach()).clone() for n, p in self.trainable.items()}

    @classmethod
    def start(cls, path: Path | None, trainable: dict[str, Tensor], opt: torch.optim.Optimizer,
              sched: torch.optim.lr_scheduler.LRScheduler, fingerprint: dict[str, Any]) -> Training:
        t = cls(trainable, opt, sched, fingerprint, path)
        t.best_state = t.snapshot()
        if path is not None and path.exists():
            t.progress, t.best_state = load(path, trainable=trainable, opt=opt, sched=sched, fingerprint=fingerprint)
            t.resumed = True
        return t

    def save(self) -> None:
        if self.path is not None:
            save(self.path, trainable=self.trainable, best_state=self.best_state, opt=self.opt, sched=self.sched,
                 progress=self.progress, fingerprint=self.fingerprint)

    def restore_best(self) -> None:
        for n, v in self.best_state.items():
            distributed.assign(self.trainable[n], v)
