"""The study's tables: every arm's results, and each claim judged on paired differences.

Claims (docs/method.md, "The claims": the paper's claims 1, 2, 3 and 5, and the reviewers' control R), each a
method arm against a control arm on the same tasks and seeds:

- C1 winning tickets exist: a random ticket at Partial-LoRA's per-layer ratios, retrained,
  matches dense LoRA;
- C2a the per-layer ratio matters: Partial-LoRA beats uniform rows/cols at its own budget;
- C2b which entries are kept matters less: random rows/cols at Partial-LoRA's ratios match the
  subspace-chosen ones;
- C3 Partial-LoRA matches dense LoRA with fewer parameters (the reduction is in the row);
- C5 rank vs sparsity: Partial-LoRA at r=32 with a dense rank-1 LoRA's budget beats that LoRA;
- R  the reviewers' control: Partial-LoRA beats dense LoRA at the rank matched to its budget.

A variant (another reading, arms `<arm>@<name>`) is judged on the same claims: its own
Partial-LoRA arms against its own matched controls and the shared dense ones.
"""

from __future__ import annotations

import functools
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from partial_lora import artifacts
from partial_lora.errors import PlrError
from partial_lora.study import stats
from partial_lora.study.arms import ARMS
from partial_lora.study.plan import arm_dir_name, split_arm
from partial_lora.study.run import finished


@dataclass(frozen=True)
class Claim:
    key: str
    text: str
    method: str
    control: str
    kind: str  # matches | beats


CLAIMS = (
    Claim("C1", "a random ticket at Partial-LoRA's ratios matches dense LoRA", "partial-random", "lora", "matches"),
    Claim("C2a", "Partial-LoRA's per-layer ratios beat uniform ratios at the same budget", "partial", "uniform",
          "beats"),
    Claim("C2b", "random rows/cols at Partial-LoRA's ratios match the subspace ones", "partial-random", "partial",
          "matches"),
    Claim("C3", "Partial-LoRA matches dense LoRA with fewer parameters", "partial", "lora", "matches"),
    Claim("C5", "r=32 sparse at a rank-1 budget beats dense LoRA r=1", "partial-r32-rank1", "lora-r1", "beats"),
    Claim("R", "Partial-LoRA beats dense LoRA rank-matched to its budget", "partial", "lora-matched", "beats"),
)


@dataclass
class Run:
    """A finished run, or one member task of a finished multi-task run (`member`; its task is
    `<task>/<member>`, so the claims are judged per member and pooled over the members: the pooled
    difference is the difference in the run's `mean`)."""

    model: str
    task: str
    arm: str
    seed: int
    dir: Path
    results: dict[str, Any]
    member: str | None = None

    @property
    def metric(self) -> str:
        if self.member is not None:
            return self.results["member_metrics"][self.member]["main"]
        return self.results["main_metric"]

    @property
    def value(self) -> float:
        key = f"test_{self.member}_{self.metric}" if self.member is not None else f"test_{self.metric}"
        return float(self.results["metrics"][key])

    @property
    def params(self) -> int:
        return int(self.results["params"]["adapter"] or 0)

    @property
    def wall(self) -> float:
        return float(sum(w for w in self.results["wall_s"].values() if w))


@dataclass
class Study:
    runs: list[Run]
    missing: list[Path] = field(default_factory=list)

    def narrow(self, models: Sequence[str] | None = None, tasks: Sequence[str] | None = None,
               seeds: Sequence[int] | None = None) -> "Study":
        """The runs of these models, tasks and seeds only (None: all of them)."""
        keep = [r for r in self.runs if (models is None or r.model in models)
                and (tasks is None or r.task in tasks or r.task.split("/")[0] in tasks)
                and (seeds is None or r.seed in seeds)]
        return Study(keep, self.missing)

    def by(self) -> dict[tuple[str, str, str], dict[int, Run]]:
        out: dict[tuple[str, str, str], dict[int, Run]] = defaultdict(dict)
        for r in self.runs:
            out[r.model, r.task, r.arm][r.seed] = r
        return out


def collect(out: Path) -> Study:
    """Every finished run under `<out>/runs/<model>/<task>/<arm>/seed<n>`; unfinished ones listed."""
    root = out / "runs"
    if not root.is_dir():
        raise PlrError(f"{out} holds no study runs (no {root}); run `plr study --out {out}` first")
    runs, missing = [], []
    for d in sorted(root.glob("*/*/*/seed*")):
        model, task, arm = d.parts[-4:-1]
        results = finished(d)
        if results is None:
            missing.append(d)
            continue
        seed = int(d.name[4:])
        members = results.get("members") if results.get("member_metrics") else None
        if members:  # a multi-task run: one entry per member task
            runs += [Run(model, f"{task}/{m}", arm, seed, d, results, member=m) for m in members]
        else:
            runs.append(Run(model, task, arm, seed, d, results))
    return Study(runs, missing)


@functools.lru_cache(maxsize=None)
def _test_predictions_of(run_dir: Path, member: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    df = artifacts.read_predictions(run_dir)
    df = df[df["split"] == "test"]
    if member is not None:
        df = df[df["task"] == member]
    df = df.sort_values("index")
    return df["label"].to_numpy(), df["prediction"].to_numpy()


def _test_predictions(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """(labels, predictions) on the test split (of its member task); each file is read once per member."""
    return _test_predictions_of(run.dir, run.member)


def paired(method: dict[int, Run], control: dict[int, Run]) -> dict[int, stats.Paired]:
    """The seeds both arms finished, as paired test predictions (the same test examples)."""
    out = {}
    for seed in sorted(set(method) & set(control)):
        ya, pa = _test_predictions(method[seed])
        yb, pb = _test_predictions(control[seed])
        if len(ya) != len(yb) or not np.array_equal(ya, yb):
            raise PlrError(f"{method[seed].dir} and {control[seed].dir} were scored on different test sets; "
                           "rerun both with the same task settings")
        out[seed] = stats.Paired(ya, pa, pb)
    return out


@dataclass
class ClaimRow:
    claim: Claim
    task: str  # a task, or "pooled"
    model: str
    comparison: stats.Comparison
    method_params: float
    control_params: float
    reduction_pct: float | None

    @property
    def verdict(self) -> str:
        return self.comparison.verdict(self.claim.kind)


def claim_rows(study: Study, n_boot: int = 2000, seed: int = 0) -> list[ClaimRow]:
    """Each claim per (model, task) with at least one paired seed, then pooled over those tasks."""
    _test_predictions_of.cache_clear()  # a table reads the files as they are now
    by = study.by()
    rows: list[ClaimRow] = []
    for model in sorted({r.model for r in study.runs}):
        variants = sorted({v for r in study.runs if r.model == model for v in [split_arm(r.arm)[1]] if v})
        for variant, base in ((v, c) for v in [None, *variants] for c in CLAIMS):
            # A variant's claims: its own Partial-LoRA arms against the shared or its own controls.
            claim = replace(base, method=arm_dir_name(base.method, variant),
                            control=arm_dir_name(base.control, variant))
            rows += pair_rows(by, model, claim, n_boot=n_boot, seed=seed)
    return rows


def pair_rows(by: Mapping[tuple[str, str, str], dict[int, Run]], model: str, claim: Claim, n_boot: int = 2000,
              seed: int = 0) -> list[ClaimRow]:
    """`claim.method` against `claim.control` on each of `model`'s tasks where both have a seed in common,
    then pooled over those tasks (when more than one). `by` is the study's runs grouped by `Study.by`."""
    rows: list[ClaimRow] = []
    pooled, metrics, mp, cp, red = [], [], [], [], []
    for task in sorted({t for m, t, _ in by if m == model}):
        m, c = by.get((model, task, claim.method), {}), by.get((model, task, claim.control), {})
        pairs = paired(m, c)
        if not pairs:
            continue
        dense = by.get((model, task, "lora"), {})
        metric = next(iter(m.values())).metric
        comp = stats.compare([pairs], [metric], n_boot=n_boot, seed=seed)
        m_params = statistics.mean(m[s].params for s in pairs)
        c_params = statistics.mean(c[s].params for s in pairs)
        d_params = statistics.mean(r.params for r in dense.values()) if dense else None
        reduction = 100 * (1 - m_params / d_params) if d_params else None
        rows.append(ClaimRow(claim, task, model, comp, m_params, c_params, reduction))
        pooled.append(pairs)
        metrics.append(metric)
        mp.append(m_params)
        cp.append(c_params)
        if reduction is not None:
            red.append(reduction)
    if len(pooled) > 1:
        comp = stats.compare(pooled, metrics, n_boot=n_boot, seed=seed)
        rows.append(ClaimRow(claim, "pooled", model, comp, statistics.mean(mp), statistics.mean(cp),
                             statistics.mean(red) if red else None))
    return rows


def comparison_rows(study: Study, pairs: Sequence[tuple[str, str]], n_boot: int = 2000,
                    seed: int = 0) -> list[ClaimRow]:
    """Any two arms, method − control, paired like the claims (`plr study --compare METHOD CONTROL`):
    how the method search compares two readings, e.g. `partial@a` against `partial@b`.

    Raises:
        PlrError: an arm with no finished run, or two arms with no (model, task, seed) in common.
    """
    _test_predictions_of.cache_clear()
    by = study.by()
    known = {r.arm for r in study.runs}
    rows: list[ClaimRow] = []
    for method, control in pairs:
        for arm in (method, control):
            if arm not in known:
                raise PlrError(f"--compare: no finished run of arm '{arm}' in this study (within "
                               f"--model/--tasks/--seeds); its arms there are: {', '.join(sorted(known))}")
        claim = Claim("vs", f"{method} against {control}", method, control, "beats")
        found = [row for model in sorted({r.model for r in study.runs})
                 for row in pair_rows(by, model, claim, n_boot, seed)]
        if not found:
            raise PlrError(f"--compare: {method} and {control} have no task and seed in common; run both on the "
                           "same ones")
        rows += found
    return rows


def comparison_markdown(rows: Sequence[ClaimRow]) -> str:
    """The `--compare` table: each pair's paired difference, its CI, and both verdicts (matches, beats)."""
    lines = ["| model | task | method − control | difference (pts) | per seed | 95% CI | params (method / control) | "
             "matches (−1) | beats (0) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r.comparison
        per_seed = ", ".join(f"{d:+.2f}" for d in c.per_seed)
        lines.append(f"| {r.model} | {r.task} | {r.claim.method} − {r.claim.control} | {c.mean:+.2f} | {per_seed} | "
                     f"[{c.low:+.2f}, {c.high:+.2f}] | {r.method_params:,.0f} / {r.control_params:,.0f} | "
                     f"{c.verdict('matches')} | {c.verdict('beats')} |")
    return "\n".join(lines) + "\n"


def change_markdown(shared: Sequence[ClaimRow], tuned: Sequence[ClaimRow], key: str,
                    rates: Mapping[tuple[str, str, str], str]) -> list[str]:
    """Each claim row at the shared setting -> at the tuned one (`study.choice.tuned_view`): the
    difference, its CI and the verdict at each, and the values the two arms were tuned to on the task
    (`rates`: (model, task, arm) -> value; `shared`: the arm has no grid)."""
    def ident(r: ClaimRow) -> tuple[str, str, str, str, str]:
        return r.claim.key, r.model, r.task, r.claim.method, r.claim.control

    before, after = {ident(r): r for r in shared}, {ident(r): r for r in tuned}
    order = list(before) + [k for k in after if k not in before]

    def cell(r: ClaimRow | None) -> str:
        if r is None:
            return "-"
        c = r.comparison
        return f"{c.mean:+.2f} [{c.low:+.2f}, {c.high:+.2f}]"

    lines = ["", f"## Claims: shared setting → each arm at its tuned {key}", "",
             f"Each claim at the suite's shared setting (as in the claims table above) and with both arms at their "
             f"own {key}, chosen per task on the validation split of the choice seed (the tuning table). Difference "
             "method − control in points, 95% CI, verdicts as above. Rates: the values chosen for method / control "
             "on the task ('shared': that arm is not tuned). '-': not measured.", "",
             "| claim | model | task | method − control | kind | shared: difference [95% CI] | "
             "tuned: difference [95% CI] | verdict shared → tuned | rates (method / control) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k in order:
        b, a = before.get(k), after.get(k)
        r = b or a
        assert r is not None
        task = r.task.split("/")[0]
        rate = ("-" if r.task == "pooled" else
                f"{rates.get((r.model, task, r.claim.method), 'shared')} / "
                f"{rates.get((r.model, task, r.claim.control), 'shared')}")
        verdict = f"{b.verdict if b else '-'} → **{a.verdict if a else '-'}**"
        lines.append(f"| {r.claim.key} | {r.model} | {r.task} | {r.claim.method} − {r.claim.control} | {r.claim.kind} "
                     f"| {cell(b)} | {cell(a)} | {verdict} | {rate} |")
    return lines


def arm_rows(study: Study) -> list[dict[str, Any]]:
    """One row per (model, task, arm): the test metric's mean ± std over seeds, parameters, time."""
    by = study.by()
    out = []
    order = {a: i for i, a in enumerate(ARMS)}
    def key(item: tuple[tuple[str, str, str], Any]) -> tuple[str, str, str, int, str]:
        (model, task, arm), _ = item
        base, variant = split_arm(arm)
        return model, task, variant or "", order.get(base, 99), arm

    for (model, task, arm), runs in sorted(by.items(), key=key):
        values = [r.value for r in runs.values()]
        dense = by.get((model, task, "lora"), {})
        d_params = statistics.mean(r.params for r in dense.values()) if dense else None
        params = statistics.mean(r.params for r in runs.values())
        out.append({"model": model, "task": task, "arm": arm, "metric": next(iter(runs.values())).metric,
                    "mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
                    "seeds": sorted(runs), "values": values, "params": params,
                    "reduction_pct": 100 * (1 - params / d_params) if d_params else None,
                    "wall_min": statistics.mean(r.wall for r in runs.values()) / 60})
    return out


def markdown(study: Study, rows: Sequence[ClaimRow], arms: Sequence[dict[str, Any]],
             extra: Sequence[str] = ()) -> str:
    """study.md: every arm and the claims, then the `extra` sections, then the unfinished runs."""
    lines = ["# plr study", "", "## Every arm", "",
             "Test metric, mean ± std over seeds; adapter parameters (the head not counted); reduction against "
             "dense LoRA r=8 (the `lora` arm) on the same task; mean wall time per run.", "",
             "| model | task | metric | arm | test | seeds | adapter params | reduction | wall |",
             "|---|---|---|---|---|---|---|---|---|"]
    for a in arms:
        red = "-" if a["reduction_pct"] is None else f"{a['reduction_pct']:.1f}%"
        sd = "" if a["std"] is None else f" ± {a['std']:.4f}"  # one seed has no spread to show
        lines.append(f"| {a['model']} | {a['task']} | {a['metric']} | {a['arm']} | {a['mean']:.4f}{sd} | "
                     f"{','.join(map(str, a['seeds']))} | {a['params']:,.0f} | {red} | {a['wall_min']:.1f} min |")
    lines += ["", "## Claims", "",
              "Rule: the paired difference method − control in the task's main test metric, in points "
              "(1 point = 0.01), mean over seeds; 95% CI from a hierarchical paired bootstrap (seeds, then test "
              "examples within each seed; resampling seed 0). **matches** = non-inferiority at −1 point, **beats** "
              "= superiority over 0. **holds**: the CI lies entirely above the margin; **refuted**: entirely below "
              "it; **inconclusive**: otherwise. Pooled rows average the tasks' differences (tasks fixed).", "",
              "| claim | model | task | method − control | kind | difference (pts) | per seed | 95% CI | params "
              "(method / control) | reduction | verdict |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r.comparison
        red = "-" if r.reduction_pct is None else f"{r.reduction_pct:.1f}%"
        per_seed = ", ".join(f"{d:+.2f}" for d in c.per_seed)
        lines.append(f"| {r.claim.key} | {r.model} | {r.task} | {r.claim.method} − {r.claim.control} | {r.claim.kind} "
                     f"| {c.mean:+.2f} | {per_seed} | [{c.low:+.2f}, {c.high:+.2f}] | {r.method_params:,.0f} / "
                     f"{r.control_params:,.0f} | {red} | **{r.verdict}** |")
    lines += ["", "Claims: " + "; ".join(f"{c.key}: {c.text}" for c in CLAIMS) + "."]
    lines += extra
    if study.missing:
        lines += ["", f"Unfinished runs ({len(study.missing)}), not counted:", "",
                  *[f"- {p}" for p in study.missing]]
    return "\n".join(lines) + "\n"
