"""The run's working set: its data, the model with a fresh head and its adapter injected (with the
run's masks, when it has them), frozen for training (`setup`, `setup_run`).

Stages call these with the `RunSpec` that `config.validate` built; nothing here reads the config.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from partial_lora import artifacts, distributed
from partial_lora.adapter import peft_baselines
from partial_lora.adapter.inject import WHOLE, find_targets, freeze_for_adapter, inject_lora, params_per_rank
from partial_lora.adapter.input_groups import attach as attach_input_groups
from partial_lora.adapter.lora import LoRABranch
from partial_lora.adapter.protocol import Adapter, PeftAdapter, PlrAdapter
from partial_lora.data import TaskData
from partial_lora.errors import PlrError
from partial_lora.models import multitask
from partial_lora.models.backbones import Built, build_model
from partial_lora.models.causal_lm import CausalLM
from partial_lora.spec import MatchConfig, RunSpec
from partial_lora.training.loop import Hooks
from partial_lora.training.optimizer import step_plan
from partial_lora.training.runtime import resolve_device
from partial_lora.working_set.data import load_data, load_multi


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
    multi: multitask.MultiTaskData | None = None
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
        return dict(per_part[0]) if self.multi is None else multitask.mean_of_members(per_part, self.multi.members)

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
        built.model.full_logits = built.model.full_logits or distributed.sharded()
    if multi is not None:
        built.model = multitask.MultiTask(built.model, multi.members)
    lcfg = run.lora
    net = built.model.net
    found = find_targets(net, lcfg)
    per_rank = params_per_rank(net, found)
    if run.method == "lora_matched":
        lcfg = replace(lcfg, r=matched_rank(run.match, per_rank))
    metrics, main = list(run.metrics), run.main_metric
    pspec = run.peft
    if pspec is not None and distributed.sharded():
        raise PlrError(f"trainer.strategy=fsdp shards plr's own LoRA layers; adapter={pspec.method} (a PEFT "
                       "baseline) runs with trainer.strategy=ddp")
    device = distributed.init(resolve_device(run.train.device))
    if pspec is not None:
        if any(set(slices) != {WHOLE} for slices in found.values()):
            raise PlrError(f"adapter={pspec.method} adapts whole modules, not slices of a fused projection "
                           f"({lcfg.targets}); set adapter.targets=[qkv] (or another whole-module list)")
        steps = step_plan(math.ceil(len(data.train) / run.train.batch_size), run.train)[1]  # AdaLoRA's schedule
        model = peft_baselines.inject_peft(net, pspec, list(found), spec.head_modules, steps, masks=shira)
        return Setup(data, built, {}, device, metrics, main, per_rank * lcfg.r, PeftAdapter(built.model, model, pspec),
                     multi, run)
    # adapter=head: no LoRA at all, only the head trains (the no-adapter reference).
    branches = {} if run.method == "head" else inject_lora(net, lcfg, keep)
    if groups:
        attach_input_groups(branches, groups)
    freeze_for_adapter(net, spec.head_modules)
    if distributed.sharded():
        shard(net, list(found))
    return Setup(data, built, branches, device, metrics, main, per_rank * lcfg.r, multi=multi, run=run)


def shard(net: torch.nn.Module, targets: list[str]) -> None:
    """FSDP (`trainer.strategy=fsdp`): each repeated block holding the target layers is one unit,
    the backbone (embeddings, norms, head) the root; say how much of the frozen base this process holds."""
    from partial_lora.allocation.replay import find_blocks

    total = sum(p.numel() for p in net.parameters() if not p.requires_grad)
    hit = find_blocks(net, targets) if targets else None
    blocks = [net.get_submodule(name) for name in hit[0]] if hit is not None else []
    distributed.shard(net, blocks)
    print(f"[plr] fsdp: rank {distributed.rank()} of {distributed.world_size()} holds "
          f"{distributed.owned_numel(net, trainable=False):,} of {total:,} frozen parameters ({len(blocks)} block "
          "units and the root)", flush=True)


def matched_rank(match: MatchConfig, per_rank: int) -> int:
    """`adapter=lora_matched`: the rank whose dense LoRA is closest to the match target (at least 1)."""
    target = match.target(per_rank)
    if target is None:
        raise PlrError("adapter=lora_matched needs adapter.match.run, adapter.match.budget or adapter.match.rank")
    return max(1, round(target / per_rank))


def setup_run(run: RunSpec, run_dir: Path) -> Setup:
    """`setup` with the run's masks (from the extract stage) when the adapter is sparse, and their
    input groups (adapter.mask.shared_input) attached; a SHiRA with plr's mask gets its entries."""
    if run.peft is not None and run.peft.shira_mask is not None:
        return setup(run, shira=artifacts.read_shira_masks(run_dir, run.model.name))
    if not run.sparse:
        return setup(run)
    keep, element = artifacts.read_masks(run_dir, run.model.name)
    s = setup(run, keep, groups=artifacts.read_input_groups(run_dir))
    for lid, (mask_b, mask_a) in element.items():
        s.branches[lid].set_element_masks(mask_b, mask_a)
    return s


