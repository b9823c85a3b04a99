"""What the allocation search saw: the signal each searched Partial-LoRA run decided on.

The threshold search keeps, per layer, the smallest keep ratio whose few-shot validation metric
stays at the target. On a small few-shot validation set that decision rests on a handful of
examples: this table shows, per run, how many validation examples there were, the probe's gain
over no adapter counted in examples (a_ref − a_0, times the set's size), and what the search made
of it (layers at the grid's floor, layers kept dense, the joint metric). A gain of two or three
examples is within the noise of the set; the study log reads the failures against it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from partial_lora import artifacts
from partial_lora.study import grid
from partial_lora.study.claims import Study


@dataclass(frozen=True)
class SearchRow:
    model: str
    task: str
    arm: str
    seed: int
    allocator: str
    metric: str           # task (accuracy-like, gains are counted in examples) or loss
    val_examples: int
    a_ref: float
    a_0: float
    target: float | None  # none for a budget split (allocator=proportional)
    joint: float | None   # the final allocation's few-shot metric
    layers: int
    at_floor: int
    dense: int
    params: int

    @property
    def gain_examples(self) -> float | None:
        """a_ref − a_0 in validation examples (a task metric only: a loss gain has no count)."""
        return None if self.metric == "loss" else (self.a_ref - self.a_0) * self.val_examples


def search_rows(study: Study) -> list[SearchRow]:
    """One row per finished run that searched its own allocation (a run restored from the ledger, or one
    that read another run's allocation, has none of its own)."""
    out = []
    seen: set = set()
    for run in study.runs:
        if run.dir in seen or grid.SEP in run.arm:
            continue  # a multi-task run's members share its one search; a tuned run reuses its arm's
        seen.add(run.dir)
        path = artifacts.stage_dir(run.dir, artifacts.ALLOCATE) / artifacts.ALLOCATION
        probe = artifacts.stage_dir(run.dir, artifacts.PROBE) / artifacts.METRICS
        if not (path.exists() and probe.exists()):
            continue
        alloc = artifacts.read_allocation(run.dir)
        if alloc.a_ref is None or alloc.a_0 is None:
            continue  # an allocator that read no probe
        val_examples = int(artifacts.read_json(probe).get("val_examples") or 0)
        floor = min(alloc.grid) if alloc.grid else None
        task = run.task if run.member is None else run.task.rsplit("/", 1)[0]
        out.append(SearchRow(run.model, task, run.arm, run.seed, alloc.allocator, alloc.metric or "task",
                             val_examples, alloc.a_ref, alloc.a_0, alloc.target, alloc.joint_accuracy,
                             len(alloc.layers), sum(floor is not None and la.ratio <= floor for la in alloc.layers),
                             sum(la.ratio >= 1.0 for la in alloc.layers), alloc.params()))
    return sorted(out, key=lambda r: (r.model, r.task, r.arm, r.seed))


def markdown(rows: Sequence[SearchRow]) -> list[str]:
    if not rows:
        return []
    def num(x: float | None, fmt: str = ".3f") -> str:
        return "-" if x is None else format(x, fmt)
    lines = ["", "## The allocation search's signal", "",
             "Per searched run: the few-shot validation set's size, the probe's metric a_ref and the metric with "
             "every adapter removed a_0, their gap counted in validation examples, the search's target and the "
             "final allocation's joint metric, and how many layers ended at the grid's floor or dense.", "",
             "| model | task | arm | seed | allocator | val examples | a_ref | a_0 | gain (examples) | target | joint "
             "| layers at floor | dense | params |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.task} | {r.arm} | {r.seed} | {r.allocator} | {r.val_examples} | "
                     f"{num(r.a_ref)} | {num(r.a_0)} | {num(r.gain_examples, '.1f')} | {num(r.target)} | "
                     f"{num(r.joint)} | {r.at_floor} of {r.layers} | {r.dense} | {r.params:,} |")
    return lines
