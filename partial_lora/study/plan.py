"""The claims study's plan: a suite's tasks × seeds × arms, each an ordinary `plr train` run (a `Job`).

A suite (`study.suite`: a YAML file) gives the model, the tasks, seeds and arms and the recipe; an
arm (`study.arms`) gives its overrides and whether it reads Partial-LoRA's run. A job is data: its
overrides, its run dir, its log and the run dirs it reads; `study.schedule` runs any list of them.

Every run has a fixed dir, `<out>/runs/<model>/<task>/<arm>/seed<n>`, so a study that stops can
be started again: finished runs are reused and an unfinished one resumes from its checkpoint.
Arms that reuse Partial-LoRA's probe and allocation (`from_run`) or match its parameter budget
(`adapter.match.run`) depend on the `partial` run of the same task and seed, and run after it.

A **variant** is another reading of Partial-LoRA under a name (`plr study --variant gain --set
adapter.allocation.relative_to=gain`, or a suite's `variant:`, which `--variant` replaces): its
overrides go to the arms that are built on Partial-LoRA's settings (`VARIANT_ARMS`), whose run dirs
become `<arm>@<name>`, and its matched controls (uniform, lora_matched) match the variant's own
budget. The arms that do not depend on Partial-LoRA (head, dense LoRA, ...) are shared with the
default reading and run once. The variant's Partial-LoRA run reuses the default one's probe
(`from_run`) when the probe's settings are the same.

A **tuning grid** (`plr study --tune retrain.lr=...`, `study.grid`) adds, per task and tuned arm,
a run per value on the choice seed (`<arm dir>+<key>+<value>/seed<n>`) and, per other seed, a run
that waits on the choice (`Job.grid`; `study.choice` makes it a run at the chosen value once the
grid's runs ended). A tuned run reads the same runs as the arm at the shared setting: arms built on
Partial-LoRA's run read the untuned `partial` run of the seed, and an arm that probes and allocates
itself (`Arm.probes`) reuses its own untuned run's probe and allocation (`from_run`), so every value
of the grid trains the very same masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from partial_lora import artifacts
from partial_lora.errors import PlrError
from partial_lora.study import grid
from partial_lora.study.arms import ARMS, BUDGET_KEYS, MATCHED_CONTROLS, PARTIAL, VARIANT_ARMS
from partial_lora.study.suite import OFFLINE, VARIANT_NAME, Suite, SuiteTask, load


def _key(override: str) -> str:
    return override.lstrip("+").split("=", 1)[0]


def _kept(key: str, keeps: tuple[str, ...]) -> bool:
    return any(key.startswith(k) if k.endswith(".") else key == k for k in keeps)


def _sets_budget(override: str) -> bool:
    return _key(override).startswith(BUDGET_KEYS)


def arm_dir_name(arm: str, variant: str | None) -> str:
    return f"{arm}@{variant}" if variant and arm in VARIANT_ARMS else arm


def split_arm(name: str) -> tuple[str, str | None]:
    """A run dir's arm name -> (arm, variant or None); a tuned run's setting (`+key+value`,
    `study.grid.split`) is part of neither: `partial@gain+retrain.lr+0.01` -> (partial, gain)."""
    arm, _, variant = grid.split(name)[0].partition("@")
    return arm, variant or None


@dataclass(frozen=True)
class Job:
    """One run of the study: its `plr train` overrides, its fixed run dir, its log, and the runs it reads
    (they run first; when one of them fails, this one is skipped)."""

    model: str
    task: str
    arm: str
    seed: int
    run_dir: Path
    overrides: tuple[str, ...]
    after: tuple[Path, ...] = ()
    log: Path | None = None
    grid: tuple[tuple[str, Path], ...] = ()  # a run at the grid's choice: the grid's (value, run dir) it waits on

    def command(self) -> list[str]:
        return ["plr", "train", *self.overrides, f"run_dir={self.run_dir}"]

    @property
    def waits(self) -> bool:
        """A run at the grid's choice, not made yet (`{choice}` stands for the value in its dir and overrides)."""
        return bool(self.grid)

    def at(self, value: str) -> "Job":
        """This waiting run at the chosen value."""
        def put(text: str) -> str:
            return text.replace(grid.CHOICE, value)
        return Job(self.model, self.task, put(self.arm), self.seed, Path(put(str(self.run_dir))),
                   tuple(map(put, self.overrides)), self.after, None if self.log is None else Path(put(str(self.log))))


@dataclass
class Selection:
    """What `plr study` was asked to run (None: the suite's own)."""

    suites: Sequence[str | Suite] | None = None  # built-in names, suite files, or Suites (None: the offline ones)
    tasks: Sequence[str] | None = None
    seeds: Sequence[int] | None = None
    arms: Sequence[str] | None = None
    extra: Sequence[str] = field(default_factory=list)
    variant: str | None = None  # a named reading of Partial-LoRA ...
    variant_overrides: Sequence[str] = field(default_factory=list)  # ... and its overrides
    tune: grid.Tune | bool | None = True  # a grid (study.grid); True: each suite's own `tune:`; None: none

    def tune_of(self, suite: Suite, task: SuiteTask | None = None) -> grid.Tune | None:
        """The grid of a suite's task: `--tune` for every task; else the task's own `tune:`, else the suite's."""
        if self.tune is not True:
            return self.tune or None
        return task.tune if task is not None and task.tune is not None else suite.tune

    def for_suite(self, suite: Suite) -> Selection:
        """This selection with the suite's variant when it names none itself (`--variant` replaces a suite's)."""
        if self.variant is not None or suite.variant is None:
            return self
        return replace(self, variant=suite.variant.name, variant_overrides=list(suite.variant.overrides))

    def resolved(self) -> list[Suite]:
        return [s if isinstance(s, Suite) else load(s) for s in (self.suites or OFFLINE)]


def _check_variant(sel: Selection) -> None:
    if sel.variant is None:
        if sel.variant_overrides:
            raise PlrError("--set needs --variant NAME (the name of the reading it defines)")
        return
    if not VARIANT_NAME.fullmatch(sel.variant):
        raise PlrError(f"--variant '{sel.variant}' must be 1-40 lowercase letters, digits, '_', '.' or '-'")
    if not sel.variant_overrides:
        raise PlrError(f"--variant {sel.variant} needs its overrides: --set key=value (one --set per override)")
    bad = [o for o in sel.variant_overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise PlrError(f"--set '{bad[0]}' is not key=value")


def run_dir(out: Path, model: str, task: str, arm: str, seed: int) -> Path:
    return out / "runs" / model / task / arm / f"seed{seed}"


def _known(kind: str, values: Sequence, known: Sequence) -> None:
    bad = [v for v in values if v not in known]
    if bad:
        raise PlrError(f"unknown {kind} '{bad[0]}' for plr study; choose from: {', '.join(map(str, known))}")


def model_of(suite: Suite, extra: Sequence[str]) -> str:
    """The model the suite's runs use: the suite's, or the last `model=` among the overrides after `--`
    (so its runs go to their own <model> folder and never mix with the suite model's)."""
    chosen = [o.split("=", 1)[1] for o in extra if o.split("=", 1)[0] == "model"]
    return chosen[-1] if chosen else suite.model


def plan(out: Path, sel: Selection) -> list[Job]:
    """The jobs in run order: seed by seed, task by task, Partial-LoRA before the arms that read it;
    with a tuning grid, then per task the grid's runs on the choice seed and the runs that wait on
    its choice (the other seeds).

    Raises:
        PlrError: an unknown suite, arm or seed; a task that is not in the chosen suite; a selection
            that leaves no run.
    """
    suites = sel.resolved()
    _check_variant(sel)
    if sel.arms is not None:
        _known("arm", sel.arms, list(ARMS))
    if sel.seeds is not None and any(s < 0 for s in sel.seeds):
        raise PlrError(f"--seeds must be >= 0, got {list(sel.seeds)}")
    jobs: list[Job] = []
    for suite in suites:
        model = model_of(suite, sel.extra)
        known = [t.name for t in suite.tasks]
        tasks = list(sel.tasks or known)
        if sel.tasks is not None and sel.suites is None:  # --tasks without --suite: each suite keeps what it has
            tasks = [t for t in tasks if t in known]
        else:
            _known(f"task of the {suite.name} suite", tasks, known)
        arms = [a for a in suite.arms if sel.arms is None or a in sel.arms]
        if any(ARMS[a].needs_partial for a in arms) and PARTIAL not in arms:
            arms.insert(0, PARTIAL)  # the arms that read it need it: run it too
        arms.sort(key=lambda a: (a != PARTIAL, ARMS[a].needs_partial))
        seeds = list(sel.seeds if sel.seeds is not None else suite.seeds)
        plan_one = _Planner(out, suite, model, sel.for_suite(suite))
        jobs += [plan_one.job(task, arm, seed) for seed in seeds for task in map(suite.task, tasks) for arm in arms]
        first = min(suite.seeds)  # the choice seed
        asked = sel.arms if sel.arms is not None else suite.arms  # not a Partial-LoRA run added for its readers
        tuned = [a for a in arms if ARMS[a].tuned and a in asked]
        read = {a for a in tuned if ARMS[a].probes}  # the untuned runs the grid reads ...
        read |= {PARTIAL} if any(ARMS[a].needs_partial for a in tuned) else set()
        for task in map(suite.task, tasks):
            tune = sel.tune_of(suite, task)
            if tune is None:
                continue
            grid_jobs = {arm: [plan_one.job(task, arm, first, (tune.key, v)) for v in tune.values] for arm in tuned}
            # ... are planned on the choice seed too when --seeds left it out
            jobs += [plan_one.job(task, arm, first) for arm in arms if first not in seeds and arm in read]
            jobs += [j for arm in tuned for j in grid_jobs[arm]]
            for seed in (s for s in seeds if s != first):
                for arm in tuned:
                    waiting = plan_one.job(task, arm, seed, (tune.key, grid.CHOICE))
                    jobs.append(replace(waiting, grid=tuple(zip(tune.values, (j.run_dir for j in grid_jobs[arm])))))
    return _unique(jobs, sel)


@dataclass(frozen=True)
class _Planner:
    """The jobs of one suite: an arm's run on a task and seed, at the shared setting or a grid's value."""

    out: Path
    suite: Suite
    model: str
    sel: Selection

    def job(self, task: SuiteTask, arm: str, seed: int, tuned: tuple[str, str] | None = None) -> Job:
        out, model, sel, variant = self.out, self.model, self.sel, self.sel.variant
        partial = run_dir(out, model, task.name, arm_dir_name(PARTIAL, variant), seed)
        a = ARMS[arm]
        name = arm_dir_name(arm, variant)
        own = list(a.overrides(partial))
        if name != arm:  # the variant's reading
            default = run_dir(out, model, task.name, PARTIAL, seed)
            if arm == PARTIAL and artifacts.is_done(default, artifacts.PROBE):
                own.append(f"from_run={default}")  # its probe, when the probe's settings match
            # The Partial-LoRA arm takes them as typed (a misspelt key fails there, and the arms that read
            # it are skipped); its controls add any key their adapter lacks (lora_matched has no
            # adapter.allocation node). An arm's own keys (the SNIP arms' mask method) stay its own.
            own += [o if arm == PARTIAL else f"++{o.lstrip('+')}" for o in sel.variant_overrides
                    if not (arm in MATCHED_CONTROLS and _sets_budget(o)) and not _kept(_key(o), a.keeps)]
        after = (partial,) if a.needs_partial else ()
        tail: tuple[str, ...] = ()
        if tuned is not None:
            key, value = tuned
            if a.probes:  # its probe and allocation: those of its run at the shared setting
                untuned = run_dir(out, model, task.name, name, seed)
                own = [o for o in own if not o.startswith("from_run=")] + [f"from_run={untuned}"]
                after = (*after, untuned)
            name = grid.dir_name(name, key, value)
            tail = (f"{key}={value}",)  # last: the grid's value wins over the overrides after --
        overrides = (f"model={self.suite.model}", *self.suite.recipe_of(task), *task.overrides, *own,
                     *self.suite.arm_overrides.get(arm, ()), f"seed={seed}", f"label={name}", *sel.extra, *tail)
        where = run_dir(out, model, task.name, name, seed)
        return Job(model, task.name, name, seed, where, overrides, after, log_path(out, where))


def log_path(out: Path, run: Path) -> Path:
    """`<out>/logs/<model>/<task>/<arm>/seed<n>.log`: the run's output, one file per run."""
    return out / "logs" / run.relative_to(out / "runs").with_suffix(".log")


def _unique(jobs: list[Job], sel: Selection) -> list[Job]:
    """The jobs, each run dir once; refuses an empty plan and two suites that plan one run dir differently."""
    if not jobs:
        what = ", ".join(s if isinstance(s, str) else s.name for s in (sel.suites or OFFLINE))
        raise PlrError(f"no run planned: --tasks {','.join(sel.tasks or [])} names no task of the suite(s) {what}; "
                       "see `plr study --help` for their tasks" if sel.tasks else
                       f"no run planned for the suite(s) {what}; check --tasks, --seeds and --arms")
    seen: dict[Path, Job] = {}
    for job in jobs:
        other = seen.setdefault(job.run_dir, job)
        if other is not job and other.overrides != job.overrides:
            raise PlrError(f"two suites plan the run dir {job.run_dir} with other settings; run them with "
                           "different --out folders")
    return list(seen.values())
