"""A run dir is a contract: every stage made with the settings of this run (one process at a time, and a
failed command deleting only what it made, are `ownership`'s).

- **Fingerprints.** A stage records, when it starts, the settings that determine its output
  (`<stage>/fingerprint.json`): the resolved config, minus the keys that only change how a run
  is run or named (`FREE`), minus the keys that only later stages read (`LATER`). A rerun
  into the run dir compares its own settings with every stage that has one, finished or
  checkpointed, and refuses on any difference, listing the keys, before anything is written
  (a key that a record lacks is an option added since, and is not compared).
  So `.hydra/` is never rewritten by a refused rerun (plr writes `.hydra/` itself, after the
  check; Hydra's own writing is off, `hydra.output_subdir: null`).
- **`--rerun-from STAGE`** deletes that stage and every later one (and `results.json`), so they
  run again with the new settings; the earlier stages must still match.
- **The data.** A stage's fingerprint also holds the identity of the data it was made from
  (`data:<source>` keys: a content digest of each data file the task read, see `data.identity`),
  which `run_pipeline` compares before any stage runs: a rerun or resume after a data file changed
  is refused in one line naming the file and the `--rerun-from` stage.

Stages finished before fingerprints existed have none, and are not checked; a stage that started
but neither finished nor checkpointed is not compared either (it starts over anyway).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from partial_lora import artifacts
from partial_lora.errors import PlrError

if TYPE_CHECKING:
    from partial_lora.spec import RunSpec

FINGERPRINT = "fingerprint.json"
JOB_LOG = "train.log"  # Hydra's job log (`hydra.job.name` is `train`), opened by every process of a run
CHECKPOINT = "checkpoint.safetensors"  # checkpoint.FILE (not imported: checkpoint imports torch)
DATA = "data:"  # fingerprint keys of the data identity: data:<source> -> content digest

# Keys that never change a stage's output: where and under what name a run goes, how it is
# logged, shown and scheduled, on which device it resumes. Prefixes end in "."; others are exact.
FREE = ("run_dir", "out_root", "name", "label", "from_run", "logger.", "adapter.name", "trainer.progress",
        "trainer.num_workers", "trainer.eval_batch_size", "trainer.device", "trainer.checkpoint_every",
        "trainer.compile", "trainer.strategy")
# Keys a stage does not read (only the stages after it do).
_RETRAIN_ONLY = ("retrain.", "trainer.epochs", "trainer.max_steps")
# SNIP's batches (`adapter.snip`) are read by extract, and by allocate when its search ranks with
# SNIP; SHiRA's mask (`adapter.shira`) by extract alone.
LATER: dict[str, tuple[str, ...]] = {
    artifacts.PROBE: (*_RETRAIN_ONLY, "adapter.sparsity", "adapter.allocation.", "adapter.mask.", "adapter.match.",
                      "adapter.snip.", "adapter.shira."),
    artifacts.ALLOCATE: (*_RETRAIN_ONLY, "adapter.mask.shared_input",  # the search ranks each layer on its own
                         "adapter.shira."),
    artifacts.EXTRACT: _RETRAIN_ONLY,
    artifacts.RETRAIN: (),
    artifacts.EVALUATE: (),
}


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key.startswith(p) if p.endswith(".") else key == p for p in patterns)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved config (a plain mapping) as dotted keys, the `FREE` ones left out."""
    flat = _flatten(config)
    return {k: v for k, v in flat.items() if not _matches(k, FREE)}


def fingerprint(config: Mapping[str, Any], stage: str, data: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The settings that determine `stage`'s output (JSON round-tripped, as it is stored), and the
    identity of its data (`data`: source -> digest, stored as `data:<source>` keys) when given."""
    keep = {k: v for k, v in settings(config).items() if not _matches(k, LATER[stage])}
    keep.update({DATA + str(k): v for k, v in (data or {}).items()})
    return json.loads(json.dumps(keep, default=artifacts.json_default, sort_keys=True))


def record(run_dir: Path, stage: str, config: Mapping[str, Any], data: Mapping[str, str] | None = None) -> None:
    """Write the stage's fingerprint (when it starts, so a checkpointed stage has one too)."""
    artifacts.write_json(artifacts.stage_dir(run_dir, stage) / FINGERPRINT, fingerprint(config, stage, data))


def _recorded(run_dir: Path, stage: str) -> dict[str, Any] | None:
    path = artifacts.stage_dir(run_dir, stage) / FINGERPRINT
    if not path.exists():
        return None
    got = artifacts.read_json(path)
    if not isinstance(got, dict):
        raise PlrError(f"corrupt artifact {path} (not a JSON object); rerun with --rerun-from {stage}")
    return got


def made_with(run_dir: Path, stage: str) -> dict[str, Any] | None:
    """The settings `stage` of a run dir was made with: its fingerprint, or for a run dir from
    before fingerprints, the same keys taken from its `.hydra/config.yaml` (None: neither)."""
    recorded = _recorded(run_dir, stage)
    if recorded is not None:
        return recorded
    path = run_dir / artifacts.HYDRA_CONFIG
    if not path.is_file():
        return None
    conf = OmegaConf.load(path)
    try:
        plain = OmegaConf.to_container(conf, resolve=True)
    except Exception:  # noqa: BLE001 - an interpolation that needs Hydra's runtime (${now:...}, ${hydra:...})
        plain = OmegaConf.to_container(conf, resolve=False)
    return fingerprint(plain, stage)  # type: ignore[arg-type]


def saved_values(run_dir: Path, keys: Sequence[str]) -> dict[str, Any] | None:
    """The values of dotted `keys` in a run dir's `.hydra/config.yaml`, each resolved on its own
    (None: the run dir has no saved config)."""
    path = run_dir / artifacts.HYDRA_CONFIG
    if not path.is_file():
        return None
    conf = OmegaConf.load(path)
    out = {}
    for key in keys:
        value = OmegaConf.select(conf, key)
        out[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return out


def lookup(config: Mapping[str, Any], key: str) -> Any:
    """A dotted key's value in a plain config (None when it is not there)."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def allocation_settings(spec: RunSpec) -> dict[str, Any]:
    """What determines an allocation, as `allocation.json` records it (`settings`): a run whose
    settings are equal reuses it through `from_run`. Read from the resolved config, as the stages'
    fingerprints are, so that what earlier runs recorded compares equal."""
    adapter = spec.settings["adapter"]
    allocation = {k: v for k, v in (adapter.get("allocation") or {}).items()
                  if k not in ("search_masks", "replay_mb")}  # neither changes what the search finds
    mcfg = spec.mask
    out = {"sparsity": spec.sparsity, "allocation": allocation, "probe": adapter.get("probe") or {},
           "search_masks": spec.search_masks, "mask_energy": mcfg.energy,
           "match": adapter.get("match") or {},
           "r": spec.lora.r, "targets": adapter["targets"], "model": spec.model.name,
           "task": spec.task, "seed": spec.seed}
    if mcfg.sides != "both":  # recorded only when set, so allocations made before the option stay reusable
        out["mask_sides"] = mcfg.sides
    if out["search_masks"] == "snip":  # the search ranks by SNIP importance: its batches matter
        out["snip"] = {"batches": spec.snip.batches, "batch_size": spec.snip.batch_size or spec.train.batch_size}
    return resolved_allocation(out)


def resolved_allocation(settings: dict[str, Any]) -> dict[str, Any]:
    """Allocation settings with `relative_to: null` written as what it means (`probe`, or `gain`
    with metric=loss), so an allocation made with the default is reused by a run that names it.
    Also applied to settings recorded before this, which kept the null."""
    allocation = dict(settings.get("allocation") or {})
    if allocation.get("relative_to") is None:
        allocation["relative_to"] = "gain" if allocation.get("metric") == "loss" else "probe"
    return {**settings, "allocation": allocation}


def changed(theirs: Mapping[str, Any], ours: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (theirs, ours)} for the recorded keys whose value differs now.

    A settings key that the record lacks is not compared: it is an option added since, and a new
    option's default keeps the old behaviour (so adding an option does not invalidate every run
    dir). The data is compared only when both sides have its identity, and then whole: a data file
    that is new, gone or changed is a difference (None stands for "absent").
    """
    out = {k: (theirs[k], ours.get(k)) for k in sorted(theirs)
           if not k.startswith(DATA) and ours.get(k) != theirs[k]}
    mine, yours = _data(theirs), _data(ours)
    if mine and yours:
        out.update({k: (mine.get(k), yours.get(k)) for k in sorted(set(mine) | set(yours))
                    if mine.get(k) != yours.get(k)})
    return out


def _data(fp: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fp.items() if k.startswith(DATA)}


def resumable(run_dir: Path, stage: str) -> bool:
    """Whether `stage` finished or left a checkpoint (what a rerun would keep or continue from)."""
    return artifacts.is_done(run_dir, stage) or (artifacts.stage_dir(run_dir, stage) / CHECKPOINT).exists()


def _show(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, str) else v
    return text if len(text) <= 40 else text[:37] + "..."


def differences(run_dir: Path, config: Mapping[str, Any],
                data: Mapping[str, str] | None = None) -> dict[str, dict[str, tuple[Any, Any]]]:
    """Per stage with a fingerprint that finished or checkpointed: {key: (recorded, now)} for every
    key that differs (the data's identity too, when `data` is given)."""
    out: dict[str, dict[str, tuple[Any, Any]]] = {}
    for stage in artifacts.STAGES:
        theirs = _recorded(run_dir, stage) if resumable(run_dir, stage) else None
        if theirs is not None and (diff := changed(theirs, fingerprint(config, stage, data))):
            out[stage] = diff
    return out


def describe(diff: Mapping[str, Mapping[str, tuple[Any, Any]]], limit: int = 6) -> str:
    """`differences`' keys as `key then -> now`, the first `limit` of them, then how many more."""
    keys: dict[str, tuple[Any, Any]] = {}
    for per in diff.values():
        keys.update(per)
    shown = ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in list(keys.items())[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check(run_dir: Path, config: Mapping[str, Any], data: Mapping[str, str] | None = None) -> None:
    """Refuse a run dir whose stages were made with other settings, or from other data.

    Raises:
        PlrError: one line with the differing keys (then and now), the stages they touch, and
            the two ways on: a new run_dir, or --rerun-from the earliest such stage. For the data:
            the files that changed (or are new, or gone) and the earliest stage made from them.
    """
    diff = differences(run_dir, config, data)
    if not diff:
        return
    first = next(s for s in artifacts.STAGES if s in diff)
    files = {k[len(DATA):]: v for per in diff.values() for k, v in per.items() if k.startswith(DATA)}
    if files:
        (name, (then, now)), more = next(iter(files.items())), len(files) - 1
        what = "is new" if then is None else "is gone" if now is None else "changed"
        raise PlrError(f"the data changed since {first} of run dir {run_dir} was made from it: {name} {what}"
                       + (f" (and {more} more file{'s' if more > 1 else ''})" if more else "")
                       + f"; restore it, choose a new run_dir, or add --rerun-from {first} to redo {first} and "
                       "every later stage from the data as it is now")
    raise PlrError(f"run dir {run_dir} was made with other settings ({describe(diff)}; in {', '.join(diff)}); "
                   f"choose a new run_dir, or add --rerun-from {first} to redo {first} and every later stage "
                   "with these settings")


def rerun_from(run_dir: Path, stage: str, echo: Any = print) -> None:
    """Delete `stage` and every stage after it, and the run's results, so they run again."""
    if stage not in artifacts.STAGES:
        raise PlrError(f"--rerun-from {stage}: no such stage; choose one of {', '.join(artifacts.STAGES)}")
    cleared = []
    for name in artifacts.STAGES[artifacts.STAGES.index(stage):]:
        d = artifacts.stage_dir(run_dir, name)
        if d.exists():
            shutil.rmtree(d)
            cleared.append(name)
    (run_dir / artifacts.RESULTS).unlink(missing_ok=True)
    if cleared:
        echo(f"[plr] --rerun-from {stage}: cleared {', '.join(cleared)} in {run_dir}")
