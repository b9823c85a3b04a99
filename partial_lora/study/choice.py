"""The tuning grid's choice, read off its runs (`study.grid` says what the grid is and how it chooses).

- (`study.run.resolve` makes a run that waits on the choice a run at the chosen value, once the
  grid's runs ended; a grid value whose run failed is left out of the choice.)
- `choices`: every choice a study folder holds, from its run dirs alone (`plr study --tables-only`
  needs no `--tune`): per (model, task, arm, key), each value's validation score on the choice seed
  (the grid's smallest seed), the chosen value and the arm's score at the shared setting.
- `tuned_view`: the study with each tuned arm's runs at its chosen value standing under the arm's own
  name (and the grid's other values left out), so the claims, the rule and the method table read
  the tuned arms exactly as they read the shared ones; an arm with no grid (head) stays as it is.
- `markdown`: the tuning table of study.md.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace

from partial_lora.study import grid
from partial_lora.study.claims import Run, Study
from partial_lora.study.run import val_score


@dataclass(frozen=True)
class Choice:
    """One (model, task, arm) grid as its run dirs hold it."""

    model: str
    task: str        # the run dirs' task (a multi-task run's, not a member's)
    arm: str         # the untuned arm dir: partial, partial@gain
    key: str
    seed: int        # the choice seed
    metric: str
    scores: dict[str, float | None]  # value -> validation score on the choice seed (None: no finished run)
    shared: float | None             # the untuned arm's validation score on the same seed
    value: str | None                # the choice (None: no value scored)

    @property
    def dir(self) -> str | None:
        return None if self.value is None else grid.dir_name(self.arm, self.key, self.value)

    @property
    def edge(self) -> str | None:
        """'lowest' or 'highest' when the choice is the grid's smallest or largest value (a value beyond it was
        not tried, and might score better), else None."""
        return grid.edge(self.scores, self.value)


def _task_dir(run: Run) -> str:
    return run.task if run.member is None else run.task.rsplit("/", 1)[0]


def choices(study: Study) -> list[Choice]:
    """Every tuning grid in the study's runs, with its choice."""
    grids: dict[tuple[str, str, str, str], dict[str, dict[int, Run]]] = defaultdict(lambda: defaultdict(dict))
    untuned: dict[tuple[str, str, str, int], Run] = {}
    for r in study.runs:
        base, key, value = grid.split(r.arm)
        if key is None:
            untuned[r.model, _task_dir(r), r.arm, r.seed] = r
        else:
            grids[r.model, _task_dir(r), base, key][value][r.seed] = r  # type: ignore[index]
    out = []
    for (model, task, arm, key), by_value in sorted(grids.items()):
        seed = min(s for runs in by_value.values() for s in runs)
        at = {v: runs.get(seed) for v, runs in by_value.items()}
        scores = {v: val_score(r.results) if r is not None else None for v, r in at.items()}
        any_run = next(r for r in at.values() if r is not None)
        shared = untuned.get((model, task, arm, seed))
        out.append(Choice(model, task, arm, key, seed, str(any_run.results.get("main_metric")),
                          dict(sorted(scores.items(), key=lambda kv: float(kv[0]))),
                          val_score(shared.results) if shared is not None else None, grid.choose(scores)))
    return out


def keys(study: Study) -> list[str]:
    """The tuned keys the study holds (one, unless several grids were run into one folder)."""
    return sorted({k for r in study.runs for k in [grid.split(r.arm)[1]] if k})


def tuned_view(study: Study, key: str) -> Study:
    """The study at the tuned setting `key`: each arm with a choice by its chosen runs, under its own name."""
    chosen = {(c.model, c.task, c.arm): c.value for c in choices(study) if c.key == key and c.value is not None}
    runs = []
    for r in study.runs:
        base, k, value = grid.split(r.arm)
        where = (r.model, _task_dir(r), base)
        if k is None and where not in chosen:
            runs.append(r)  # no grid for this arm (head): its runs at the shared setting
        elif k == key and chosen.get(where) == value:
            runs.append(replace(r, arm=base))
    return Study(runs, study.missing)


def grid_tasks(study: Study, found: Sequence[Choice], key: str) -> Study:
    """The study's runs on the (model, task)s where a grid for `key` ran: the claims shared -> tuned compare
    these tasks only, so a pooled row pools the same tasks on both sides and no task pools at its shared setting
    as if it were tuned."""
    tasks = {(c.model, c.task) for c in found if c.key == key}
    return Study([r for r in study.runs if (r.model, _task_dir(r)) in tasks], study.missing)


def shared_view(study: Study) -> Study:
    """The study at the shared setting: the tuned runs left out."""
    return Study([r for r in study.runs if grid.split(r.arm)[1] is None], study.missing)


def without_unchosen(study: Study) -> Study:
    """The study less the grid's runs at values that were not chosen (the tuning table shows them)."""
    keep = {(c.model, c.task, c.dir) for c in choices(study) if c.dir is not None}
    return Study([r for r in study.runs if grid.split(r.arm)[1] is None or (r.model, _task_dir(r), r.arm) in keep],
                 study.missing)


def values_of(found: Sequence[Choice], key: str, model: str | None = None, task: str | None = None) -> list[str]:
    """The grid's values for `key` (of one model's grids, or one (model, task)'s, when given): every value any
    arm ran, smallest first."""
    return sorted({v for c in found if c.key == key and model in (None, c.model) and task in (None, c.task)
                   for v in c.scores}, key=float)


def so_far(choice: Choice, found: Sequence[Choice]) -> str | None:
    """`'k of n'` when this grid scored fewer values than the grids of its (model, task) ran for the key (its runs
    are still going, or a value failed): its choice may still change. None when every value scored. Per (model,
    task): suites of several models share a study folder, each with its own grid, and a task's grid may be
    widened on its own (a choice at the grid's edge, docs/method.md) without making the other tasks' choices
    unfinished."""
    values = values_of(found, choice.key, choice.model, choice.task)
    k = sum(choice.scores.get(v) is not None for v in values)
    return None if k == len(values) else f"{k} of {len(values)}"


def markdown(found: Sequence[Choice]) -> list[str]:
    """The tuning table(s), one per tuned key."""
    lines: list[str] = []
    for key in sorted({c.key for c in found}):
        mine = [c for c in found if c.key == key]
        values = values_of(found, key)
        seeds = sorted({c.seed for c in mine})
        lines += ["", f"## The tuning grid: {key}", "",
                  f"Per task and arm, each value's validation score (the task's main metric on the validation split) "
                  f"on the choice seed ({', '.join(map(str, seeds))}); the chosen value in bold: the best validation "
                  "score, ties to the smaller value. The other seeds ran at the chosen value. 'shared': the arm's own "
                  "run at the suite's shared setting, on the same seed (for reference; it is not a grid value). "
                  "No test number chose anything. '-': no finished run. 'so far (k of n)': only k of the n values "
                  "the grids of its model and task ran have a finished run (the study is still running, or a value "
                  "failed), so the choice may still change. '(lowest)', '(highest)': the choice is the grid's "
                  "smallest or largest value, so a value beyond it, not tried, might score better (a wider `--tune` "
                  "grid tells).", "",
                  "| model | task | arm | metric | shared | " + " | ".join(values) + " | chosen |",
                  "|---|---|---|---|---|" + "---|" * len(values) + "---|"]
        for c in mine:
            pending = so_far(c, found)
            cells = []
            for v in values:
                score = c.scores.get(v)
                text = "-" if score is None else f"{score:.4f}"
                cells.append(f"**{text}**" if v == c.value and pending is None else text)
            shared = "-" if c.shared is None else f"{c.shared:.4f}"
            chosen = f"**{c.value or '-'}**" if pending is None else f"{c.value or '-'} so far ({pending})"
            chosen += f" ({c.edge})" if c.edge else ""
            lines.append(f"| {c.model} | {c.task} | {c.arm} | {c.metric} | {shared} | {' | '.join(cells)} | {chosen} |")
    return lines
