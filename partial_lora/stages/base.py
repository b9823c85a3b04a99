"""What every stage builds from the config: the task's data, the model with its adapter, loaders.

Stages call these with the composed config; the functions hand plain dataclasses to the core.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import datasets
import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import DataLoader

from partial_lora import artifacts as A
from partial_lora import config as C
from partial_lora.data import TaskData, load_task, make_collate
from partial_lora.data.collate import pretokenize
from partial_lora.errors import PlrError
from partial_lora import distributed as D
from partial_lora import peft_baselines as PB
from partial_lora.lora import (WHOLE, LoRABranch, adapter_state_dict, count_adapter_parameters,
                               find_targets, freeze_for_adapter, inject_lora, load_adapter_state_dict)
from partial_lora.models import Built, build_model
from partial_lora.train import ResumableSampler, TrainConfig, resolve_device


@dataclass
class Setup:
    """A stage's working set.

    `branches` are plr's LoRA branches by layer id (empty for a PEFT baseline, whose adapter
    `peft` manages); `dense_lora_params` is a dense LoRA's size at the adapter's rank on the
    same layers, the reference of every reduction figure.
    """

    data: TaskData
    built: Built
    branches: dict[str, LoRABranch]
    device: torch.device
    metrics: list[str]
    main_metric: str
    dense_lora_params: int = 0
    peft: Any = None
    peft_spec: PB.PeftSpec | None = None

    def adapter_params(self) -> int:
        """Trainable adapter parameters (the head not counted)."""
        if self.peft is None:
            return count_adapter_parameters(self.built.model.net)["adapter"]
        head = {id(p) for p in self.built.model.head_parameters()}
        return sum(p.numel() for p in self.built.model.net.parameters() if p.requires_grad and id(p) not in head)

    def train_hooks(self) -> dict[str, Any]:
        """Extra arguments of `train.fit` for PEFT methods that need them (AdaLoRA)."""
        if self.peft is None:
            return {}
        return {"step_hook": PB.step_hook(self.peft, self.peft_spec), "extra_loss": PB.regularizer(self.peft, self.peft_spec)}


def load_data(cfg: DictConfig) -> TaskData:
    data = load_task(C.task_spec(cfg))
    expected = cfg.task.get("num_labels")
    if expected is not None and int(expected) != data.num_labels:
        raise PlrError(f"task.num_labels={expected} but the data has {data.num_labels} labels "
                       f"({data.label_names[:5]}...); fix task.num_labels or task.label_column")
    return data


def setup(cfg: DictConfig, keep: Mapping[str, tuple[Tensor | None, Tensor | None]] | None = None,
          data: TaskData | None = None) -> Setup:
    """Load data, build the model with a fresh head, inject LoRA (kept rows/cols from `keep`), freeze.

    The caller seeds the RNGs first, so the head and adapter initialisation follow the seed.
    """
    data = data or load_data(cfg)
    spec = C.model_spec(cfg)
    built = build_model(spec, data.num_labels)
    lcfg = C.lora_config(cfg, spec)
    net = built.model.net
    found = find_targets(net, lcfg)
    per_rank = params_per_rank(net, found)
    if cfg.adapter.get("method") == "lora_matched":
        lcfg = replace(lcfg, r=matched_rank(C.match_config(cfg), per_rank))
    metrics, main = C.task_metrics(cfg)
    device = D.init(resolve_device(str(cfg.trainer.device)))
    pspec = C.peft_spec(cfg)
    if pspec is not None:
        if any(set(slices) != {WHOLE} for slices in found.values()):
            raise PlrError(f"adapter={pspec.method} adapts whole modules, not slices of a fused projection "
                           f"({lcfg.targets}); set adapter.targets=[qkv] (or another whole-module list)")
        model = PB.inject_peft(net, pspec, list(found), spec.head_modules, total_steps(cfg, len(data.train)))
        return Setup(data, built, {}, device, metrics, main, per_rank * lcfg.r, model, pspec)
    branches = inject_lora(net, lcfg, keep)
    freeze_for_adapter(net, spec.head_modules)
    return Setup(data, built, branches, device, metrics, main, per_rank * lcfg.r)


def total_steps(cfg: DictConfig, n_train: int) -> int:
    """Optimizer steps of the retrain stage (what `train.fit` will run)."""
    tc = C.train_config(cfg)
    per_epoch = max(1, math.ceil(n_train / tc.batch_size) // tc.grad_accum)
    return tc.max_steps or max(1, math.ceil(tc.epochs * per_epoch))


def params_per_rank(net: torch.nn.Module, found: Mapping[str, Mapping[str, tuple[int, int]]]) -> int:
    """Parameters of a dense LoRA per unit of rank on the targeted layers (`lora.find_targets`):
    the sum of d_out + d_in."""
    return sum(d_out + net.get_submodule(name).in_features
               for name, slices in found.items() for _, d_out in slices.values())


def matched_rank(match: C.MatchConfig, per_rank: int) -> int:
    """`adapter=lora_matched`: the rank whose dense LoRA is closest to the match target (at least 1)."""
    target = match.target(per_rank)
    if target is None:
        raise PlrError("adapter=lora_matched needs adapter.match.run, adapter.match.budget or adapter.match.rank")
    return max(1, round(target / per_rank))


def loader(s: Setup, split: datasets.Dataset, tc: TrainConfig, *, train: bool, seed: int = 0) -> DataLoader:
    """A DataLoader over `split` with the model's own processor.

    Text is tokenised once up front (cached by `datasets` for file-backed splits) and padded per
    batch; images are decoded and transformed on the fly (training augmentation differs per epoch).
    """
    if s.data.kind == "text" and s.built.tokenizer is not None:
        split = pretokenize(split, s.built.tokenizer, s.built.max_length)
    collate = make_collate(s.data.kind, tokenizer=s.built.tokenizer, max_length=s.built.max_length,
                           image=s.built.image, train=train)
    gen = torch.Generator().manual_seed(seed)
    # The same order as `shuffle=True` with this generator, and resumable in mid-epoch.
    sampler = ResumableSampler(split, generator=gen) if train else None
    return DataLoader(split, batch_size=tc.batch_size if train else tc.eval_batch_size, sampler=sampler,
                      collate_fn=collate, generator=gen, num_workers=tc.num_workers,
                      pin_memory=s.device.type == "cuda", drop_last=False)


def is_sparse(cfg: DictConfig) -> bool:
    """Whether the run trains a masked adapter (adapter.sparsity is auto or > 0)."""
    return C.sparsity(cfg) != 0


def setup_run(cfg: DictConfig, run_dir: Path) -> Setup:
    """`setup` with the run's masks (from the extract stage) when the adapter is sparse."""
    if not is_sparse(cfg):
        return setup(cfg)
    from partial_lora.stages.extract import load_masks

    keep, element = load_masks(run_dir, str(cfg.model.name))
    s = setup(cfg, keep)
    for lid, (mask_b, mask_a) in element.items():
        s.branches[lid].set_element_masks(mask_b, mask_a)
    return s


def save_trained(s: Setup, out: Path, cfg: DictConfig) -> None:
    """Write a stage's trained adapter and head (probe, retrain)."""
    meta = {"model": str(cfg.model.name), "task": str(cfg.task.name)}
    adapter = adapter_state_dict(s.built.model.net) if s.peft is None else PB.state_dict(s.peft)
    A.save_tensors(out / A.ADAPTER, adapter, meta)
    if s.peft is not None:
        A.write_json(out / A.PEFT_STATE, PB.extra_state(s.peft))
    A.save_tensors(out / A.HEAD, s.built.model.head_state_dict(), meta)


def load_trained(s: Setup, src: Path) -> None:
    """Load the adapter and head that `save_trained` wrote into `src` (allocate, evaluate)."""
    if s.peft is None:
        load_adapter_state_dict(s.built.model.net, A.load_tensors(src / A.ADAPTER), source=str(src / A.ADAPTER))
    else:
        extra = A.read_json(src / A.PEFT_STATE) if (src / A.PEFT_STATE).exists() else {}
        PB.load_state_dict(s.peft, A.load_tensors(src / A.ADAPTER), extra, source=str(src / A.ADAPTER))
    s.built.model.load_head_state_dict(A.load_tensors(src / A.HEAD), source=str(src / A.HEAD))
