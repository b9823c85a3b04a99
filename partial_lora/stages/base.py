"""What every stage builds from the config: the task's data, the model with its adapter, loaders.

Stages call these with the composed config; the functions hand plain dataclasses to the core.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import DataLoader

from partial_lora import artifacts as A
from partial_lora import config as C
from partial_lora.data import TaskData, load_task, make_collate
from partial_lora.errors import PlrError
from partial_lora.lora import LoRABranch, adapter_state_dict, freeze_for_adapter, inject_lora, load_adapter_state_dict
from partial_lora.models import Built, build_model
from partial_lora.train import TrainConfig, resolve_device


@dataclass
class Setup:
    """A stage's working set."""

    data: TaskData
    built: Built
    branches: dict[str, LoRABranch]
    device: torch.device
    metrics: list[str]
    main_metric: str


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
    branches = inject_lora(built.model.net, C.lora_config(cfg, spec), keep)
    freeze_for_adapter(built.model.net, spec.head_modules)
    metrics, main = C.task_metrics(cfg)
    device = resolve_device(str(cfg.trainer.device))
    return Setup(data, built, branches, device, metrics, main)


def loader(s: Setup, split: datasets.Dataset, tc: TrainConfig, *, train: bool, seed: int = 0) -> DataLoader:
    """A DataLoader that tokenises / transforms on the fly with the model's own processor."""
    collate = make_collate(s.data.kind, tokenizer=s.built.tokenizer, max_length=s.built.max_length,
                           image=s.built.image, train=train)
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(split, batch_size=tc.batch_size if train else tc.eval_batch_size, shuffle=train,
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
    A.save_tensors(out / A.ADAPTER, adapter_state_dict(s.built.model.net), meta)
    A.save_tensors(out / A.HEAD, s.built.model.head_state_dict(), meta)


def load_trained(s: Setup, src: Path) -> None:
    """Load the adapter and head that `save_trained` wrote into `src` (allocate, evaluate)."""
    load_adapter_state_dict(s.built.model.net, A.load_tensors(src / A.ADAPTER), source=str(src / A.ADAPTER))
    s.built.model.load_head_state_dict(A.load_tensors(src / A.HEAD), source=str(src / A.HEAD))
