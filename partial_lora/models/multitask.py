"""The multi-task setting: one adapter trained on several tasks at once, one head per task.

[paper] Partial-LoRA is evaluated "in single-task and multi-task settings". [ours] how:

- **Data.** The members' training splits are concatenated, each row tagged with its member's
  `task_id`; shuffling the union gives mixed batches in which every task appears in proportion
  to its size (examples-proportional mixing). Validation and test stay per member.
- **Heads.** Classifiers get one output layer per member as slices of one wide layer: the
  backbone is built with the sum of the members' label counts and member m reads its own
  `n_m` logits at `offset_m`. That is exactly one linear head per task; layers in front of the
  final one that the model counts as its head (RoBERTa's dense layer, DeBERTa's pooler) are
  shared by the tasks. Causal LMs need no head: every member is scored by log-likelihood.
- **Loss.** Each row's loss is its member's (cross-entropy on its slice, MSE for a score),
  averaged over the batch's rows.
- **Selection and allocation** read the mean over members of each member's main metric
  (`mean`); the few-shot sets of the probe are the union of the members' few-shot sets.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import datasets
import torch
from torch import Tensor, nn

from partial_lora.data.base import TaskData
from partial_lora.errors import PlrError
from partial_lora.models.causal_lm import CausalLM
from partial_lora.models.classifier import Classifier, loss_fn

MEAN = "mean"


@dataclass(frozen=True)
class Member:
    """One task of a multi-task run.

    Attributes:
        name: the member task's name.
        offset / width: its logits in the shared output (width = its label count, 1 for a score).
        metrics / main: the metrics reported for it and the one that enters the mean.
    """

    name: str
    offset: int
    width: int
    regression: bool = False
    metrics: Sequence[str] = ("accuracy",)
    main: str = "accuracy"

    def logits(self, out: Tensor) -> Tensor:
        """This member's head: its slice of the shared output."""
        return out[..., self.offset:self.offset + self.width]

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """This member's loss on its own logits (MSE for a score, else cross-entropy)."""
        return loss_fn(logits, labels.float() if self.regression else labels.long())


@dataclass
class MultiTaskData:
    """The members' data and their union (what `TaskData` holds for a single task).

    `union.train` / `union.val` carry a `task_id` column; `parts` keep each member's own splits.
    """

    union: TaskData
    parts: list[TaskData]
    members: list[Member] = field(default_factory=list)


def combine(name: str, parts: Sequence[TaskData], metrics: Sequence[tuple[list[str], str]]) -> MultiTaskData:
    """Build the union of the members' splits and the members' head layout.

    Args:
        name: the multi-task run's task name.
        parts: the members' loaded data, in order.
        metrics: (metrics, main metric) per member.

    Raises:
        PlrError: members of different kinds (text with images), or a member listed twice.
    """
    kinds = {p.kind for p in parts}
    if len(kinds) != 1:
        raise PlrError(f"task.names mixes {' and '.join(sorted(kinds))} tasks; a multi-task run trains one backbone "
                       f"on one kind of input: list tasks of one kind")
    names = [p.name for p in parts]
    if len(set(names)) != len(names):
        raise PlrError(f"task.names lists a task twice ({names}); list each task once")
    kind = kinds.pop()
    members, offset = [], 0
    for part, (mets, main) in zip(parts, metrics, strict=True):
        width = part.num_labels
        members.append(Member(part.name, offset if kind != "choice" else 0, width, part.regression, list(mets), main))
        offset += width
    if kind == "choice":  # one LM scores every member: the widest member sets the score width
        label_names = [str(i) for i in range(max(p.num_labels for p in parts))]
    else:
        label_names = [f"{p.name}:{n}" for p in parts for n in (p.label_names or ["score"])]
    union = TaskData(name, kind, _union([p.train for p in parts]), _union([p.val for p in parts]),
                     _union([p.test for p in parts]), label_names)
    return MultiTaskData(union, list(parts), members)


def _union(splits: Sequence[datasets.Dataset]) -> datasets.Dataset:
    """Concatenate member splits with a `task_id` column; labels become plain numbers.

    Every member's label is cast to one type (float32 when a member is a score, else int64)
    and single sentences get `text_pair = None` next to sentence pairs, so the features agree.
    """
    floats = any(s.features["label"].dtype.startswith("float") for s in splits if hasattr(s.features["label"], "dtype"))
    pair = any("text_pair" in s.column_names for s in splits)
    out = []
    for i, ds in enumerate(splits):
        ds = ds.cast_column("label", datasets.Value("float32" if floats else "int64"))
        if pair and "text" in ds.column_names and "text_pair" not in ds.column_names:
            ds = ds.add_column("text_pair", [None] * len(ds)).cast_column("text_pair", datasets.Value("string"))
        out.append(ds.add_column("task_id", [i] * len(ds)))
    return datasets.concatenate_datasets(out)


def offsets(parts: Sequence[datasets.Dataset]) -> list[int]:
    """Where each member's rows start in the union of `parts`."""
    starts, n = [], 0
    for p in parts:
        starts.append(n)
        n += len(p)
    return starts


class MultiTask(nn.Module):
    """The shared model of a multi-task run: the backbone's output split into member heads.

    `forward(batch)` returns the backbone's output (all heads' logits, or an LLM's loss or
    choice scores); `loss(out, batch)` applies each row's member loss using `batch["task_id"]`.
    `view(i)` is member i seen as a single-task classifier (its own logits only), for
    evaluation.
    """

    def __init__(self, inner: Classifier, members: Sequence[Member]) -> None:
        super().__init__()
        self.inner = inner
        self.members = list(members)

    @property
    def net(self) -> nn.Module:
        return self.inner.net

    @property
    def head_modules(self) -> list[str]:
        return self.inner.head_modules

    def head_parameters(self) -> list[nn.Parameter]:
        return self.inner.head_parameters()

    def head_state_dict(self) -> dict[str, Tensor]:
        return self.inner.head_state_dict()

    def load_head_state_dict(self, state: Mapping[str, Tensor], source: str = "head") -> None:
        self.inner.load_head_state_dict(state, source)

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        return self.inner({k: v for k, v in batch.items() if k != "task_id"})

    def loss_units(self, batch: Mapping[str, Tensor]) -> int | None:
        return self.inner.loss_units(batch)  # an LLM's answer tokens; None: `loss` is a mean over rows

    def loss(self, out: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        if isinstance(self.inner, CausalLM):
            return self.inner.loss(out, batch)
        task_id, labels = batch["task_id"], batch["labels"]
        total = out.new_zeros((), dtype=torch.float32)
        for i, m in enumerate(self.members):
            rows = task_id == i
            n = int(rows.sum())
            if n:
                total = total + m.loss(m.logits(out[rows]), labels[rows]) * n
        return total / max(1, len(labels))

    def view(self, i: int) -> TaskView:
        return TaskView(self, i)


class TaskView(nn.Module):
    """Member i of a `MultiTask` model as a single-task model (the classifier call convention)."""

    def __init__(self, model: MultiTask, i: int) -> None:
        super().__init__()
        self.model, self.i = model, i
        self.member = model.members[i]

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        out = self.model(batch)
        if isinstance(self.model.inner, CausalLM):
            return out
        return self.member.logits(out)

    def loss(self, out: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        if isinstance(self.model.inner, CausalLM):
            return self.model.inner.loss(out, batch)
        return self.member.loss(out, batch["labels"])


def mean_of_members(per_member: Sequence[Mapping[str, float]], members: Sequence[Member]) -> dict[str, float]:
    """Flatten members' metrics to `<task>_<metric>` and add `mean` (of the main metrics) and `loss`."""
    out: dict[str, float] = {}
    for m, values in zip(members, per_member, strict=True):
        out.update({f"{m.name}_{k}": v for k, v in values.items()})
    out[MEAN] = sum(values[m.main] for m, values in zip(members, per_member, strict=True)) / len(members)
    losses = [values["loss"] for values in per_member if "loss" in values]
    if losses:
        out["loss"] = sum(losses) / len(losses)
    return out


class TaskIdCollate:
    """A collate function that also passes each row's `task_id` through as a tensor (picklable;
    the inner collate sees rows without `task_id`)."""

    def __init__(self, inner: Callable[[list[dict]], dict[str, Tensor]]) -> None:
        self.inner = inner

    def __call__(self, rows: list[dict]) -> dict[str, Tensor]:
        ids = torch.tensor([r["task_id"] for r in rows], dtype=torch.long)
        batch = self.inner([{k: v for k, v in r.items() if k != "task_id"} for r in rows])
        return {**batch, "task_id": ids}
