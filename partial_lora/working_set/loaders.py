"""The loaders a stage trains, scores and searches on, over the working set's data and processor."""

from __future__ import annotations

from collections.abc import Callable

import datasets
import torch
from torch.utils.data import DataLoader

from partial_lora import distributed
from partial_lora.data import make_collate
from partial_lora.data.collate import pretokenize
from partial_lora.data.split import few_shot
from partial_lora.models import multitask
from partial_lora.spec import ProbeConfig
from partial_lora.training.loop import ResumableSampler
from partial_lora.training.predict import evaluate
from partial_lora.training.recipe import TrainConfig
from partial_lora.training.runtime import autocast_dtype
from partial_lora.working_set.build import Setup


def loader(s: Setup, split: datasets.Dataset, tc: TrainConfig, *, train: bool, seed: int = 0) -> DataLoader:
    """A DataLoader over `split` with the model's own processor.

    Text is tokenised once up front (cached by `datasets` for file-backed splits) and padded per
    batch; images are decoded and transformed on the fly (training augmentation differs per epoch).
    """
    if s.data.kind == "text" and s.built.tokenizer is not None:
        split = pretokenize(split, s.built.tokenizer, s.built.max_length)
    collate = make_collate(s.data.kind, tokenizer=s.built.tokenizer, max_length=s.built.max_length,
                           image=s.built.image, train=train)
    if "task_id" in split.column_names:  # a multi-task union: each row says which head it trains
        collate = multitask.TaskIdCollate(collate)
    gen = torch.Generator().manual_seed(seed)
    common = dict(collate_fn=collate, generator=gen, num_workers=tc.num_workers, pin_memory=s.device.type == "cuda")
    if not train:
        return DataLoader(split, batch_size=tc.eval_batch_size, **common)
    # The same order as `shuffle=True` with this generator, and resumable in mid-epoch.
    sampler = ResumableSampler(split, generator=gen)
    if distributed.active():  # data parallel: this process loads only its rows of each of the one-process batches
        batches = distributed.ShardedBatches(sampler, tc.batch_size, distributed.rank(), distributed.world_size())
        return DataLoader(split, batch_sampler=batches, **common)
    return DataLoader(split, batch_size=tc.batch_size, sampler=sampler, drop_last=False, **common)


def validator(s: Setup, tc: TrainConfig, sets: list[datasets.Dataset]) -> Callable[[], dict[str, float]]:
    """A function returning the metrics (and `loss`) of the model now, on fixed evaluation sets:
    one per part (`Setup.parts`), each scored with its task's metrics through its own head, then
    merged (`Setup.merge`). Loaders are built once (text is tokenised once)."""
    dtype = autocast_dtype(tc, s.device)
    parts = s.parts()
    loaders = [loader(s, d, tc, train=False) for d in sets]
    return lambda: s.merge([evaluate(p.view, ld, s.device, dtype, p.metrics)
                            for p, ld in zip(parts, loaders, strict=True)])


def member_rows(s: Setup, union_idx: list[int]) -> list[list[int]]:
    """Indices into the train split (a multi-task run's union), as indices into each part's own."""
    starts = multitask.offsets([p.data.train for p in s.parts()])
    ends = starts[1:] + [len(s.data.train)]
    return [[j - a for j in union_idx if a <= j < b] for a, b in zip(starts, ends, strict=True)]


def fewshot_indices(s: Setup, pc: ProbeConfig, seed: int) -> tuple[list[int], list[int]]:
    """Few-shot train and validation indices into the training split: each part's few-shot sets,
    drawn per part, then shifted to where the part starts (a multi-task run's union)."""
    train, val = [], []
    parts = [p.data for p in s.parts()]
    for part, start in zip(parts, multitask.offsets([p.train for p in parts]), strict=True):
        t, v = few_shot(part.train, pc.shots, pc.val_shots, seed, part.label_names, pc.short_classes)
        train += [start + i for i in t]
        val += [start + i for i in v]
    return train, val


def few_shot_sets(s: Setup, val_idx: list[int]) -> list[datasets.Dataset]:
    """The probe's few-shot validation sets, one per part (`Setup.parts`)."""
    return [p.data.train.select(rows) for p, rows in zip(s.parts(), member_rows(s, val_idx), strict=True)]
