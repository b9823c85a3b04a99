"""Turn the composed Hydra config into one typed `RunSpec`, validating every value.

This is where user input is checked: each bad value becomes one `PlrError` line naming the
key and the fix, raised before any work starts. Beyond types: no number may be nan or inf
(`typecheck`), seeds lie in [0, 2^32-1], a group may not be replaced by one value
(`adapter.allocation=5`), the model must read the task's kind of input, and a task's metrics
must be known and of its kind (correlations for regression). `validate(cfg, members)` returns the run's
`RunSpec`, once per run (`pipeline.runner.run_pipeline`), and the stages read that; the core modules
never see a DictConfig. A multi-task run's member task configs are composed by `member_tasks`, at the
CLI's edge beside the run's own config (or here, for a library caller that did not).

The schemas are the dataclasses themselves (`schemas()`: one per config group, each beside the
code it configures), and so are their range checks (each dataclass's `__post_init__`); this module
keeps the checks across fields. Each group's values are checked against the field annotations by
`typecheck.check_type`, which never coerces. That is why they are not registered as Hydra structured
configs in the ConfigStore: OmegaConf's typed nodes convert what they can (measured with
omegaconf 2.3: `'3'` becomes 3 in an int field, `'yes'` and 1 become True in a bool field), and a
wrong type must be refused, not converted. Unknown keys fail at composition (the YAMLs are
struct) or in `typecheck.from_values`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from partial_lora.adapter.inject import LoRAConfig
from partial_lora.adapter.masks import MaskConfig
from partial_lora.adapter.peft_baselines import METHODS as PEFT_METHODS
from partial_lora.adapter.peft_baselines import PeftSpec, ShiraMaskConfig
from partial_lora.adapter.snip import SnipConfig
from partial_lora.allocation.allocators import AllocationConfig
from partial_lora.data.base import TaskSpec
from partial_lora.errors import PlrError
from partial_lora.models.backbones import ModelSpec, torch_dtype
from partial_lora.spec import MatchConfig, ProbeConfig, RunSpec, TaskPart
from partial_lora.training.recipe import RetrainConfig, TrainConfig
from partial_lora.typecheck import check_seed, check_type, from_values

__all__ = ["MaskConfig", "MatchConfig", "ProbeConfig", "RetrainConfig", "RunSpec", "TaskPart", "validate"]


def plain(node: Any) -> Any:
    """A DictConfig/ListConfig as plain Python containers (interpolations resolved)."""
    if isinstance(node, DictConfig | ListConfig):
        return OmegaConf.to_container(node, resolve=True)
    return node


def schemas() -> dict[str, type]:
    """Each config group's schema, by its key: the dataclass whose fields are the group's keys
    (type-checked by `from_values`, range- and choice-checked by the dataclass or the converter)."""
    return {"trainer": TrainConfig, "adapter.probe": ProbeConfig, "adapter.allocation": AllocationConfig,
            "adapter.mask": MaskConfig, "adapter.match": MatchConfig, "adapter.snip": SnipConfig,
            "adapter.shira": ShiraMaskConfig, "retrain": RetrainConfig,
            "model": ModelSpec, "task": TaskSpec}


# task.num_labels is a TaskSpec field (checked where the data loads), not an extra key.
TASK_EXTRA = ("metrics", "metric", "scoring")
MULTI_KEYS = ("name", "kind", "names", "each", "members", "metric", "metrics")
MODEL_EXTRA = ()


def is_multi(cfg: DictConfig) -> bool:
    """Whether the run trains several tasks at once (`task=multi`, `task=commonsense`)."""
    return cfg.task.get("kind") == "multi"


def member_tasks(cfg: DictConfig) -> list[DictConfig]:
    """The member task configs of a multi-task run: `conf/task/<name>.yaml` for each of
    `task.names`, then `task.each` (every member) and `task.members.<name>` (one member) merged in.
    Each member is composed once here; the CLI calls this at its edge, beside composing the run.

    Raises:
        PlrError: no names, an unknown task name, or an unknown key in the multi-task node.
    """
    values = plain(cfg.task)
    # Task settings next to the multi-task keys (an experiment's `task.max_train_samples`) apply
    # to every member, before task.each.
    shared = {k: v for k, v in values.items() if k not in MULTI_KEYS}
    known = {f.name for f in dataclasses.fields(TaskSpec)} | set(TASK_EXTRA)
    unknown = sorted(set(shared) - known)
    if unknown:
        raise PlrError(f"unknown key task.{unknown[0]} of a multi-task run; its keys are {', '.join(MULTI_KEYS)} "
                       f"and member settings (task.each.<key>, task.members.<task>.<key>)")
    names = values.get("names")
    if not names or not isinstance(names, list):
        raise PlrError("a multi-task run needs task.names=[<task>,<task>,...] (task configs, e.g. [cola,sst2])")
    if len(set(names)) != len(names):
        raise PlrError(f"task.names lists a task twice ({names}); list each task once")
    each, per = values.get("each") or {}, values.get("members") or {}
    stray = sorted(set(per) - set(names))
    if stray:
        raise PlrError(f"task.members.{stray[0]} is not in task.names={names}; add it there or drop the override")
    members = []
    for name, node in zip(names, _compose_tasks(names), strict=True):
        node = OmegaConf.create(OmegaConf.to_container(node, resolve=True))  # detached, not struct
        members.append(OmegaConf.merge(node, shared, each, per.get(name) or {}))
    return members


def _compose_tasks(names: list[str]) -> list[DictConfig]:
    """Each task's config as `task=<name>` composes it (inside a Hydra app or not)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    def one(name: str) -> DictConfig:
        if name in ("multi", "commonsense") or not isinstance(name, str):
            raise PlrError(f"task.names may only list single tasks, got '{name}'")
        try:
            return compose("config", overrides=[f"task={name}"]).task
        except HydraException:
            raise PlrError(f"unknown task '{name}' in task.names; use task configs from conf/task "
                           "(e.g. cola, sst2, cifar100, boolq)") from None

    if GlobalHydra.instance().is_initialized():
        return [one(n) for n in names]
    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        return [one(n) for n in names]


def _group(cfg: DictConfig, key: str) -> dict:
    """A config group's values as a plain dict; a group replaced by one value (`adapter.allocation=5`)
    is refused in one line."""
    node = OmegaConf.select(cfg, key)
    values = plain(node) if node is not None else {}
    if not isinstance(values, dict):
        raise PlrError(f"{key}={values!r} replaces a group of settings with one value; set its keys one by one "
                       f"({key}.<key>=<value>, see `plr train --help`)")
    return values


def task_spec(cfg: DictConfig) -> TaskSpec:
    return from_values(TaskSpec, _group(cfg, "task"), "task", TASK_EXTRA)


def task_metrics(cfg: DictConfig) -> tuple[list[str], str]:
    """(metrics to report, metric that selects checkpoints); a multi-task run reports `mean`,
    the mean over its members of each member's main metric."""
    if is_multi(cfg):
        return ["mean"], "mean"
    metrics = list(plain(cfg.task.get("metrics", ["accuracy"])))
    main = cfg.task.get("metric", metrics[0])
    if main not in metrics:
        metrics.insert(0, main)
    return metrics, main


def model_spec(cfg: DictConfig) -> ModelSpec:
    return from_values(ModelSpec, _group(cfg, "model"), "model", MODEL_EXTRA)


def lora_config(cfg: DictConfig, spec: ModelSpec | None = None) -> LoRAConfig:
    """LoRA placement from `adapter` (rank, targets) and `model` (target sets, fused slices, head)."""
    spec = spec or model_spec(cfg)
    a = cfg.adapter
    check_type("adapter.r", a.r, int)
    check_type("adapter.alpha", a.alpha, float)
    check_type("adapter.dropout", a.dropout, float)
    LoRAConfig(r=int(a.r), alpha=float(a.alpha), dropout=float(a.dropout))  # the ranges, before the targets
    targets = plain(a.targets)
    target_set = targets if isinstance(targets, str) else None
    if target_set is not None:
        if target_set not in spec.lora_targets:
            raise PlrError(f"adapter.targets='{target_set}' is not a target set of model '{spec.name}'; use one of "
                           f"{sorted(spec.lora_targets)} or a list of module patterns")
        targets = spec.lora_targets[target_set]
    if not targets:
        raise PlrError("adapter.targets is empty; name a target set (qv, all) or module patterns")
    return LoRAConfig(r=int(a.r), alpha=float(a.alpha), dropout=float(a.dropout), targets=tuple(targets),
                      fused={k: tuple(v) for k, v in spec.fused.items()}, exclude=tuple(spec.head_modules),
                      target_set=target_set)


def train_config(cfg: DictConfig, **override: Any) -> TrainConfig:
    values = {**_group(cfg, "trainer"), **override}
    return from_values(TrainConfig, values, "trainer")


def sparsity(cfg: DictConfig) -> float | str:
    """`adapter.sparsity`: a number in [0, 1) (0 = dense) or `auto`."""
    s = cfg.adapter.get("sparsity", 0.0)
    if isinstance(s, str):
        if s != "auto":
            try:
                s = float(s)
            except ValueError:
                raise PlrError(f"adapter.sparsity='{s}' must be a number in [0, 1) or auto") from None
        else:
            return "auto"
    s = float(s)
    if not 0 <= s < 1:
        raise PlrError(f"adapter.sparsity must be in [0, 1) (or auto), got {s}; 0.8 keeps 20% of rows and columns")
    return s


def _node(cfg: DictConfig, key: str) -> dict:
    return _group(cfg, key)


def probe_config(cfg: DictConfig) -> ProbeConfig:
    return from_values(ProbeConfig, _node(cfg, "adapter.probe"), "adapter.probe")


def allocation_config(cfg: DictConfig) -> AllocationConfig:
    values = _node(cfg, "adapter.allocation")
    if "grid" in values:
        check_type("adapter.allocation.grid", values["grid"], list[float])
        values["grid"] = tuple(float(g) for g in values["grid"])
    return from_values(AllocationConfig, values, "adapter.allocation")


def mask_config(cfg: DictConfig) -> MaskConfig:
    return from_values(MaskConfig, _node(cfg, "adapter.mask"), "adapter.mask")


def peft_spec(cfg: DictConfig) -> PeftSpec | None:
    """The PEFT baseline of `adapter.method` (None for plr's own adapters)."""
    method = str(cfg.adapter.get("method", "lora"))
    shira = from_values(ShiraMaskConfig, _node(cfg, "adapter.shira"), "adapter.shira")
    if method not in PEFT_METHODS:
        if shira.mask is not None:
            raise PlrError(f"adapter.shira.mask applies to SHiRA, not adapter.method={method}; drop it or use "
                           "adapter=shira_random / adapter=shira_snip")
        return None
    a = cfg.adapter
    return PeftSpec(method, int(a.r), float(a.alpha), float(a.dropout), _node(cfg, "adapter.peft"), shira.mask)


def snip_config(cfg: DictConfig) -> SnipConfig:
    return from_values(SnipConfig, _node(cfg, "adapter.snip"), "adapter.snip")


def match_config(cfg: DictConfig) -> MatchConfig:
    return from_values(MatchConfig, _node(cfg, "adapter.match"), "adapter.match")


def retrain_config(cfg: DictConfig) -> RetrainConfig:
    return from_values(RetrainConfig, _node(cfg, "retrain"), "retrain")


def _check_verbalized(task: DictConfig) -> None:
    """A text classification task on a causal LM: a prompt template and one answer per class."""
    from partial_lora.data.verbalizer import check_template

    name = str(task.get("name"))
    if task.get("regression"):
        raise PlrError(f"task {name} is a regression task; a causal LM scores classes by their answers, so use an "
                       "encoder model (e.g. model=minilm) for it")
    if task.get("prompt") is None or task.get("verbalizer") is None:
        raise PlrError(f"task {name} on a causal LM needs task.prompt (a template with {{text}}) and "
                       "task.verbalizer ({<class>: <answer>, ...}); add them to its YAML or the command line")
    check_template(plain(task.prompt), name)
    if not isinstance(plain(task.verbalizer), dict):
        raise PlrError(f"task.verbalizer of task {name} must map each class to its answer, got "
                       f"{plain(task.verbalizer)!r}")


IMAGE_FAMILIES = ("hf-vision", "timm")


def _check_metrics(task: str, regression: bool, metrics: list[str]) -> None:
    """A regression task is scored by correlations and errors, a classification task by classes."""
    from partial_lora.training.metrics import METRICS, REGRESSION_METRICS

    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise PlrError(f"unknown metric '{unknown[0]}' of task '{task}'; set task.metrics to names from: "
                       f"{', '.join(METRICS)}")
    wrong = [m for m in metrics if (m in REGRESSION_METRICS) != regression]
    if wrong:
        fits = ", ".join(REGRESSION_METRICS) if regression else "accuracy, f1 ..."
        raise PlrError(f"task '{task}' is a {'regression' if regression else 'classification'} task, but metric "
                       f"'{wrong[0]}' scores {'classes' if regression else 'regression'}; set task.metrics and "
                       f"task.metric to metrics of its kind ({fits})")


def saved_run(cfg: DictConfig, run_dir: Any) -> DictConfig:
    """A run dir's saved config (`.hydra/config.yaml`) with `run_dir` set to where it is: the saved
    default `${out_root}/${name}/${now:...}` resolves only inside the Hydra app that made it."""
    cfg = cfg.copy()
    cfg.run_dir = str(run_dir)
    return cfg


def validate(cfg: DictConfig, members: list[DictConfig] | None = None) -> RunSpec:
    """Check everything a run will read, before the run dir gets any results, and return it as
    one typed `RunSpec` (the one place for cross-field checks).

    Args:
        members: a multi-task run's member task configs (`member_tasks`), when the caller has
            composed them already (the CLI, at its edge); None composes them here.
    """
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise PlrError(f"{missing[0]} is required by this config; set {missing[0]}=<value> on the command line")
    spec = model_spec(cfg)
    torch_dtype(spec)
    multi = is_multi(cfg)
    tasks = (member_tasks(cfg) if members is None else members) if multi else [cfg.task]
    kinds = sorted({str(t.get("kind", "text")) for t in tasks})
    if len(kinds) > 1:
        raise PlrError(f"task.names mixes {' and '.join(kinds)} tasks; a multi-task run trains one backbone on one "
                       "kind of input: list tasks of one kind")
    parts = []
    for task in tasks:
        kind = task.get("kind", "text")
        causal = spec.family == "hf-causal"
        if not causal and (spec.family in IMAGE_FAMILIES) != (kind == "image"):
            reads = "images" if spec.family in IMAGE_FAMILIES else "text"
            raise PlrError(f"model '{spec.name}' ({spec.family}) reads {reads}, but task '{task.name}' is a {kind} "
                           "task; "
                           + ("choose a text model (model=minilm, tiny-bert, roberta-base...)" if kind != "image"
                              else "choose an image model (model=vit-b, tiny-vit, efficientnet-lite0...)")
                           + " or a task of its kind")
        if causal and kind == "text":
            _check_verbalized(task)  # before the type checks: its messages say what a verbalizer is
        elif causal != (kind == "choice"):
            raise PlrError(f"model '{spec.name}' ({spec.family}) cannot run task '{task.name}' ({kind}): "
                           + ("a causal LM answers multiple-choice tasks (task=boolq, commonsense...) and text "
                              "classification tasks that give task.prompt and task.verbalizer (task=rt-polarity...)"
                              if causal else "multiple-choice tasks need a causal LM (model=tiny-llama, "
                              "gemma3-270m, llama-7b...)"))
        node = OmegaConf.create({"task": task})
        metrics, main = task_metrics(node)
        tspec = task_spec(node)
        _check_metrics(tspec.name, tspec.regression, metrics)
        parts.append(TaskPart(tspec, tuple(metrics), main))
        if str(task.get("scoring", "sum")) not in ("sum", "mean"):
            raise PlrError(f"task.scoring must be sum or mean, got '{task.get('scoring')}'")
    lora = lora_config(cfg, spec)
    metrics, main = task_metrics(cfg)
    train = train_config(cfg)
    sp = sparsity(cfg)
    check_type("seed", cfg.seed, int)
    if int(cfg.seed) < 0:
        raise PlrError(f"seed must be >= 0, got {cfg.seed}")
    check_seed("seed", cfg.seed)
    probe = probe_config(cfg)
    allocation = allocation_config(cfg)
    mask = mask_config(cfg)
    if mask.shared_input and lora.dropout > 0:
        raise PlrError(f"adapter.mask.shared_input gathers one input for the layers that read it, so they cannot draw "
                       f"their own input dropout (adapter.dropout={lora.dropout}); set adapter.dropout=0 or "
                       "adapter.mask.shared_input=false")
    retrain = retrain_config(cfg)
    peft = peft_spec(cfg)
    if peft is not None and sp != 0:
        raise PlrError(f"adapter={cfg.adapter.method} is a dense PEFT baseline; set adapter.sparsity=0")
    match = match_config(cfg)
    if peft is not None and peft.shira_mask is not None and not match.active:
        m = peft.shira_mask
        raise PlrError(f"adapter=shira_{m} (adapter.shira.mask={m}) trains SHiRA at another run's budget and has none "
                       "to match: set adapter.match.run=<a finished Partial-LoRA run dir> (or "
                       "adapter.match.budget=<entries>)")
    snip = snip_config(cfg)
    if match.active and allocation.budget is not None and sp != 0:
        raise PlrError("adapter.match and adapter.allocation.budget both set a budget; keep one")
    method = str(cfg.adapter.get("method", "lora"))
    if method == "lora_matched" and not match.active:
        raise PlrError("adapter=lora_matched needs a target: adapter.match.run=<run dir>, "
                       "adapter.match.budget=<params> or adapter.match.rank=<rank>")
    return RunSpec(seed=int(cfg.seed), model=spec, task=str(cfg.task.name), parts=tuple(parts), multi=multi,
                   metrics=tuple(metrics), main_metric=main, scoring=str(cfg.task.get("scoring", "sum")),
                   method=method, lora=lora, sparsity=sp, probe=probe, allocation=allocation, mask=mask,
                   retrain=retrain, match=match, train=train, peft=peft, snip=snip,
                   name=str(cfg.name), label=str(cfg.get("label") or cfg.adapter.name), from_run=_from_run(cfg),
                   settings=OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]


def _from_run(cfg: DictConfig) -> str | None:
    value = cfg.get("from_run")
    return str(value) if value else None
