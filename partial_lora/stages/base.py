"""What every stage builds from the run's spec: the task's data, the model with its adapter, loaders.

Stages call these with the `RunSpec` that `config.validate` built; nothing here reads the config.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import datasets
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from partial_lora import artifacts as A
from partial_lora.data import TaskData, load_task, make_collate
from partial_lora.data.collate import pretokenize
from partial_lora.data.verbalizer import as_choices
from partial_lora.errors import PlrError
from partial_lora import distributed as D
from partial_lora.adapter import peft_baselines as PB
from partial_lora.adapter.inject import WHOLE, dims, find_targets, freeze_for_adapter, inject_lora
from partial_lora.adapter.input_groups import attach as attach_input_groups
from partial_lora.adapter.lora import LoRABranch
from partial_lora.models import multitask as MT
from partial_lora.models.causal_lm import CausalLM
from partial_lora.adapter.protocol import Adapter, PeftAdapter, PlrAdapter
from partial_lora.models.backbones import Built, build_model
from partial_lora.data.base import TaskSpec
from partial_lora.spec import MatchConfig, RunSpec
from partial_lora.training.predict import evaluate
from partial_lora.training.recipe import TrainConfig
from partial_lora.training.runtime import autocast_dtype, resolve_device
from partial_lora.training.loop import Hooks, ResumableSampler


@dataclass(frozen=True)
class Part:
    """One task the run trains and scores: the only task of a single-task run, or one member of a
    multi-task run. A single-task run is a multi-task run with one part, whose metrics keep
    their bare names (`val_accuracy`, not `val_<task>_accuracy`).

    Attributes:
        name: the member's task name; "" for the only task of a single-task run.
        view: the model as this task sees it (its own head).
    """

    name: str
    metrics: list[str]
    main: str
    data: TaskData
    view: Any


@dataclass
class Setup:
    """A stage's working set.

    `branches` are plr's LoRA branches by layer id (empty for a PEFT baseline); `adapter` is
    what the stages save, load, count and train, whichever kind it is (plr's branches when not
    given); `dense_lora_params` is a dense LoRA's size at the adapter's rank on the same layers,
    the reference of every reduction figure.
    """

    data: TaskData
    built: Built
    branches: dict[str, LoRABranch]
    device: torch.device
    metrics: list[str]
    main_metric: str
    dense_lora_params: int = 0
    adapter: Adapter | None = None
    multi: MT.MultiTaskData | None = None
    run: RunSpec | None = None  # the spec `setup` built it from (None for a working set made by hand)

    def __post_init__(self) -> None:
        if self.adapter is None:
            self.adapter = PlrAdapter(self.built.model)

    @property
    def sparse(self) -> bool:
        """Whether the adapter is masked (the run's adapter.sparsity is auto or > 0)."""
        return self.run is not None and self.run.sparse

    def adapter_params(self) -> int:
        """Trainable adapter parameters (the head not counted)."""
        assert self.adapter is not None
        return self.adapter.num_parameters()

    def parts(self) -> list[Part]:
        """The run's tasks in order: one for a single-task run, each member for a multi-task run."""
        if self.multi is None:
            return [Part("", self.metrics, self.main_metric, self.data, self.built.model)]
        return [Part(m.name, list(m.metrics), m.main, d, self.built.model.view(i))
                for i, (m, d) in enumerate(zip(self.multi.members, self.multi.parts, strict=True))]

    def merge(self, per_part: list[dict[str, float]]) -> dict[str, float]:
        """The run's metrics from its parts': a single task's as they are; a multi-task run's as
        `<task>_<metric>` per member, `mean` (of the members' main metrics) and `loss`."""
        return dict(per_part[0]) if self.multi is None else MT.mean_of_members(per_part, self.multi.members)

    def test_counts(self) -> dict[str, Any]:
        """The test examples evaluated: in all, per further evaluation set of a single task, or per
        member (with the members and their metrics) of a multi-task run."""
        parts = self.parts()
        out: dict[str, Any] = {"test_examples": sum(len(p.data.test) for p in parts)}
        if self.multi is None:
            return {**out, **{f"test_{n}_examples": len(d) for n, d in self.data.extra.items()}}
        return {**out, "members": [p.name for p in parts],
                "member_metrics": {p.name: {"metrics": p.metrics, "main": p.main} for p in parts},
                **{f"test_{p.name}_examples": len(p.data.test) for p in parts}}

    def train_hooks(self, validate: Callable[[], dict[str, float]]) -> Hooks:
        """`loop.fit`'s hooks: the validation, and what the adapter adds to training (AdaLoRA)."""
        assert self.adapter is not None
        return self.adapter.hooks(validate)


_ONCE: dict[str, Any] | None = None  # loaded data by task, inside `data_loaded_once` (run_pipeline)


@contextmanager
def data_loaded_once() -> Iterator[None]:
    """Inside the block every stage gets the task's data from one load (the pipeline loads it first, to
    check its identity against the run dir). Nothing modifies loaded data, so the stages read the same
    rows as from their own loads; outside the block every call loads anew."""
    global _ONCE
    outer = _ONCE
    _ONCE = {} if outer is None else outer
    try:
        yield
    finally:
        _ONCE = outer


def _once(key: str, load: Callable[[], Any]) -> Any:
    if _ONCE is None:
        return load()
    if key not in _ONCE:
        _ONCE[key] = load()
    return _ONCE[key]


def load_data(run: RunSpec) -> TaskData:
    """The task's data; for a multi-task run, the union of its members' (see `load_multi`)."""
    return load_multi(run).union if run.multi else _load_one(run.parts[0].task, run.causal)


def load_multi(run: RunSpec) -> MT.MultiTaskData:
    """Each member task's data, and their union."""
    def load() -> MT.MultiTaskData:
        parts = [_load_one(p.task, run.causal) for p in run.parts]
        return MT.combine(run.task, parts, [(list(p.metrics), p.main) for p in run.parts])

    return _once(repr(("multi", run.task, run.parts, run.causal)), load)


def data_identity(run: RunSpec) -> dict[str, str]:
    """What the run's data was read from, each source with its content digest (`data.identity`)."""
    parts = load_multi(run).parts if run.multi else [load_data(run)]
    return dict(sorted({k: v for d in parts for k, v in d.sources.items()}.items()))


def _load_one(spec: TaskSpec, causal: bool = False) -> TaskData:
    """One task's data; a classification task read by a causal LM becomes prompt/answer choices."""
    def load() -> TaskData:
        data = load_task(spec)  # checks task.num_labels against the data
        if causal and data.kind == "text":
            data = replace(as_choices(data, spec.prompt, spec.verbalizer), sources=data.sources)
        return data

    return _once(repr(("one", spec, causal)), load)


def setup(run: RunSpec, keep: Mapping[str, tuple[Tensor | None, Tensor | None]] | None = None,
          data: TaskData | None = None, groups: Sequence[Sequence[str]] = (),
          shira: Mapping[str, Tensor] | None = None) -> Setup:
    """Load data, build the model with a fresh head, inject LoRA (kept rows/cols from `keep`), freeze.

    `shira` is the entries of a SHiRA whose mask plr drew (`adapter.shira.mask`, the extract stage's).

    `groups` are input groups (`input_groups.attach`, adapter.mask.shared_input): their branches
    gather their shared input once. They are attached before FSDP shards the model, so their index
    buffers go where the branches' go. The caller seeds the RNGs first, so the head and adapter
    initialisation follow the seed.
    """
    multi = load_multi(run) if run.multi else None
    data = multi.union if multi is not None else (data or load_data(run))
    spec = run.model
    built = build_model(spec, data.num_labels)
    if isinstance(built.model, CausalLM):
        built.model.scoring = run.scoring
        # FSDP gathers the root's parameters (embeddings, LM head) in the root's forward: score
        # through it, not through `base_model` and the output embeddings called one by one.
        built.model.full_logits = built.model.full_logits or D.sharded()
    if multi is not None:
        built.model = MT.MultiTask(built.model, multi.members)
    lcfg = run.lora
    net = built.model.net
    found = find_targets(net, lcfg)
    per_rank = params_per_rank(net, found)
    if run.method == "lora_matched":
        lcfg = replace(lcfg, r=matched_rank(run.match, per_rank))
    metrics, main = list(run.metrics), run.main_metric
    pspec = run.peft
    if pspec is not None and D.sharded():
        raise PlrError(f"trainer.strategy=fsdp shards plr's own LoRA layers; adapter={pspec.method} (a PEFT "
                       "baseline) runs with trainer.strategy=ddp")
    device = D.init(resolve_device(run.train.device))
    if pspec is not None:
        if any(set(slices) != {WHOLE} for slices in found.values()):
            raise PlrError(f"adapter={pspec.method} adapts whole modules, not slices of a fused projection "
                           f"({lcfg.targets}); set adapter.targets=[qkv] (or another whole-module list)")
        model = PB.inject_peft(net, pspec, list(found), spec.head_modules, total_steps(run.train, len(data.train)),
                               masks=shira)
        return Setup(data, built, {}, device, metrics, main, per_rank * lcfg.r, PeftAdapter(built.model, model, pspec),
                     multi, run)
    # adapter=head: no LoRA at all, only the head trains (the no-adapter reference).
    branches = {} if run.method == "head" else inject_lora(net, lcfg, keep)
    if groups:
        attach_input_groups(branches, groups)
    freeze_for_adapter(net, spec.head_modules)
    if D.sharded():
        shard(net, list(found))
    return Setup(data, built, branches, device, metrics, main, per_rank * lcfg.r, multi=multi, run=run)


def shard(net: torch.nn.Module, targets: list[str]) -> None:
    """FSDP (`trainer.strategy=fsdp`): each repeated block holding the target layers is one unit,
    the backbone (embeddings, norms, head) the root; say how much of the frozen base this process holds."""
    from partial_lora.allocation.replay import find_blocks

    total = sum(p.numel() for p in net.parameters() if not p.requires_grad)
    hit = find_blocks(net, targets) if targets else None
    blocks = [net.get_submodule(name) for name in hit[0]] if hit is not None else []
    D.shard(net, blocks)
    print(f"[plr] fsdp: rank {D.rank()} of {D.world_size()} holds {D.owned_numel(net, trainable=False):,} of "
          f"{total:,} frozen parameters ({len(blocks)} block units and the root)", flush=True)


def total_steps(tc: TrainConfig, n_train: int) -> int:
    """Optimizer steps of the retrain stage (what `loop.fit` will run)."""
    per_epoch = max(1, math.ceil(n_train / tc.batch_size) // tc.grad_accum)
    return tc.max_steps or max(1, math.ceil(tc.epochs * per_epoch))


def params_per_rank(net: torch.nn.Module, found: Mapping[str, Mapping[str, tuple[int, int]]]) -> int:
    """Parameters of a dense LoRA per unit of rank on the targeted layers (`inject.find_targets`):
    the sum of d_out + d_in."""
    return sum(d_out + dims(net.get_submodule(name))[1]
               for name, slices in found.items() for _, d_out in slices.values())


def matched_rank(match: MatchConfig, per_rank: int) -> int:
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
    if "task_id" in split.column_names:  # a multi-task union: each row says which head it trains
        collate = MT.TaskIdCollate(collate)
    gen = torch.Generator().manual_seed(seed)
    common = dict(collate_fn=collate, generator=gen, num_workers=tc.num_workers, pin_memory=s.device.type == "cuda")
    if not train:
        return DataLoader(split, batch_size=tc.eval_batch_size, **common)
    # The same order as `shuffle=True` with this generator, and resumable in mid-epoch.
    sampler = ResumableSampler(split, generator=gen)
    if D.active():  # data parallel: this process loads only its rows of each of the one-process batches
        return DataLoader(split, batch_sampler=D.ShardedBatches(sampler, tc.batch_size, D.rank(), D.world_size()),
                          **common)
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
    starts = MT.offsets([p.data.train for p in s.parts()])
    ends = starts[1:] + [len(s.data.train)]
    return [[j - a for j in union_idx if a <= j < b] for a, b in zip(starts, ends, strict=True)]


def few_shot_sets(s: Setup, val_idx: list[int]) -> list[datasets.Dataset]:
    """The probe's few-shot validation sets, one per part (`Setup.parts`)."""
    return [p.data.train.select(rows) for p, rows in zip(s.parts(), member_rows(s, val_idx), strict=True)]


def setup_run(run: RunSpec, run_dir: Path) -> Setup:
    """`setup` with the run's masks (from the extract stage) when the adapter is sparse, and their
    input groups (adapter.mask.shared_input) attached; a SHiRA with plr's mask gets its entries."""
    if run.peft is not None and run.peft.shira_mask is not None:
        return setup(run, shira=A.read_shira_masks(run_dir, run.model.name))
    if not run.sparse:
        return setup(run)
    keep, element = A.read_masks(run_dir, run.model.name)
    s = setup(run, keep, groups=A.read_input_groups(run_dir))
    for lid, (mask_b, mask_a) in element.items():
        s.branches[lid].set_element_masks(mask_b, mask_a)
    return s


def save_trained(s: Setup, out: Path, spec: RunSpec) -> None:
    """Write a stage's trained adapter and head (probe, retrain)."""
    meta = {"model": spec.model.name, "task": spec.task}
    assert s.adapter is not None
    A.save_tensors(out / A.ADAPTER, s.adapter.state_dict(), meta)
    extra = s.adapter.extra_state()
    if extra is not None:
        A.write_json(out / A.PEFT_STATE, extra)
    A.save_tensors(out / A.HEAD, s.built.model.head_state_dict(), meta)


def load_trained(s: Setup, src: Path) -> None:
    """Load the adapter and head that `save_trained` wrote into `src` (allocate, evaluate)."""
    assert s.adapter is not None
    extra = A.read_json(src / A.PEFT_STATE) if (src / A.PEFT_STATE).exists() else None
    s.adapter.load(A.load_tensors(src / A.ADAPTER), extra, source=str(src / A.ADAPTER))
    s.built.model.load_head_state_dict(A.load_tensors(src / A.HEAD), source=str(src / A.HEAD))
