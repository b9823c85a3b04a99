"""`plr study --tune KEY=V1,...`: the grid on the choice seed, the choice on validation, the other seeds at
the choice, the fair study's arms, the tables (tuning, claims shared -> tuned, the method table), and
`retrain.lr` in the optimizer's groups."""

import json
import re
import time

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_module

from partial_lora.errors import PlrError
from partial_lora.pipeline.runner import run_pipeline
from partial_lora.study import Selection, execute, plan, schedule
from partial_lora.study import grid as study_grid
from partial_lora.study.plan import split_arm
from partial_lora.study.run import RESTORED, finished, resolve
from partial_lora.training import optimizer

LABELS = np.tile([0, 1], 50)  # 100 test examples
GRID = "retrain.lr=1e-2,2e-3,5e-3"


def fake(run_dir, val: float, wrong: int = 0, params: int = 100, mem: float | None = 900.0) -> int:
    """What a finished `plr train` leaves: results.json (validation and test accuracy) and the test predictions
    (wrong on the first `wrong` examples)."""
    preds = LABELS.copy()
    preds[:wrong] = 1 - preds[:wrong]
    (run_dir / "evaluate").mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"split": "test", "task": "", "index": np.arange(len(LABELS)), "label": LABELS,
                  "prediction": preds, "score": 1.0}).to_parquet(run_dir / "evaluate/predictions.parquet")
    (run_dir / "results.json").write_text(json.dumps({
        "status": "complete", "main_metric": "accuracy",
        "metrics": {"val_accuracy": val, "test_accuracy": float((preds == LABELS).mean())},
        "params": {"adapter": params}, "wall_s": {"retrain": 60.0, "evaluate": 6.0},
        "peak_memory": None if mem is None else {"mb": mem, "measure": "max_rss"}}))
    return 0


# --- the grid ---------------------------------------------------------------------------------

def test_a_grid_is_numbers_in_canonical_form_smallest_first_and_its_dirs_split_back():
    t = study_grid.parse("retrain.lr=5e-2, 2e-3,0.01")
    assert t == study_grid.Tune("retrain.lr", ("0.002", "0.01", "0.05")) and study_grid.parse("none") is None
    assert study_grid.parse("adapter.r=16,4").values == ("4", "16")
    name = study_grid.dir_name("partial@p25elem", "retrain.lr", "1e-05")
    assert name == "partial@p25elem+retrain.lr+1e-05"
    assert study_grid.split(name) == ("partial@p25elem", "retrain.lr", "1e-05")
    assert study_grid.split("lora+trainer.lr+1e+20") == ("lora", "trainer.lr",
                                                         "1e+20") and study_grid.split("lora") == ("lora", None, None)
    assert split_arm(name) == ("partial", "p25elem") and split_arm("uniform+retrain.lr+0.01") == ("uniform", None)
    # the choice: the best validation score, ties to the smaller value; a value with no score is left out
    assert study_grid.choose({"0.01": 0.8, "0.002": 0.8, "0.005": 0.7}) == "0.002"
    assert study_grid.choose({"0.05": 0.9, "0.002": 0.8,
                              "0.01": None}) == "0.05" and study_grid.choose({"0.1": None}) is None


@pytest.mark.parametrize("text, message", [
    ("retrain.lr=1e-3,abc", "'abc' is not a number"),
    ("retrain.lr=1e-3,-1e-2", "-1e-2 is not a positive learning rate"),
    ("trainer.head_lr=0,1e-3", "0 is not a positive learning rate"),
    ("retrain.lr=", "lists no value"),
    ("retrain.lr=1e-3,,2e-3", "an empty value between commas"),
    ("retrain.lr=5e-3,0.005", "0.005 is listed twice (as 5e-3 too)"),
    ("retrain.lr", "is not KEY=V1,V2,..."),
    ("seed=0,1", "the study sets seed itself"),
    ("retrain.lr=nan", "'nan' is not a number"),
])
def test_a_bad_grid_is_one_line(text, message):
    with pytest.raises(PlrError) as e:
        study_grid.parse(text)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_suites_tune_is_checked_where_the_file_is_read():
    from partial_lora.study.suite import parse

    suite = {"model": "minilm", "tasks": ["rt-polarity"], "seeds": [0, 1], "arms": ["lora"]}
    assert parse({**suite, "tune": "retrain.lr=1e-2,3e-3"},
                 "mine").tune == study_grid.Tune("retrain.lr", ("0.003", "0.01"))
    assert parse(suite, "mine").tune is None
    with pytest.raises(PlrError, match=r"suite mine.tune: retrain.lr: 'x' is not a number.*; fix the suite file"):
        parse({**suite, "tune": "retrain.lr=1e-2,x"}, "mine")


def test_a_tasks_own_tune_replaces_the_suites_grid_on_that_task_and_the_command_lines_replaces_both(tmp_path):
    """A task whose choice sat at the grid's edge gets a wider grid of its own in the suite file (the fair study's
    rule), so the one suite command reruns the study as it was run; --tune still sets every task's grid."""
    from partial_lora.study.suite import parse

    raw = {"model": "minilm", "seeds": [0, 1], "arms": ["lora"], "tune": "retrain.lr=2e-3,5e-3",
           "tasks": ["rt-polarity", {"name": "vader-tweets", "tune": "retrain.lr=1e-3,2e-3,5e-3"}, "vader-movies"]}
    suite = parse(raw, "mine")
    assert suite.task("vader-tweets").tune == study_grid.Tune("retrain.lr", ("0.001", "0.002", "0.005"))
    assert suite.task("rt-polarity").tune is None

    def grids(tune) -> dict[str, set[str]]:
        jobs = plan(tmp_path, Selection(suites=[suite], tune=tune))
        out: dict[str, set[str]] = {}
        for j in jobs:
            _, key, value = study_grid.split(j.arm)
            if key is not None and not j.waits:
                out.setdefault(j.task, set()).add(value)
            if j.waits:  # the other seed waits on its own task's grid
                assert {v for v, _ in j.grid} == out[j.task]
                assert all(study_grid.split(d.parent.name)[2] == v for v, d in j.grid)
        return out

    assert grids(True) == {"rt-polarity": {"0.002", "0.005"}, "vader-tweets": {"0.001", "0.002", "0.005"},
                           "vader-movies": {"0.002", "0.005"}}
    assert grids(study_grid.parse("retrain.lr=1e-2,2e-2")) == {t: {"0.01", "0.02"} for t in
                                                               ("rt-polarity", "vader-tweets", "vader-movies")}
    assert grids(None) == {}
    # a task's grid alone, with no suite grid: only that task is tuned
    assert grids_of_one(tmp_path, {k: v for k, v in raw.items() if k != "tune"}) == {"vader-tweets"}
    with pytest.raises(PlrError, match=r"suite mine.tasks\[1\].tune: retrain.lr: 'x' is not a number.*; fix the "
                                       r"suite file"):
        parse({**raw, "tasks": ["rt-polarity", {"name": "vader-tweets", "tune": "retrain.lr=x"}]}, "mine")
    with pytest.raises(PlrError, match=r"suite mine.tasks\[0\].tune=\[0.001\] must be a string"):
        parse({**raw, "tasks": [{"name": "vader-tweets", "tune": [1e-3]}]}, "mine")


def grids_of_one(out, raw) -> set[str]:
    from partial_lora.study.suite import parse

    jobs = plan(out, Selection(suites=[parse(raw, "mine")]))
    return {j.task for j in jobs if study_grid.split(j.arm)[1] is not None}


def test_bad_grids_and_unknown_arms_are_one_plr_error_line_each(tmp_path, capsys):
    from partial_lora.commands.study import study_command

    base = ["--suite", "fair-minilm", "--tasks", "rt-polarity", "--seeds", "0", "--out", str(tmp_path), "--dry-run"]
    for argv, message in ((["--tune", "retrain.lr=1e-3,fast"], "'fast' is not a number"),
                          (["--tune", "retrain.lr=0,1e-3"], "not a positive learning rate"),
                          (["--arms", "lora,dora"], "unknown arm 'dora'"),
                          (["--arms", "lora", "--tune", "retrain.lrr=1e-3,1e-2"],
                           "--tune retrain.lrr: retrain.lrr=0.001 does not compose for arm 'lora'")):
        with pytest.raises(SystemExit) as e:
            study_command([*base, *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.startswith("plr: error:") and err.count("\n") == 1, err
    assert not tmp_path.joinpath("runs").exists()


# --- the plan ---------------------------------------------------------------------------------

def test_the_tuning_plan_is_the_grid_on_the_choice_seed_and_the_other_seeds_waiting_on_its_choice(tmp_path):
    runs = tmp_path / "runs/minilm/rt-polarity"
    jobs = plan(tmp_path, Selection(suites=["fair-minilm"], tasks=["rt-polarity"], tune=study_grid.parse(GRID)))
    shared = [j for j in jobs if study_grid.split(j.arm)[1] is None]
    grid = [j for j in jobs if study_grid.split(j.arm)[1] and not j.waits]
    waiting = [j for j in jobs if j.waits]
    tuned = {"lora", "partial", "partial-random", "uniform", "lora-matched", "partial-r32-rank1", "lora-r1",
             "shira-random", "shira-snip", "snip-rows", "partial-snip"}  # every arm of the suite but head
    assert len(shared) == 12 * 3 and len(grid) == 11 * 3 and len(waiting) == 11 * 2 and len(jobs) == 91
    assert {study_grid.split(j.arm)[0] for j in grid} == tuned and {j.seed for j in grid} == {0}
    assert {(study_grid.split(j.arm)[0], j.seed) for j in waiting} == {(a, s) for a in tuned for s in (1, 2)}
    by = {(j.arm, j.seed): j for j in jobs}
    p = by["partial+retrain.lr+0.002", 0]
    assert p.run_dir == runs / "partial+retrain.lr+0.002/seed0" and p.overrides[-1] == "retrain.lr=0.002"
    assert f"from_run={runs}/partial/seed0" in p.overrides and p.after == (runs / "partial/seed0",)
    assert "label=partial+retrain.lr+0.002" in p.overrides
    r32 = by["partial-r32-rank1+retrain.lr+0.01", 0]  # probes itself: reuses its own shared-rate run's probe
    assert f"from_run={runs}/partial-r32-rank1/seed0" in r32.overrides
    assert r32.after == (runs / "partial-r32-rank1/seed0",)
    rand = by["partial-random+retrain.lr+0.005", 0]  # reads the untuned Partial-LoRA run, as at the shared rate
    assert [o for o in rand.overrides if o.startswith("from_run=")] == [f"from_run={runs}/partial/seed0"]
    for arm, own in (("shira-random", "adapter=shira_random"), ("shira-snip", "adapter=shira_snip"),
                     ("snip-rows", "adapter=snip")):
        for j in (by[arm, 1], by[f"{arm}+retrain.lr+0.01", 0]):
            assert own in j.overrides and f"adapter.match.run={runs}/partial/seed{j.seed}" in j.overrides
            assert j.after == (runs / f"partial/seed{j.seed}",)
    snip = by["partial-snip", 2]
    assert {f"from_run={runs}/partial/seed2", "adapter.mask.method=snip",
            "adapter.allocation.search_masks=subspace"} <= set(snip.overrides)
    assert snip.after == (runs / "partial/seed2",)
    assert not [j for j in jobs if j.arm.startswith("head+")]  # head is not tuned
    # a waiting run: its grid is the seed-0 runs of its arm; at the choice it is the grid's run at another seed
    w = by["lora+retrain.lr+{choice}", 2]
    assert w.grid == tuple((v, runs / f"lora+retrain.lr+{v}/seed0") for v in ("0.002", "0.005", "0.01"))
    at = w.at("0.005")
    assert at.run_dir == runs / "lora+retrain.lr+0.005/seed2" and not at.waits
    assert at.overrides == tuple(o.replace("seed=0", "seed=2") for o in by["lora+retrain.lr+0.005", 0].overrides)
    # --seeds narrows the seeds at the choice, never the seed that makes it: the grid and what it reads stay
    one = plan(tmp_path, Selection(suites=["fair-minilm"], tasks=["rt-polarity"], seeds=[2], arms=["partial-r32-rank1"],
                                   tune=study_grid.parse(GRID)))
    assert [(j.arm, j.seed) for j in one] == [("partial-r32-rank1", 2), ("partial-r32-rank1", 0),
                                              *(("partial-r32-rank1+retrain.lr+" + v, 0)
                                                for v in ("0.002", "0.005", "0.01")),
                                              ("partial-r32-rank1+retrain.lr+{choice}", 2)]
    # an arm's Partial-LoRA run, added because the arm reads it, is not tuned unless asked for
    only = plan(tmp_path, Selection(suites=["fair-minilm"], tasks=["rt-polarity"], seeds=[0], arms=["uniform"],
                                    tune=study_grid.parse(GRID)))
    assert [j.arm for j in only] == ["partial", "uniform",
                                     *(f"uniform+retrain.lr+{v}" for v in ("0.002", "0.005", "0.01"))]
    # the suite's tune: is the default; --tune none turns it off
    assert len(plan(tmp_path, Selection(suites=["fair-minilm"], tasks=["rt-polarity"], seeds=[0]))) == 12 + 11 * 5
    assert len(plan(tmp_path, Selection(suites=["fair-minilm"], tasks=["rt-polarity"], seeds=[0], tune=None))) == 12


def test_a_variant_goes_to_the_peer_arms_but_not_their_own_keys(tmp_path):
    runs = tmp_path / "runs/minilm/rt-polarity"
    sel = Selection(suites=["fair-minilm"], tasks=["rt-polarity"], seeds=[0], tune=None, variant="p25elem",
                    variant_overrides=["adapter.allocation.allocator=proportional", "adapter.allocation.budget=0.25",
                                       "retrain.lr_scale_per_layer=true", "adapter.mask.method=random",
                                       "adapter.mask.granularity=element"])
    by = {j.arm: set(j.overrides) for j in plan(tmp_path, sel)}
    assert {"head", "lora", "lora-r1"} <= set(by) and "partial-snip@p25elem" in by  # shared ones run once
    snip = by["partial-snip@p25elem"]  # Partial-LoRA's allocation of the variant, with SNIP rows/cols
    assert {f"from_run={runs}/partial@p25elem/seed0", "adapter.mask.method=snip",
            "++adapter.allocation.budget=0.25"} <= snip and not any("granularity" in o or "=random" in o for o in snip)
    rows = by["snip-rows@p25elem"]  # a matched control: the variant's budget, never the variant's own budget keys
    assert "adapter=snip" in rows and not any("budget" in o or "mask.method" in o for o in rows)
    for arm in ("shira-random@p25elem", "shira-snip@p25elem"):
        assert f"adapter.match.run={runs}/partial@p25elem/seed0" in by[arm]
        assert not any(o.startswith(("++adapter.mask.", "++retrain.lr_scale", "++adapter.allocation.budget"))
                       for o in by[arm])
    r32 = by["partial-r32-rank1@p25elem"]  # its own budget (a rank-1 LoRA's), the variant's reading otherwise
    assert "adapter.match.rank=1" in r32 and "++adapter.allocation.allocator=proportional" in r32
    assert not any("allocation.budget" in o for o in r32)


# --- running it -------------------------------------------------------------------------------

# Validation scores by (arm, value), and test errors that favour another value: the choice reads validation only.
VAL = {"lora": {"0.002": 0.70, "0.005": 0.80, "0.01": 0.75}, "partial": {"0.002": 0.80, "0.005": 0.80, "0.01": 0.70}}
WRONG = {"lora": {"0.002": 9, "0.005": 5, "0.01": 0}, "partial": {"0.002": 5, "0.005": 0, "0.01": 0}}


def test_the_grid_runs_on_seed_0_and_the_other_seeds_at_its_choice_made_on_validation(tmp_path, capsys):
    from partial_lora.commands.study import study_command

    sel = Selection(suites=["fair-minilm"], tasks=["rt-polarity"], arms=["head", "lora", "partial"],
                    tune=study_grid.parse(GRID))
    jobs = plan(tmp_path, sel)
    # Partial-LoRA's seed-0 run restored from the ledger (results only): the tuned runs need its probe, so it
    # runs again.
    restored = tmp_path / "runs/minilm/rt-polarity/partial/seed0"
    fake(restored, 0.7)
    (restored / RESTORED).write_text("restored\n")
    calls = []

    def runner(job):
        calls.append(job.run_dir)
        base, key, value = study_grid.split(job.arm)
        return fake(job.run_dir, VAL[base][value] if key else 0.75, WRONG[base][value] if key else 3)

    lines = []
    assert execute(jobs, runner=runner, echo=lines.append) == []
    runs = tmp_path / "runs/minilm/rt-polarity"
    assert restored in calls and not (restored / RESTORED).exists()
    assert any("restored from the ledger" in m for m in lines)
    ran = [(p.parent.name, p.name) for p in calls]
    assert len(ran) == len(set(ran)) == 9 + 6 + 4  # every run once: the chosen value's seed-0 run is not rerun
    chosen = {"lora": "0.005", "partial": "0.002"}  # best validation; partial ties 0.002 and 0.005: the smaller
    for arm, value in chosen.items():
        assert sorted(s for a, s in ran if a == f"{arm}+retrain.lr+{value}") == ["seed0", "seed1", "seed2"]
        for other in set(VAL[arm]) - {value}:
            assert [s for a, s in ran if a == f"{arm}+retrain.lr+{other}"] == ["seed0"]
        last_grid = max(ran.index((f"{arm}+retrain.lr+{v}", "seed0")) for v in VAL[arm])
        assert ran.index((f"{arm}+retrain.lr+{value}", "seed1")) > last_grid  # after the grid ended
    assert not [a for a, _ in ran if a.startswith("head+")]
    assert any("the grid chose lora+retrain.lr+0.005 for rt-polarity" in m for m in lines)
    # the same command again: everything is reused
    calls.clear()
    assert execute(jobs, runner=runner, echo=lambda m: None) == [] and calls == []
    assert resolve(next(j for j in jobs if j.waits and j.arm.startswith("lora")), complete=True).run_dir == \
        runs / "lora+retrain.lr+0.005/seed1"
    # --dry-run shows the grid, its choice, and every run reused
    argv = ["--suite", "fair-minilm", "--tasks", "rt-polarity", "--arms", "head,lora,partial", "--tune", GRID,
            "--out", str(tmp_path), "--dry-run"]
    assert study_command(argv) == 0
    out = capsys.readouterr().out
    assert "tune  minilm/rt-polarity/lora retrain.lr on seed 0 (validation): 0.002 0.7000 · 0.005 0.8000 · " \
           "0.01 0.7500 -> 0.005" in out
    assert "tune  minilm/rt-polarity/partial retrain.lr on seed 0 (validation): 0.002 0.8000 · 0.005 0.8000 · " \
           "0.01 0.7000 -> 0.002 (the grid's lowest value: widen the grid below it)" in out
    assert "19 runs planned (9 at the shared setting, 6 on the tuning grid, 4 at the grid's choice), 19 finished " \
           "already" in out
    assert "reuse plr train" in out and "wait " not in out and f"run_dir={runs}/lora+retrain.lr+0.005/seed2" in out


def test_a_failed_grid_value_is_left_out_of_the_choice(tmp_path):
    jobs = plan(tmp_path, Selection(suites=["fair-minilm"], tasks=["rt-polarity"], seeds=[0, 1], arms=["lora"],
                                    tune=study_grid.parse("retrain.lr=2e-3,5e-2")))

    def runner(job):
        if job.arm == "lora+retrain.lr+0.05":
            return 1  # diverged: no results
        return fake(job.run_dir, 0.6)

    failed = execute(jobs, runner=runner, echo=lambda m: None)
    assert [f.job.arm for f in failed] == ["lora+retrain.lr+0.05"]
    assert finished(tmp_path / "runs/minilm/rt-polarity/lora+retrain.lr+0.002/seed1") is not None
    none = plan(tmp_path / "b", Selection(suites=["fair-minilm"], tasks=["rt-polarity"], seeds=[0, 1], arms=["lora"],
                                          tune=study_grid.parse("retrain.lr=2e-3,5e-2")))
    failed = execute(none, runner=lambda j: 1 if "+" in j.arm else fake(j.run_dir, 0.6), echo=lambda m: None)
    assert [f.why for f in failed][-1] == "skipped: no run of its tuning grid finished"


class _Slow:
    """A launcher whose runs take `polls[(task, value)]` polls each (1 by default), then leave a finished run."""

    def __init__(self, polls):
        self.polls, self.started, self.running = polls, [], set()

    def start(self, job, slot):
        self.started.append((job.task, job.arm, job.seed, tuple(sorted(self.running))))
        launcher = self

        class Handle:
            left = self.polls.get((job.task, study_grid.split(job.arm)[2]), 1)

            def poll(self):
                self.left -= 1
                if self.left > 0:
                    return None
                launcher.running.discard((job.task, job.arm))
                base, key, value = study_grid.split(job.arm)
                return fake(job.run_dir, {"0.002": 0.6, "0.01": 0.7}.get(value, 0.5))

            def stop(self):
                pass

        self.running.add((job.task, job.arm))
        return Handle()


def test_a_grids_other_seeds_start_as_soon_as_it_ends_while_another_grid_still_runs(tmp_path):
    jobs = plan(tmp_path, Selection(suites=["fair-minilm"], tasks=["rt-polarity", "vader-movies"], seeds=[0, 1],
                                    arms=["lora"], tune=study_grid.parse("retrain.lr=2e-3,1e-2")))
    for j in jobs:
        if study_grid.split(j.arm)[1] is None:
            fake(j.run_dir, 0.5)  # the shared-rate runs finished before
    launcher = _Slow({("vader-movies", "0.002"): 5, ("vader-movies", "0.01"): 60})
    failed = schedule.run([j for j in jobs if finished(j.run_dir) is None], launcher, schedule.cpu_slots(2, total=2),
                          ok=lambda j: finished(j.run_dir) is not None, ready=lambda d: finished(d) is not None,
                          echo=lambda m: None, poll_s=0.0, resolve=resolve)
    assert failed == []
    order = [s[:3] for s in launcher.started]
    start = launcher.started[order.index(("rt-polarity", "lora+retrain.lr+0.01", 1))]
    assert ("vader-movies", "lora+retrain.lr+0.01") in start[3]  # the other grid was still running
    assert order[-1] == ("vader-movies", "lora+retrain.lr+0.01", 1) and len(order) == 6


# --- the tables -------------------------------------------------------------------------------

def test_the_tables_show_the_grid_each_claim_shared_to_tuned_and_the_method_table(tmp_path):
    """A small study restored from fake runs: at the shared rate Partial-LoRA is 5 points below dense LoRA on
    both tasks; each at its tuned rate they are equal."""
    from partial_lora.study import write

    sel = Selection(suites=["fair-minilm"], tasks=["rt-polarity", "vader-tweets"], seeds=[0, 1],
                    arms=["head", "lora", "partial", "lora-matched"], tune=study_grid.parse("retrain.lr=2e-3,1e-2"))
    jobs = plan(tmp_path, sel)
    shared = {"head": 30, "lora": 5, "partial": 10, "lora-matched": 12}  # test errors at the shared rate ...
    tuned = {"lora": 5, "partial": 5, "lora-matched": 9}                # ... and at the chosen one, 0.01
    params = {"head": 0, "lora": 1000, "partial": 200, "lora-matched": 250}
    for j in (j.at("0.01") if j.waits else j for j in jobs):
        base, _, value = study_grid.split(j.arm)
        val, wrong = {None: (0.75, shared[base]), "0.002": (0.7, shared[base]), "0.01": (0.8, tuned.get(base))}[value]
        fake(j.run_dir, val, wrong, params=params[base], mem=800 + 10 * len(base))
    for arm, wrong in (("lora", 5), ("partial", 10)):  # another model of the folder, with no grid: no tuned rows
        for seed in (0, 1):
            fake(tmp_path / f"runs/dinov2-vits/mnist-5k/{arm}/seed{seed}", 0.75, wrong, params=params[arm])
    paths = write(tmp_path, n_boot=200)
    assert [p.name for p in paths] == ["study.md", "study.csv", "study.png", "method-table.md"]
    md = (tmp_path / "study.md").read_text()
    assert "| minilm | rt-polarity | partial | accuracy | 0.7500 | 0.7000 | **0.8000** | **0.01** (highest) |" in md
    num = r"[+-]\d+\.\d\d"
    assert re.search(rf"\| C3 \| minilm \| rt-polarity \| partial − lora \| matches \| -5\.00 \[{num}, {num}\] \| "
                     r"\+0\.00 \[\+0\.00, \+0\.00\] \| refuted → \*\*holds\*\* \| 0\.01 / 0\.01 \|", md)
    assert re.search(rf"\| R \| minilm \| pooled \| partial − lora-matched \| beats \| \+2\.00 \[{num}, {num}\] \| "
                     rf"\+4\.00 \[{num}, {num}\] \| holds → \*\*holds\*\* \| - \|", md)
    assert "## The default rule, each arm at its tuned retrain.lr" in md
    assert "| C3 | dinov2-vits | mnist-5k | partial − lora | matches | -5.00" in md  # at the shared rate only:
    assert "dinov2-vits" not in md.split("## Claims: shared setting")[1].split("## The method table")[0]
    assert "| minilm | partial | vader-tweets | 80.0% | +0.00 | +4.00 | yes | yes | yes | **yes** |" in md
    # every arm: the shared runs and the chosen value's, not the values the grid passed over
    assert "| partial+retrain.lr+0.01 |" in md and "partial+retrain.lr+0.002 |" not in md.split("## Claims")[0]
    table = (tmp_path / "method-table.md").read_text()
    assert all(line in md for line in table.splitlines() if line.startswith("| minilm"))  # the same table
    assert "| minilm | partial | 2 (2+ seeds) | 0.01 | 200 | 0.9500 (accuracy) | +0.00 | [+0.00, +0.00] | holds | " \
           "1.1 min | 870 MB |" in table
    assert "| minilm | lora | 2 (2+ seeds) | 0.01 | 1,000 | 0.9500 (accuracy) | - | - | - | 1.1 min | 840 MB |" in table
    assert "| minilm | head | 2 (2+ seeds) | shared | 0 | 0.7000 (accuracy) | -25.00 |" in table
    assert "| minilm | lora-matched | 2 (2+ seeds) | 0.01 | 250 | 0.9100 (accuracy) | -4.00 |" in table
    rows = pd.read_csv(tmp_path / "study.csv")
    assert set(rows[rows["kind"] == "claim tuned retrain.lr"]["model"]) == {"minilm"}
    tune = rows[rows["kind"] == "tune retrain.lr"]
    assert len(tune) == 2 * 3 * 2 and set(tune[tune["verdict"] == "chosen"]["arm_or_claim"]) == {
        "lora retrain.lr=0.01", "partial retrain.lr=0.01", "lora-matched retrain.lr=0.01"}


def test_a_grid_still_running_shows_its_choice_as_so_far_not_as_chosen():
    """Mid-study, `--tables-only` reads the grids as they stand: a (task, arm) whose grid has not scored every value
    the study's grids hold is not shown (or written to study.csv) as chosen."""
    from partial_lora.study.choice import Choice, markdown, so_far, values_of

    done = Choice("m", "t", "lora", "retrain.lr", 0, "accuracy", {"0.002": 0.7, "0.01": 0.8}, 0.75, "0.01")
    going = Choice("m", "t", "partial", "retrain.lr", 0, "accuracy", {"0.002": 0.9}, 0.75, "0.002")
    # another model in the same study folder, with a grid of its own: finished, and not judged on m's values
    other = Choice("v", "t", "lora", "retrain.lr", 0, "accuracy", {"0.0004": 0.6, "0.001": 0.7}, 0.7, "0.001")
    found = [done, going, other]
    assert values_of(found, "retrain.lr", "m") == ["0.002", "0.01"]
    assert values_of(found, "retrain.lr") == ["0.0004", "0.001", "0.002", "0.01"]
    assert so_far(done, found) is None and so_far(going, found) == "1 of 2" and so_far(other, found) is None
    # a task whose grid was widened on its own (a choice at the edge) leaves the model's other tasks finished
    wide = Choice("m", "u", "lora", "retrain.lr", 0, "accuracy", {"0.002": 0.7, "0.01": 0.8, "0.02": 0.9}, 0.7, "0.02")
    narrow = Choice("m", "u", "partial", "retrain.lr", 0, "accuracy", {"0.002": 0.7, "0.01": 0.8}, 0.7, "0.01")
    assert values_of([*found, wide, narrow], "retrain.lr", "m", "u") == ["0.002", "0.01", "0.02"]
    assert so_far(done, [*found, wide, narrow]) is None and so_far(narrow, [*found, wide, narrow]) == "2 of 3"
    md = "\n".join(markdown(found))
    assert "| v | t | lora | accuracy | 0.7000 | 0.6000 | **0.7000** | - | - | **0.001** (highest) |" in md
    assert "| m | t | lora | accuracy | 0.7500 | - | - | 0.7000 | **0.8000** | **0.01** (highest) |" in md
    assert "| m | t | partial | accuracy | 0.7500 | - | - | 0.9000 | - | 0.002 so far (1 of 2) |" in md


def test_a_choice_at_the_grids_edge_says_so():
    """A value beyond the grid was not tried: a choice at its smallest or largest value is marked, one inside it
    is not, and neither is a one-value grid (it has no inside)."""
    from partial_lora.study.choice import Choice, markdown

    def at(value: str, scores: dict[str, float | None]) -> Choice:
        return Choice("m", "t", f"a{value}", "retrain.lr", 0, "accuracy", scores, None, value)

    grid = {"0.002": 0.7, "0.005": 0.8, "0.01": 0.6}
    assert at("0.002", grid).edge == "lowest" and at("0.01", grid).edge == "highest"
    assert at("0.005", grid).edge is None and at("0.002", {"0.002": 0.7}).edge is None
    # a value whose run failed is still part of the grid: the choice below it is not at the top
    assert at("0.005", {**grid, "0.01": None}).edge is None
    md = "\n".join(markdown([at("0.002", grid), at("0.005", grid)]))
    assert "| **0.002** (lowest) |" in md and "| **0.005** |" in md and "(highest)" not in md.split("|---|")[-1]


# --- retrain.lr -------------------------------------------------------------------------------

FAST = ["experiment=smoke", "trainer.max_steps=1", "trainer.head_lr=0.004"]


def _groups(tmp_path, monkeypatch, *overrides):
    """The retrain's AdamW groups (name -> learning rate) of a tiny run, and its results."""
    seen = []
    real = optimizer.optimizer_groups

    def spy(model, cfg, scales=None):
        groups = real(model, cfg, scales)
        seen.append({g["name"]: g["lr"] for g in groups})
        return groups

    monkeypatch.setattr(optimizer, "optimizer_groups", spy)
    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        cfg = compose("config", overrides=[*FAST, *overrides])
    results = run_pipeline(cfg, tmp_path / f"run{time.monotonic_ns()}", echo=lambda s: None)
    return seen[-1], results


def test_retrain_lr_is_the_adapters_rate_for_every_adapter_kind_and_the_head_keeps_its_own(tmp_path, monkeypatch):
    from partial_lora.training.recipe import lr_scale_auto

    shared, res = _groups(tmp_path, monkeypatch, "adapter.sparsity=0.75")  # auto: 5e-3 x 1/sqrt(density)
    density = res["stages"]["retrain"]["density"]
    assert shared == {f"adapter x{1:g}": pytest.approx(5e-3 * lr_scale_auto(density, 8.0)), "head": 0.004}
    assert res["peak_memory"]["measure"] == "max_rss" and res["peak_memory"]["mb"] > 100  # the process, model included
    for overrides in (["adapter.sparsity=0.75", "retrain.lr_scale_per_layer=true"], ["adapter=lora"],
                      ["adapter=peft_lora"], ["adapter=shira_random", "adapter.match.budget=300"]):
        groups, res = _groups(tmp_path, monkeypatch, *overrides, "retrain.lr=0.03")
        assert groups == {"adapter x1": 0.03, "head": 0.004}, overrides  # one adapter group at retrain.lr, scale gone
        assert res["stages"]["retrain"]["adapter_lr"] == 0.03 and res["stages"]["retrain"]["adapter_lr_scale"] == 1.0
    head, _ = _groups(tmp_path, monkeypatch, "adapter=head", "retrain.lr=0.03")
    assert head == {"head": 0.004}
    with initialize_config_module("partial_lora.conf", version_base="1.3"):
        from partial_lora.config import validate

        with pytest.raises(PlrError, match="retrain.lr must be a positive learning rate"):
            validate(compose("config", overrides=["retrain.lr=0"]))


def test_a_study_restored_from_the_ledger_whole_reruns_nothing(tmp_path):
    """After the fair study, its runs merged into the ledger and restored (slim dirs, no probe): the same command
    finds every run, the tuned ones too, and materialises nothing."""
    jobs = plan(tmp_path, Selection(suites=["fair-minilm"], tasks=["rt-polarity"], seeds=[0, 1], arms=["partial"],
                                    tune=study_grid.parse("retrain.lr=2e-3,1e-2")))
    for j in (j.at("0.01") if j.waits else j for j in jobs):
        fake(j.run_dir, 0.8 if j.arm.endswith("0.01") else 0.7)
        (j.run_dir / RESTORED).write_text("restored\n")
    calls = []
    assert execute(jobs, runner=lambda j: calls.append(j) or 0, echo=lambda m: None) == [] and calls == []
    assert all((j.run_dir / RESTORED).exists() for j in jobs if not j.waits)
