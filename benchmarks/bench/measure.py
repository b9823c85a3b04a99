"""Measurement: one variant's training step (`Stepper`), interleaved timing, memory and its analytic limit."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from partial_lora.adapter.inject import lora_layers

MiB = 2**20


@dataclass
class Result:
    label: str
    adapter_params: int
    step_ms: float
    saved_mib: float  # saved-for-backward + optimizer state (both devices)
    cuda_mib: float | None = None  # step peak minus allocated before (CUDA only)
    loss: float = float("nan")
    times: list[float] = field(default_factory=list)  # seconds, one per round
    kind: str = ""  # "floor" | "peft" | "ours"
    density: float | None = None
    limit_mib: float | None = None  # plr's adapter: the least it can save above the floor (`adapter_limit`)
    shared: bool = False  # ours with adapter.mask.shared_input (one gather per input group)

    def memory(self, device: torch.device) -> float:
        """The headline memory: the CUDA step peak on CUDA, the saved-tensor proxy on CPU."""
        return self.cuda_mib if device.type == "cuda" and self.cuda_mib is not None else self.saved_mib


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _storage_key(t: Tensor) -> tuple[int, int] | None:
    try:
        s = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensors without storage (rare wrappers)
        return None
    return (s.data_ptr(), s.nbytes())


def adapter_limit(model: nn.Module) -> tuple[Callable[[], float], list]:
    """The least plr's LoRA branches can add to the floor's memory, counted in one forward pass:
    per branch its rank-r code h (N × r) and the scattered B (d_out × r, unless every row is kept),
    the input at its kept columns x_C (N × |C|), or, for a branch that keeps every column, the
    input itself once per distinct input (layers that read the same tensor, as q and v do, share
    it), and AdamW's two moments per adapter parameter (and its step count per factor). With per-layer column
    sets, two sparse
    layers on one input save two x_C where dense LoRA saves one x: the limit counts that. A
    branch in an input group (`adapter.mask.shared_input`) instead shares its group's x_U (N × |U|,
    U the union of the group's kept columns) once per input, and, when its own columns are not
    all of U and x requires grad, saves its A scattered into U (r × |U|).

    Returns (a function giving the MiB counted so far, the hook handles to remove)."""
    shared: dict[tuple, int] = {}
    own = [0]

    def hook(mod: nn.Module, args: tuple) -> None:
        x = args[0]
        es = x.element_size()
        n = x.numel() // mod.in_features
        for b in mod.branches.values():
            own[0] += (n * b.r + (0 if b.all_rows else mod.out_features * b.r)) * es
            group = b.input_group
            if group is not None:
                if group.full:
                    shared[("x", _storage_key(x))] = n * mod.in_features * es
                else:
                    shared[("x_U", id(group), _storage_key(x))] = n * group.size * es
                if b.group_pos is not None and x.requires_grad:
                    own[0] += b.r * group.size * es
            elif b.all_cols:
                shared[("x", _storage_key(x))] = n * mod.in_features * es
            else:
                own[0] += n * len(b.cols) * es

    layers = list(lora_layers(model))
    handles = [m.register_forward_pre_hook(hook) for m in layers]
    factors = [p for m in layers for b in m.branches.values() for p in (b.lora_A, b.lora_B)]
    moments = sum(2 * p.numel() * p.element_size() + 4 for p in factors)  # exp_avg, exp_avg_sq, a float step
    return (lambda: (own[0] + sum(shared.values()) + moments) / MiB), handles


class Stepper:
    """One variant's training step on a fixed batch: timed steps and the memory step."""

    def __init__(self, model: nn.Module, batch: dict[str, Tensor], device: torch.device,
                 amp: torch.dtype | None, lr: float = 1e-4) -> None:
        self.model, self.batch, self.device, self.amp = model, batch, device, amp
        model.to(device).train()
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        self.loss = float("nan")
        self.times: list[float] = []
        self.limit_mib: float | None = None

    def forward(self) -> Tensor:
        with torch.autocast(self.device.type, dtype=self.amp or torch.bfloat16, enabled=self.amp is not None):
            logits = self.model(self.batch)
        return nn.functional.cross_entropy(logits.float(), self.batch["labels"])

    def step(self) -> float:
        loss = self.forward()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.loss = float(loss.detach())  # one host sync per step, the same for every variant
        return self.loss

    def timed_step(self) -> float:
        _sync(self.device)
        t0 = time.perf_counter()
        self.step()
        _sync(self.device)
        dt = time.perf_counter() - t0
        self.times.append(dt)
        return dt

    def memory(self) -> tuple[float, float | None]:
        """(saved-for-backward + optimizer state MiB, CUDA step peak − before MiB or None).

        Run after the timed steps: the hooks would perturb timings.
        """
        cuda_mib = None
        if self.device.type == "cuda":
            _sync(self.device)
            gc.collect()
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.step()
            _sync(self.device)
            cuda_mib = (torch.cuda.max_memory_allocated(self.device) - before) / MiB

        existing = {_storage_key(t) for t in (*self.model.parameters(), *self.model.buffers(), *self.batch.values())}
        saved: dict[tuple[int, int], int] = {}

        def pack(t: Tensor) -> Tensor:
            key = _storage_key(t)
            if key is not None and key not in existing:
                saved[key] = key[1]
            return t

        limit, handles = adapter_limit(self.model)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_t = self.forward()
        for h in handles:
            h.remove()
        self.limit_mib = limit() if handles else None
        loss_t.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        opt_bytes = sum(v.untyped_storage().nbytes() for st in self.opt.state.values() for v in st.values()
                        if isinstance(v, Tensor))
        return (sum(saved.values()) + opt_bytes) / MiB, cuda_mib

    def result(self) -> Result:
        saved_mib, cuda_mib = self.memory()
        return Result("", 0, 1e3 * statistics.median(self.times), saved_mib, cuda_mib, self.loss, list(self.times),
                      limit_mib=self.limit_mib)


def measure(model: nn.Module, batch: dict[str, Tensor], device: torch.device, amp: torch.dtype | None,
            steps: int, warmup: int, lr: float = 1e-4) -> Result:
    """One variant alone: `warmup` steps, `steps` timed steps, then the memory step."""
    return measure_interleaved([model], batch, device, amp, steps, warmup, lr)[0]


def measure_interleaved(models: Sequence[nn.Module], batch: dict[str, Tensor], device: torch.device,
                        amp: torch.dtype | None, steps: int, warmup: int, lr: float = 1e-4) -> list[Result]:
    """Time the models round-robin: every round is one step of each, in an order rotated per round."""
    steppers = [Stepper(m, batch, device, amp, lr) for m in models]
    for s in steppers:
        for _ in range(warmup):
            s.step()
    n = len(steppers)
    for i in range(steps):
        for s in steppers[i % n:] + steppers[: i % n]:
            s.timed_step()
    return [s.result() for s in steppers]
