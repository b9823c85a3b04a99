"""Training-step time and memory: Partial-LoRA vs dense LoRA vs PEFT LoRA vs the no-adapter floor.

One process, one random backbone per size (deep-copied for every variant, so all variants see
the same weights and the same batch). Variants:

- `floor`: the frozen backbone with no adapter weights; only the head trains, but the embedding
  output is made to require grad, so backward runs through every layer. This is the cost any
  adapter placed in every layer must pay (see `make_floor`).
- `PEFT LoRA`: `peft.get_peft_model` with the same targets, rank and alpha, dropout 0.
- `dense LoRA (ours)`: `partial_lora.lora.inject_lora` keeping every row and column (ρ = 1).
- `Partial-LoRA ρ=…`: the same layer with ρ·d_out random rows and ρ·d_in random columns kept in
  every adapted layer (fixed seed, `torch.randperm`).

A step is forward + loss + backward + AdamW step + zero_grad over the trainable parameters only
(adapter + classification head). Times are the median over `--steps` after `--warmup` steps.
Memory is measured on one extra, untimed step:

- CUDA: `max_memory_allocated` during the step minus `memory_allocated` just before it: the
  step's working set (activations kept for backward, gradients, optimizer temporaries). The
  weights, the batch and the persistent AdamW state exist before the step and are not in it.
- CPU (and as an extra column on CUDA): the bytes of tensors saved for backward, counted with
  `torch.autograd.graph.saved_tensors_hooks` over unique storages that did not exist before the
  step (frozen weights, buffers and the batch are excluded), plus the AdamW state. This is where
  Partial-LoRA keeps only the gathered input columns x[:, C] instead of the full input.

Nothing here asserts a timing: this is a measurement, not a test.

    python benchmarks/step_time.py --sizes tiny --steps 3 --warmup 1          # smoke run, seconds
    python benchmarks/step_time.py --sizes bert-base vit-b --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from partial_lora.lora import (
    LoRAConfig,
    count_adapter_parameters,
    find_targets,
    freeze_for_adapter,
    inject_lora,
    layer_id,
)
from partial_lora.models import Classifier

MiB = 2**20


# --------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Size:
    """One backbone: a random-init Hugging Face model and the batch it is fed."""

    name: str
    family: str  # "hf-text" | "hf-vision" (the Classifier call convention)
    config: Callable[[], object]  # -> transformers config
    targets: tuple[str, ...]
    batch: int
    seq_len: int = 0  # text only
    num_labels: int = 2
    head_modules: tuple[str, ...] = ("classifier",)


def _bert(**kw: object) -> Callable[[], object]:
    def make() -> object:
        from transformers import BertConfig

        return BertConfig(num_labels=2, **kw)
    return make


def _vit(**kw: object) -> Callable[[], object]:
    def make() -> object:
        from transformers import ViTConfig

        return ViTConfig(num_labels=10, **kw)
    return make


SIZES: dict[str, Size] = {
    # BertConfig() defaults: 12 layers, hidden 768, 12 heads, FFN 3072 (BERT-base, 110M).
    "bert-base": Size("bert-base", "hf-text", _bert(), ("query", "value"), batch=8, seq_len=128),
    # ViTConfig() defaults: 12 layers, hidden 768, 224x224 images, 16x16 patches (ViT-B/16, 86M).
    # transformers 5 names the attention projections q_proj/k_proj/v_proj/o_proj.
    "vit-b": Size("vit-b", "hf-vision", _vit(image_size=224, patch_size=16), ("q_proj", "v_proj"),
                  batch=4, num_labels=10),
    # The shapes of conf/model/tiny-bert.yaml and tiny-vit.yaml: a seconds-long smoke run.
    "tiny-bert": Size("tiny-bert", "hf-text",
                      _bert(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=128),
                      ("query", "value"), batch=8, seq_len=64),
    "tiny-vit": Size("tiny-vit", "hf-vision",
                     _vit(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64),
                     ("q_proj", "v_proj"), batch=4, num_labels=10),
}
ALIASES = {"tiny": ["tiny-bert", "tiny-vit"]}


def build_backbone(size: Size) -> nn.Module:
    """A random-init model with a classification head (no download)."""
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = size.config()
    cfg.num_labels = size.num_labels
    auto = AutoModelForSequenceClassification if size.family == "hf-text" else AutoModelForImageClassification
    return auto.from_config(cfg)


def make_batch(size: Size, net: nn.Module, batch: int, seq_len: int, device: torch.device) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    cfg = net.config
    if size.family == "hf-text":
        out = {"input_ids": torch.randint(cfg.vocab_size, (batch, seq_len), generator=g),
               "attention_mask": torch.ones(batch, seq_len, dtype=torch.long)}
    else:
        out = {"pixel_values": torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size, generator=g)}
    out["labels"] = torch.randint(size.num_labels, (batch,), generator=g)
    return {k: v.to(device) for k, v in out.items()}


# --------------------------------------------------------------------------- variants


@dataclass
class Variant:
    label: str
    model: nn.Module  # called as model(batch) -> logits
    adapter_params: int
    layers: int = 0


def _set_head_trainable(net: nn.Module, size: Size) -> None:
    for name in size.head_modules:
        for p in net.get_submodule(name).parameters():
            p.requires_grad_(True)


def make_floor(backbone: nn.Module, size: Size) -> Variant:
    """No adapter; the head trains and the embedding output requires grad.

    With every weight frozen, autograd would stop at the head. An adapter in every layer needs
    the gradient w.r.t. the activations of every layer, down to the first; making the output of
    the input-embedding module (token embeddings for BERT, patch embeddings for ViT) require grad
    forces exactly that backward pass, without a weight-gradient anywhere in the backbone. It is
    the hook Hugging Face and PEFT install for gradient checkpointing with adapters
    (`PreTrainedModel.enable_input_require_grads`: a forward hook calling
    `output.requires_grad_(True)`). It slightly over-counts against an adapter in layer 0, which
    does not need the gradient w.r.t. layer 0's input; that is one layer's input-gradient GEMMs.
    """
    net = copy.deepcopy(backbone)
    for p in net.parameters():
        p.requires_grad_(False)
    _set_head_trainable(net, size)
    net.enable_input_require_grads()
    return Variant("floor (frozen, no adapter)", Classifier(net, size.family, size.head_modules), 0)


def make_peft(backbone: nn.Module, size: Size, r: int, alpha: float) -> Variant:
    import peft

    net = copy.deepcopy(backbone)
    # No task_type: PEFT would otherwise wrap the head in modules_to_save (a trainable copy).
    # get_peft_model freezes everything but lora_*; the head is unfrozen by hand below, on the
    # same module objects (injection is in place, so `net.classifier` is still the head).
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(size.targets), lora_dropout=0.0)
    pm = peft.get_peft_model(net, cfg)
    _set_head_trainable(net, size)
    lora = [(n, p) for n, p in pm.named_parameters() if "lora_" in n and p.requires_grad]
    layers = sum(1 for n, _ in lora if "lora_A" in n)
    return Variant("PEFT LoRA", Classifier(pm, size.family, []), sum(p.numel() for _, p in lora), layers)


def random_keep(net: nn.Module, cfg: LoRAConfig, density: float, seed: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
    """ρ·d_out random rows and ρ·d_in random columns (at least one each) in every adapted layer."""
    g = torch.Generator().manual_seed(seed)
    keep = {}
    for name, slices in find_targets(net, cfg).items():
        d_in = net.get_submodule(name).in_features
        for key, (_, d_out) in slices.items():
            rows = torch.randperm(d_out, generator=g)[: max(1, round(density * d_out))]
            cols = torch.randperm(d_in, generator=g)[: max(1, round(density * d_in))]
            keep[layer_id(name, key)] = (rows.sort().values, cols.sort().values)
    return keep


def make_ours(backbone: nn.Module, size: Size, r: int, alpha: float, density: float) -> Variant:
    net = copy.deepcopy(backbone)
    cfg = LoRAConfig(r=r, alpha=alpha, dropout=0.0, targets=size.targets, exclude=size.head_modules)
    inject_lora(net, cfg, None if density >= 1 else random_keep(net, cfg, density))
    freeze_for_adapter(net, size.head_modules)
    counts = count_adapter_parameters(net)
    label = "dense LoRA (ours)" if density >= 1 else f"Partial-LoRA ρ={density:g}"
    return Variant(label, Classifier(net, size.family, size.head_modules), counts["adapter"], counts["layers"])


# --------------------------------------------------------------------------- measurement


@dataclass
class Result:
    label: str
    adapter_params: int
    step_ms: float
    saved_mib: float  # saved-for-backward + optimizer state (both devices)
    cuda_mib: float | None = None  # step peak minus allocated before (CUDA only)
    loss: float = float("nan")
    times: list[float] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _storage_key(t: Tensor) -> tuple[int, int] | None:
    try:
        s = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensors without storage (rare wrappers)
        return None
    return (s.data_ptr(), s.nbytes())


def measure(model: nn.Module, batch: dict[str, Tensor], device: torch.device, amp: torch.dtype | None,
            steps: int, warmup: int, lr: float = 1e-4) -> Result:
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)

    def forward() -> Tensor:
        with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            logits = model(batch)
        return nn.functional.cross_entropy(logits.float(), batch["labels"])

    def step() -> float:
        loss = forward()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())  # one host sync per step, the same for every variant

    loss = float("nan")
    for _ in range(warmup):
        loss = step()
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        loss = step()
        _sync(device)
        times.append(time.perf_counter() - t0)

    # Memory on one more, untimed step (the hooks below would perturb timings).
    cuda_mib = None
    if device.type == "cuda":
        _sync(device)
        gc.collect()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        cuda_mib = (torch.cuda.max_memory_allocated(device) - before) / MiB

    existing = {_storage_key(t) for t in (*model.parameters(), *model.buffers(), *batch.values())}
    saved: dict[tuple[int, int], int] = {}

    def pack(t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key is not None and key not in existing:
            saved[key] = key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_t = forward()
    loss_t.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    opt_bytes = sum(v.untyped_storage().nbytes() for st in opt.state.values() for v in st.values()
                    if isinstance(v, Tensor))
    saved_mib = (sum(saved.values()) + opt_bytes) / MiB
    return Result("", 0, 1e3 * statistics.median(times), saved_mib, cuda_mib, loss, times)


# --------------------------------------------------------------------------- report


def _ratio(x: float | None, ref: float | None) -> str:
    return "—" if x is None or not ref else f"{x / ref:.2f}×"


def table(size: Size, results: list[Result], device: torch.device) -> str:
    ref = next(r for r in results if r.label == "PEFT LoRA")
    cuda = device.type == "cuda"
    mem_head = ("step peak − before, MiB" if cuda else "saved-for-backward + optimizer state, MiB")
    head = ["variant", "adapter params", "step ms (median)", "time / PEFT", mem_head, "memory / PEFT"]
    if cuda:
        head += ["saved-for-backward + optimizer state, MiB", "saved / PEFT"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        mem = r.cuda_mib if cuda else r.saved_mib
        ref_mem = ref.cuda_mib if cuda else ref.saved_mib
        row = [r.label, f"{r.adapter_params:,}", f"{r.step_ms:.1f}", _ratio(r.step_ms, ref.step_ms),
               f"{mem:.1f}", _ratio(mem, ref_mem)]
        if cuda:
            row += [f"{r.saved_mib:.1f}", _ratio(r.saved_mib, ref.saved_mib)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def machine(device: torch.device) -> str:
    import peft
    import transformers

    where = (f"GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda"
             else f"CPU {platform.processor() or platform.machine()}")
    return (f"machine: {where}; {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; "
            f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
            f"python {platform.python_version()}")


# --------------------------------------------------------------------------- main


def run_size(size: Size, args: argparse.Namespace, device: torch.device, amp: torch.dtype | None) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(size)
    batch_n = args.batch or size.batch
    seq_len = args.seq_len or size.seq_len
    batch = make_batch(size, backbone, batch_n, seq_len, device)
    shape = f"batch {batch_n}" + (f" × seq {seq_len}" if size.family == "hf-text" else
                                  f", {backbone.config.image_size}² images")
    print(f"\n### {size.name}: {sum(p.numel() for p in backbone.parameters()) / 1e6:.1f}M params, {shape}, "
          f"r={args.r}, alpha={args.alpha:g}, targets {list(size.targets)}, {args.dtype}, {device}, "
          f"{args.steps} steps after {args.warmup} warmup\n", flush=True)

    makers: list[Callable[[], Variant]] = [
        lambda: make_floor(backbone, size),
        lambda: make_peft(backbone, size, args.r, args.alpha),
        *[(lambda d=d: make_ours(backbone, size, args.r, args.alpha, d)) for d in args.densities],
    ]
    results: list[Result] = []
    layers: dict[str, int] = {}
    for make in makers:
        torch.manual_seed(0)  # the same adapter init draws for every variant
        v = make()
        if v.layers:
            layers[v.label] = v.layers
        res = measure(v.model, batch, device, amp, args.steps, args.warmup)
        res.label, res.adapter_params = v.label, v.adapter_params
        results.append(res)
        if args.verbose:
            print(f"  {v.label}: steps ms {[round(1e3 * t, 1) for t in res.times]}, last loss {res.loss:.4f}",
                  flush=True)
        del v  # free this variant's model before building the next
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if len(set(layers.values())) > 1:  # PEFT and ours must adapt the same layers
        print(f"WARNING: adapted layer counts differ between variants: {layers}")
    print(table(size, results, device))
    print(f"\n(adapted layers: {next(iter(layers.values()), 0)}; the head also trains in every variant: "
          f"{sum(p.numel() for n in size.head_modules for p in backbone.get_submodule(n).parameters()):,} params)")
    del backbone, batch
    gc.collect()


def parse(argv: Iterable[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["bert-base", "vit-b"], choices=[*SIZES, *ALIASES])
    p.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: BERT 8, ViT 4)")
    p.add_argument("--seq-len", type=int, default=None, help="text sequence length (default: 128; tiny 64)")
    p.add_argument("--r", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale alpha / r)")
    p.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.125],
                   help="Partial-LoRA keep ratios ρ on rows and cols; 1 = dense LoRA (ours)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = torch.autocast (CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--verbose", action="store_true", help="print every step time")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be ≥ 1 and --warmup ≥ 0")
    if any(not 0 < d <= 1 for d in args.densities):
        p.error("--densities must lie in (0, 1]")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for but CUDA is not available")
    return args


def main(argv: Iterable[str] | None = None) -> None:
    args = parse(argv)
    # PEFT 0.21 calls a transformers 5 property that warns it is renamed; noise for this report.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = torch.bfloat16 if args.dtype == "bf16" else None
    sizes = list(dict.fromkeys(s for name in args.sizes for s in ALIASES.get(name, [name])))
    if device.type == "cuda":
        print("memory: peak allocated during one step minus allocated just before it (activations kept for "
              "backward + gradients + optimizer temporaries; weights, batch and the persistent AdamW state "
              "are not included); the last two columns are the device-independent proxy used on CPU.")
    else:
        print("memory (CPU proxy): bytes of new tensors saved for backward (unique storages; frozen weights, "
              "buffers and the batch excluded) + AdamW state bytes.")
    for name in sizes:
        run_size(SIZES[name], args, device, amp)
    print("\n" + machine(device))


if __name__ == "__main__":
    main()
