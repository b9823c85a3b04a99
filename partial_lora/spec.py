"""The run's typed spec: the composed config, checked and converted once, at the edge.

`config.validate(cfg)` builds one frozen `RunSpec` from the Hydra config; the pipeline and its
stages read it (`run(spec, run_dir, tracker)`), never the DictConfig. Every value in it has its
type and range checked already, so a stage can trust it. The core never imports Hydra, and this
module imports none of it either.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from partial_lora.adapter.inject import LoRAConfig
from partial_lora.adapter.masks import MaskConfig
from partial_lora.adapter.peft_baselines import PeftSpec
from partial_lora.adapter.snip import SnipConfig
from partial_lora.allocation.allocators import AllocationConfig
from partial_lora.data.base import TaskSpec
from partial_lora.errors import PlrError
from partial_lora.models.backbones import ModelSpec
from partial_lora.training.recipe import RetrainConfig, TrainConfig


@dataclass(frozen=True)
class ProbeConfig:
    """`adapter.probe`: the short few-shot dense-LoRA run that the allocation reads.

    Attributes:
        shots / val_shots: examples per class in the few-shot train and (disjoint) validation sets.
        epochs / batch_size: the probe's training length.
        lr / head_lr: None uses the trainer's.
        short_classes: `error` or `shrink` for classes with fewer than shots + val_shots
            examples (see `data.split.few_shot`).
    """

    shots: int = 16
    val_shots: int = 16
    epochs: float = 10
    batch_size: int = 16
    lr: float | None = None
    head_lr: float | None = None
    short_classes: str = "shrink"

    def __post_init__(self) -> None:
        if self.shots < 1 or self.val_shots < 1:
            raise PlrError(f"adapter.probe.shots and val_shots must be >= 1, got {self.shots} and {self.val_shots}")
        if self.epochs <= 0 or self.batch_size < 1:
            raise PlrError("adapter.probe.epochs must be positive and adapter.probe.batch_size >= 1, got "
                           f"{self.epochs} and {self.batch_size}; fix that override")
        if self.short_classes not in ("error", "shrink"):
            raise PlrError(f"adapter.probe.short_classes must be error or shrink, got '{self.short_classes}'")


@dataclass(frozen=True)
class MatchConfig:
    """`adapter.match`: a parameter target for matched-budget baselines (at most one key set).

    Attributes:
        run: a finished run dir whose adapter parameter count is the target.
        budget: a number of adapter parameters.
        rank: the parameter count of a dense LoRA of this rank on the same layers.
    """

    run: str | None = None
    budget: int | None = None
    rank: int | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("run", "budget", "rank") if getattr(self, k) is not None]
        if len(given) > 1:
            raise PlrError(f"adapter.match takes one of run, budget or rank, got {' and '.join(given)}; keep one")
        for key in ("budget", "rank"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise PlrError(f"adapter.match.{key} must be a positive integer, got {v!r}")

    @property
    def active(self) -> bool:
        return any(getattr(self, k) is not None for k in ("run", "budget", "rank"))

    def target(self, per_rank: int) -> int | None:
        """The parameter target, given a dense LoRA's parameters per unit of rank on these layers."""
        if self.budget is not None:
            return self.budget
        if self.rank is not None:
            return self.rank * per_rank
        if self.run is not None:
            return _run_adapter_params(self.run)
        return None


def _run_adapter_params(run: str) -> int:
    from pathlib import Path

    from partial_lora import artifacts

    path = Path(run).expanduser() / artifacts.RESULTS
    if not path.is_file():
        raise PlrError(f"adapter.match.run={run} has no {artifacts.RESULTS} (not a finished plr run); point it at a "
                       "finished run or set adapter.match.budget=<parameters>")
    results = artifacts.read_json(path)
    params = (results.get("params") or {}).get("adapter")
    if results.get("status") != "complete" or not params:
        raise PlrError(f"adapter.match.run={run} did not finish (status {results.get('status')!r}); finish it first "
                       "or set adapter.match.budget=<parameters>")
    return int(params)


@dataclass(frozen=True)
class TaskPart:
    """One task of the run: the only one, or one member of a multi-task run.

    Attributes:
        task: where its data is and how it is shaped.
        metrics: the metrics it reports; `main` selects checkpoints.
    """

    task: TaskSpec
    metrics: tuple[str, ...]
    main: str


@dataclass(frozen=True)
class RunSpec:
    """Everything a run reads, typed and checked (`config.validate` builds it).

    Attributes:
        task: the run's task name (`multi`/`commonsense` for a multi-task run).
        parts: the task, or the members of a multi-task run, in order.
        multi: whether the run trains several tasks at once through one head each.
        metrics / main_metric: what the run reports and selects on (`mean` for a multi-task run).
        scoring: how a causal LM scores a choice (`sum` or `mean` of its tokens' log-probabilities).
        method: `adapter.method` (`lora`, `partial`, `uniform`, `lora_matched`, `head`, a PEFT method).
        sparsity: `adapter.sparsity`, a number in [0, 1) or `auto`.
        peft: the PEFT baseline's settings (None for plr's own adapters).
        match: the parameter target of the matched-budget controls.
        snip: the batches SNIP importance is measured on (`adapter.mask.method=snip`, `adapter=shira_snip`).
        name / label: the run's name (its run dirs' folder) and its method's name in reports.
        from_run: a run dir whose probe (and allocation, when its settings match) this run reuses.
        settings: the resolved config as plain containers, what run dirs and allocations record
            (the stages' fingerprints and `results.json`'s settings); the stages read the fields above.
    """

    seed: int
    model: ModelSpec
    task: str
    parts: tuple[TaskPart, ...]
    multi: bool
    metrics: tuple[str, ...]
    main_metric: str
    scoring: str
    method: str
    lora: LoRAConfig
    sparsity: float | str
    probe: ProbeConfig
    allocation: AllocationConfig
    mask: MaskConfig
    retrain: RetrainConfig
    match: MatchConfig
    train: TrainConfig
    peft: PeftSpec | None
    settings: Mapping[str, Any] = field(repr=False, compare=False)
    snip: SnipConfig = field(default_factory=SnipConfig)
    name: str = ""
    label: str = ""
    from_run: str | None = None

    @property
    def sparse(self) -> bool:
        """Whether the run trains a masked adapter (adapter.sparsity is auto or > 0)."""
        return self.sparsity != 0

    @property
    def mask_seed(self) -> int:
        """The seed of the random masks (`adapter.mask.seed`, else the run's seed)."""
        return self.seed if self.mask.seed is None else self.mask.seed

    @property
    def search_masks(self) -> str:
        """The mask method the allocation search ranks with (allocation.search_masks, else mask.method)."""
        return self.allocation.search_masks or self.mask.method

    @property
    def causal(self) -> bool:
        return self.model.family == "hf-causal"
