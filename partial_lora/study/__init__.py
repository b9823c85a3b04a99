"""`plr study`: does Partial-LoRA beat its matched-budget controls? Runs and judges the claims.

    plr study [--suite NAME|FILE.yaml] [--tasks ...] [--seeds ...] [--arms ...] [--out DIR]
              [--tune KEY=V1,V2,...] [--jobs N | --gpus 0,1 | --launcher slurm] [--dry-run]
              [--tables-only] [--compare METHOD CONTROL] [-- extra overrides]

A suite (`study.suite`, a YAML file) names a model, tasks, seeds, arms and the recipe; `plan`
lays out tasks × seeds × arms (`study.plan`), `execute` runs what has not finished, several runs
at once and in dependency order (`study.run`, `study.schedule`; `study.estimate` says how long
the runs left take, from the logs of finished runs like them), and `write` turns the finished
runs into `study.md` (every arm, the claims table with paired bootstrap CIs and verdicts, the
default rule of `study.rule`, and what each allocation search saw: `study.search`), `study.csv`
and `study.png` (`study.claims`). `--compare` pairs any two finished arms the same way
(`claims.comparison_rows`) and only prints.

With a tuning grid (`--tune`, `study.grid`), every tuned arm also runs at each value on the choice
seed and at the chosen value on the other seeds (`study.choice`), and study.md adds the tuning
table, each claim at the shared setting -> at the tuned one, and the default rule on the tuned
arms. Either way it ends with the method table (`study.methods`, also `method-table.md`): one
row per arm pooled over tasks, at the tuned rates when there are some.
"""

from __future__ import annotations

import csv
from pathlib import Path

from partial_lora import artifacts
from partial_lora.study import choice, methods
from partial_lora.study.arms import ARMS
from partial_lora.study.claims import ClaimRow, arm_rows, change_markdown, claim_rows, collect, markdown
from partial_lora.study.plan import Selection, plan, split_arm
from partial_lora.study.rule import markdown as rule_markdown
from partial_lora.study.rule import rule_rows
from partial_lora.study.run import check, execute
from partial_lora.study.search_signal import markdown as search_markdown
from partial_lora.study.search_signal import search_rows

__all__ = ["ARMS", "Selection", "check", "execute", "plan", "write"]


def _tuned(row: ClaimRow, grids: set[tuple[str, str, str]]) -> bool:
    """Whether a claim row at the tuned setting has a tuned arm: its method or control ran a grid on its task (on
    any of the model's tasks, for a pooled row). A model or task with no grid has no tuned row."""
    arms, task = {row.claim.method, row.claim.control}, row.task.split("/")[0]
    return any(m == row.model and a in arms and (row.task == "pooled" or t == task) for m, t, a in grids)


def write(out: Path, n_boot: int = 2000) -> list[Path]:
    """study.md, study.csv, study.png and method-table.md from the finished runs under `out`."""
    full = collect(out)
    shared = choice.shared_view(full)
    study = choice.without_unchosen(full)  # every arm: the shared runs and each grid's chosen value
    arms = arm_rows(study)
    rows = claim_rows(shared, n_boot=n_boot)
    extra = [*rule_markdown(rule_rows(rows)), *search_markdown(search_rows(shared))]
    found = choice.choices(full)
    rates = methods.rates_of(found)
    tuned_rows: list[tuple[str, ClaimRow]] = []  # (the CSV's kind, the row)
    by_method, setting = shared, "every arm at the suite's shared setting"
    for key in choice.keys(full):
        view = choice.tuned_view(full, key)
        grids = {(c.model, c.task, c.arm) for c in found if c.key == key}
        # the claims a grid can change, on the tasks it ran on (pooled over those alone, on both sides)
        tuned = [r for r in claim_rows(choice.grid_tasks(view, found, key), n_boot=n_boot) if _tuned(r, grids)]
        before = [r for r in claim_rows(choice.grid_tasks(shared, found, key), n_boot=n_boot) if _tuned(r, grids)]
        tuned_rows += [*((f"claim shared {key}", r) for r in before), *((f"claim tuned {key}", r) for r in tuned)]
        extra += [*choice.markdown([c for c in found if c.key == key]), *change_markdown(before, tuned, key, rates)]
        extra += rule_markdown(rule_rows(tuned), title=f"The default rule, each arm at its tuned {key}")
        by_method, setting = view, f"each arm at its tuned {key}; head at the shared setting"
    by_arm = methods.method_rows(by_method, rates, n_boot=n_boot)
    extra += ["", "## The method table", "", methods.markdown(by_arm, setting).rstrip()]
    table = methods.write(out, by_arm, setting)
    md = out / "study.md"
    artifacts.write_text(md, markdown(study, rows, arms, extra=extra))
    path_csv = out / "study.csv"
    with artifacts.atomic_path(path_csv) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kind", "model", "task", "arm_or_claim", "metric", "mean", "std", "seeds", "params",
                    "reduction_pct", "ci_low", "ci_high", "verdict"])
        for a in arms:
            sd = "" if a["std"] is None else f"{a['std']:.6f}"  # one seed: no std
            w.writerow(["arm", a["model"], a["task"], a["arm"], a["metric"], f"{a['mean']:.6f}", sd,
                        " ".join(map(str, a["seeds"])), f"{a['params']:.0f}",
                        "" if a["reduction_pct"] is None else f"{a['reduction_pct']:.2f}", "", "", ""])
        for kind, r in [*(("claim", r) for r in rows), *tuned_rows]:
            c = r.comparison
            w.writerow([kind, r.model, r.task, f"{r.claim.key}: {r.claim.method} - {r.claim.control}", "points",
                        f"{c.mean:.4f}", "", " ".join(map(str, c.seeds)), f"{r.method_params:.0f}",
                        "" if r.reduction_pct is None else f"{r.reduction_pct:.2f}", f"{c.low:.4f}", f"{c.high:.4f}",
                        r.verdict])
        for ch in found:  # the tuning grid: each value's validation score; the chosen one's verdict column says so
            pending = choice.so_far(ch, found)
            for value, score in ch.scores.items():
                w.writerow([f"tune {ch.key}", ch.model, ch.task, f"{ch.arm} {ch.key}={value}", f"val_{ch.metric}",
                            "" if score is None else f"{score:.6f}", "", str(ch.seed), "", "", "", "",
                            ("chosen" if pending is None else "chosen so far") if value == ch.value else ""])
    png = out / "study.png"
    plot(arms, png)
    return [md, path_csv, png, table]


def plot(arms: list[dict], path: Path) -> None:
    """Test metric against adapter parameters, one panel per (model, task), every arm a point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(a["model"], a["task"]) for a in arms})
    cols = min(3, max(1, len(panels)))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    colours = {name: plt.cm.tab10(i % 10) for i, name in enumerate(ARMS)}
    for ax, (model, task) in zip(axes.flat, panels):
        for a in (a for a in arms if (a["model"], a["task"]) == (model, task)):
            x = max(a["params"], 1.0)  # the head-only arm (0 adapter parameters) sits at the left edge
            ax.errorbar([x], [a["mean"]], yerr=[a["std"] or 0.0], fmt="o",
                        color=colours.get(split_arm(a["arm"])[0], "k"),
                        label=a["arm"], capsize=3)
        ax.set_xscale("log")
        ax.set_title(f"{task} · {model}", fontsize=9)
        ax.set_xlabel("adapter parameters (log)", fontsize=8)
        ax.set_ylabel(f"test {next(a['metric'] for a in arms if a['task'] == task)}", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=7)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    with artifacts.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
