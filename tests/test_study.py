"""`plr study`: the plan, resuming, the paired bootstrap, the verdict rule, predictions.parquet."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from partial_lora.errors import PlrError
from partial_lora.study import Selection, execute, plan, stats
from partial_lora.study.claims import CLAIMS, ClaimRow, arm_rows, claim_rows, collect, markdown
from partial_lora.study.rule import markdown as rule_markdown
from partial_lora.study.rule import rule_rows

ROOT = Path(__file__).resolve().parents[1]


# --- the bootstrap and the verdict ----------------------------------------------------------

def constructed(n: int, extra_right: int, seed: int = 0) -> stats.Paired:
    """Method and control agree except on `extra_right` examples, where only the method is right."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    control = np.where(rng.random(n) < 0.8, labels, 1 - labels)
    method = control.copy()
    wrong = np.flatnonzero(control != labels)[:extra_right]
    method[wrong] = labels[wrong]
    return stats.Paired(labels, method, control)


def test_the_point_estimate_is_the_mean_of_per_seed_differences():
    # Seeds with 2, 4 and 6 points of advantage on 500 examples (10, 20, 30 flipped examples).
    pairs = {s: constructed(500, k, seed=s) for s, k in zip((0, 1, 2), (10, 20, 30))}
    comp = stats.compare([pairs], ["accuracy"], n_boot=1000)
    assert comp.per_seed == pytest.approx((2.0, 4.0, 6.0))
    assert comp.mean == pytest.approx(4.0) and comp.seeds == (0, 1, 2)
    # Resampling seeds spans (roughly) their range; examples add a little on top.
    assert 1.0 < comp.low < 3.5 and 4.5 < comp.high < 7.0


def test_the_ci_covers_a_known_zero_and_shrinks_with_more_examples():
    rng = np.random.default_rng(1)

    def noisy(n):  # method and control each right 80% of the time, independently: no true difference
        labels = rng.integers(0, 2, n)
        flip = lambda: np.where(rng.random(n) < 0.8, labels, 1 - labels)  # noqa: E731
        return stats.Paired(labels, flip(), flip())

    small = stats.compare([{0: noisy(200), 1: noisy(200)}], ["accuracy"], n_boot=1000)
    large = stats.compare([{0: noisy(5000), 1: noisy(5000)}], ["accuracy"], n_boot=1000)
    assert small.low < 0 < small.high and large.low < 0 < large.high
    assert (large.high - large.low) < 0.5 * (small.high - small.low)
    data = [{0: noisy(200)}]
    assert stats.compare(data, ["accuracy"], n_boot=500,
                         seed=3) == stats.compare(data, ["accuracy"], n_boot=500, seed=3)


def test_pooled_comparisons_average_tasks_and_regression_uses_correlation():
    cls = {0: constructed(400, 8), 1: constructed(400, 8, seed=1)}  # +2 points each seed
    x = np.linspace(-1, 1, 300)
    reg = {0: stats.Paired(x, x, x + np.random.default_rng(0).normal(0, 1, 300)),  # method perfect
           1: stats.Paired(x, x, x + np.random.default_rng(1).normal(0, 1, 300))}
    r_one = stats.compare([reg], ["pearson"], n_boot=500)
    assert r_one.mean > 30 and r_one.low > 0  # Pearson 1.0 against a noisy ~0.5
    pooled = stats.compare([cls, reg], ["accuracy", "pearson"], n_boot=500)
    assert pooled.mean == pytest.approx((2.0 + r_one.mean) / 2)
    assert pooled.per_seed == pytest.approx(tuple((2.0 + d) / 2 for d in r_one.per_seed))


@pytest.mark.parametrize("low, high, kind, expected", [
    (-0.99, 3.0, "matches", "holds"),
    (-1.0, 3.0, "matches", "inconclusive"),   # touching the margin does not clear it
    (-3.0, -1.0, "matches", "inconclusive"),
    (-3.0, -1.01, "matches", "refuted"),
    (0.01, 2.0, "beats", "holds"),
    (0.0, 2.0, "beats", "inconclusive"),
    (-2.0, 0.0, "beats", "inconclusive"),
    (-2.0, -0.01, "beats", "refuted"),
])
def test_the_verdict_rule_at_its_edges(low, high, kind, expected):
    assert stats.verdict(low, high, kind) == expected


def test_the_default_rule_at_its_edges():
    """(i) >= 60% fewer parameters, (ii) C3 >= -1 point, (iii) R >= 0, each at its edge; unmeasured is not met."""
    def row(key: str, task: str, mean: float, reduction: float | None, method: str = "partial") -> ClaimRow:
        claim = next(c for c in CLAIMS if c.key == key)
        claim = type(claim)(claim.key, claim.text, method, claim.control, claim.kind)
        return ClaimRow(claim, task, "minilm", stats.Comparison(mean, (mean,), mean - 1, mean + 1, (0,)), 1.0, 1.0,
                        reduction)
    rows = [row("C3", "a", -1.0, 60.0), row("R", "a", 0.0, 60.0),          # every check at its edge: met
            row("C3", "b", -1.01, 80.0), row("R", "b", 2.0, 80.0),         # (ii) just fails
            row("C3", "c", 0.5, 59.9), row("R", "c", 1.0, 59.9),           # (i) just fails
            row("C3", "d", 0.5, 70.0), row("R", "d", -0.01, 70.0),         # (iii) just fails
            row("C3", "e", 0.5, 70.0),                                      # R not run: unknown
            row("C3", "pooled", 0.0, 70.0), row("C1", "a", 0.0, 70.0),     # neither counts
            row("C3", "a", -3.0, 90.0, method="partial@v"), row("R", "a", 1.0, 90.0, method="partial@v")]
    rules = {(r.reading, r.task): r for r in rule_rows(rows)}
    assert set(rules) == {("partial", t) for t in "abcde"} | {("partial@v", "a")}
    assert [rules["partial", t].meets for t in "abcde"] == [True, False, False, False, None]
    assert rules["partial", "b"].checks == (True, False, True) and rules["partial", "e"].checks == (True, True, None)
    assert rules["partial@v", "a"].checks == (True, False, True)
    md = "\n".join(rule_markdown(rule_rows(rows)))
    assert "## The default rule" in md and "| minilm | partial | 5 | 1 (a) |" in md
    assert "| minilm | partial@v | 1 | 0 |" in md


def test_bad_comparisons_are_one_line():
    with pytest.raises(PlrError, match="same non-empty test set"):
        stats.Paired(np.zeros(3), np.zeros(2), np.zeros(3))
    with pytest.raises(PlrError, match="at least one seed"):
        stats.compare([{}], ["accuracy"])
    with pytest.raises(PlrError, match="unknown claim kind"):
        stats.verdict(0, 1, "equals")
    with pytest.raises(PlrError, match="no paired bootstrap for metric 'bleu'"):
        stats.metric_fn("bleu")


# --- the plan -------------------------------------------------------------------------------

def test_the_default_plan_covers_every_task_seed_and_arm(tmp_path):
    jobs = plan(tmp_path, Selection())
    minilm = [j for j in jobs if j.model == "minilm"]
    assert len(minilm) == 6 * 3 * 9 and {j.task for j in minilm} == {
        "bbc-news", "rt-polarity", "vader-movies", "vader-movies-score", "vader-tweets", "debates-speaker"}
    gemma = [j for j in jobs if j.model == "gemma3-270m"]
    assert {j.task for j in gemma} == {"rt-polarity"} and {j.seed for j in gemma} == {0, 1} and len(gemma) == 10
    for j in jobs:  # every arm that reads Partial-LoRA's run comes after it
        for after in j.after:
            assert jobs.index(next(k for k in jobs if k.run_dir == after)) < jobs.index(j)
    rand = next(j for j in jobs if j.arm == "partial-random" and j.task == "rt-polarity" and j.seed == 1)
    assert f"from_run={tmp_path}/runs/minilm/rt-polarity/partial/seed1" in rand.overrides
    assert "adapter.mask.method=random" in rand.overrides and "experiment=offline-minilm" in rand.overrides
    lm = next(j for j in jobs if j.arm == "lora-matched" and j.task == "bbc-news")
    assert "experiment=offline-minilm" not in lm.overrides  # BBC keeps the demo's recipe
    assert f"adapter.match.run={tmp_path}/runs/minilm/bbc-news/partial/seed0" in lm.overrides
    r32 = next(j for j in jobs if j.arm == "partial-r32-rank1").overrides
    assert "adapter.r=32" in r32 and "adapter.match.rank=1" in r32


def test_narrowing_adds_the_partial_run_an_arm_reads_and_refuses_unknown_names(tmp_path):
    jobs = plan(tmp_path, Selection(suites=["minilm"], tasks=["rt-polarity"], seeds=[2], arms=["uniform"],
                                    extra=["trainer.device=cpu"]))
    assert [j.arm for j in jobs] == ["partial", "uniform"]
    assert all(j.overrides[-1] == "trainer.device=cpu" and "seed=2" in j.overrides for j in jobs)
    for sel, message in ((Selection(suites=["bert"]), "unknown suite 'bert'"),
                         (Selection(arms=["lora", "dora"]), "unknown arm 'dora'"),
                         (Selection(suites=["gemma3-270m"], tasks=["vader-tweets"]), "unknown task of the gemma3-270m"),
                         (Selection(seeds=[-1]), "--seeds must be >= 0")):
        with pytest.raises(PlrError, match=message):
            plan(tmp_path, sel)
    # --tasks without --suite keeps each suite's own tasks: Gemma has no vader-tweets part.
    assert {j.model for j in plan(tmp_path, Selection(tasks=["vader-tweets"]))} == {"minilm"}


def fake_run(job, value: float, labels=None, preds=None) -> int:
    """Write what a finished `plr train` leaves: results.json and evaluate/predictions.parquet."""
    labels = np.array([0, 1, 1, 0, 1, 0, 1, 1]) if labels is None else labels
    preds = labels if preds is None else preds
    (job.run_dir / "evaluate").mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"split": "test", "task": "", "index": np.arange(len(labels)), "label": labels,
                  "prediction": preds, "score": 1.0}).to_parquet(job.run_dir / "evaluate/predictions.parquet")
    (job.run_dir / "results.json").write_text(json.dumps({
        "status": "complete", "main_metric": "accuracy", "metrics": {"test_accuracy": value},
        "params": {"adapter": 100 if job.arm != "lora" else 1000}, "wall_s": {"retrain": 1.0}}))
    return 0


def test_execute_reuses_finished_runs_resumes_unfinished_ones_and_skips_orphans(tmp_path):
    jobs = plan(tmp_path, Selection(suites=["minilm"], tasks=["rt-polarity"], seeds=[0], arms=["lora", "uniform"]))
    calls = []

    def runner(job):
        calls.append(job.arm)
        return fake_run(job, 0.8)

    assert execute(jobs, runner=runner, echo=lambda m: None) == []
    assert sorted(calls) == ["lora", "partial", "uniform"]
    calls.clear()
    assert execute(jobs, runner=runner, echo=lambda m: None) == []
    assert calls == []  # everything finished: nothing reruns
    (jobs[0].run_dir / "results.json").write_text(json.dumps({"status": "incomplete"}))  # a killed run
    execute(jobs, runner=runner, echo=lambda m: None)
    assert calls == [jobs[0].arm]  # only that one reruns (plr train resumes it from its checkpoint)

    # A run finished before evaluate wrote predictions: its evaluate stage is marked to run again.
    (jobs[1].run_dir / "evaluate/predictions.parquet").unlink()
    (jobs[1].run_dir / "evaluate/done").write_text("")
    seen = []

    def watching(job):
        seen.append((job.arm, (job.run_dir / "evaluate/done").exists()))
        return fake_run(job, 0.8)

    execute(jobs, runner=watching, echo=lambda m: None)
    assert seen == [(jobs[1].arm, False)]

    other = plan(tmp_path / "b", Selection(suites=["minilm"], tasks=["rt-polarity"], seeds=[0], arms=["uniform"]))
    failed = execute(other, runner=lambda job: 1, echo=lambda m: None)
    assert [f.job.arm for f in failed] == ["partial", "uniform"]  # partial failed; uniform, which reads it, skipped
    assert failed[0].why == "exit 1" and failed[1].why.startswith("skipped")


def test_claims_pair_runs_example_by_example(tmp_path):
    jobs = plan(tmp_path, Selection(suites=["minilm"], tasks=["rt-polarity", "vader-tweets"], seeds=[0, 1],
                                    arms=["lora", "partial", "partial-random"]))
    labels = np.tile([0, 1], 50)
    for j in jobs:
        preds = labels.copy()
        if j.arm == "partial":
            preds[:5] = 1 - preds[:5]  # 5 points below the others
        fake_run(j, float((preds == labels).mean()), labels, preds)
    study = collect(tmp_path)
    rows = {(r.claim.key, r.task): r for r in claim_rows(study, n_boot=200)}
    c3 = rows["C3", "rt-polarity"]
    assert c3.comparison.mean == pytest.approx(-5.0) and c3.comparison.per_seed == pytest.approx((-5.0, -5.0))
    assert c3.verdict == "refuted" and c3.reduction_pct == pytest.approx(90.0)
    assert rows["C1", "pooled"].comparison.mean == pytest.approx(0.0)
    assert ("C5", "rt-polarity") not in rows  # arms not run: no row
    assert {c.key for c in CLAIMS} >= {"C1", "C2a", "C2b", "C3", "C5", "R"}
    arms = {(a["task"], a["arm"]): a for a in arm_rows(study)}
    assert arms["rt-polarity", "partial"]["mean"] == pytest.approx(0.95) and arms["rt-polarity", "partial"]["std"] == 0
    one = collect(tmp_path)
    one.runs = [r for r in one.runs if r.seed == 0]  # one seed: no spread, shown as no "±" rather than "± 0.0000"
    row = next(a for a in arm_rows(one) if a["task"] == "rt-polarity" and a["arm"] == "lora")
    assert row["std"] is None and "| lora | 1.0000 | 0 |" in markdown(one, [], arm_rows(one))


def test_compare_pairs_any_two_arms_and_refuses_unknown_or_disjoint_ones(tmp_path, capsys):
    """`plr study --compare A B`: two readings paired example by example, per task and pooled, with both
    verdicts; a typo or two arms with no task and seed in common is one line."""
    from partial_lora.commands.study import study_command

    base = plan(tmp_path, Selection(suites=["minilm"], tasks=["rt-polarity", "vader-tweets"], seeds=[0, 1],
                                    arms=["partial"]))
    var = plan(tmp_path, Selection(suites=["minilm"], tasks=["rt-polarity", "vader-tweets"], seeds=[0, 1],
                                   arms=["partial"], variant="a", variant_overrides=["adapter.allocation.tau=0.8"]))
    labels = np.tile([0, 1], 50)
    for j in base + var:
        preds = labels.copy()
        if j.arm == "partial":
            preds[:3] = 1 - preds[:3]  # the variant is 3 points above the default reading
        fake_run(j, float((preds == labels).mean()), labels, preds)
    other = plan(tmp_path, Selection(suites=["minilm"], tasks=["vader-movies"], seeds=[0], arms=["lora"]))
    fake_run(other[0], 1.0, labels)
    assert study_command(["--out", str(tmp_path), "--compare", "partial@a", "partial", "--bootstrap", "200"]) == 0
    out = capsys.readouterr().out
    assert "| minilm | rt-polarity | partial@a − partial | +3.00 | +3.00, +3.00 |" in out
    assert "| minilm | pooled | partial@a − partial | +3.00 |" in out and out.count("| holds | holds |") == 3
    assert not (tmp_path / "study.md").exists()  # runs nothing, writes nothing
    # --tasks and --seeds narrow the pairs: one task, one seed, so no pooled row
    assert study_command(["--out", str(tmp_path), "--compare", "partial@a", "partial", "--tasks", "vader-tweets",
                          "--seeds", "1", "--bootstrap", "200"]) == 0
    out = capsys.readouterr().out
    assert "| minilm | vader-tweets | partial@a − partial | +3.00 | +3.00 |" in out
    assert "rt-polarity" not in out and "pooled" not in out
    for pair, msg in ((["partial@b", "partial"], "no finished run of arm 'partial@b'"),
                      (["lora", "partial"], "no task and seed in common")):
        with pytest.raises(SystemExit) as e:
            study_command(["--out", str(tmp_path), "--compare", *pair])
        assert e.value.code == 2 and msg in capsys.readouterr().err


def test_plr_study_end_to_end_on_a_tiny_model(tmp_path):
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "partial_lora.cli", "study", "--model", "minilm", "--tasks", "bbc-news",
           "--seeds", "0", "--arms", "lora,partial", "--bootstrap", "200", "--out", str(out), "--",
           "experiment=smoke", "model=tiny-bert"]  # another model than the suite's: its own <model> folder
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    md = (out / "study.md").read_text()
    assert "| C3 | tiny-bert | bbc-news | partial − lora | matches |" in md
    assert "| C2b |" not in md  # partial-random was not run: no row for the claims that need it
    assert (out / "study.csv").exists() and (out / "study.png").stat().st_size > 1000
    # the search's signal: only the partial arm searched; its row is read from its own run dir
    alloc = json.loads((out / "runs/tiny-bert/bbc-news/partial/seed0/allocate/allocation.json").read_text())
    probe = json.loads((out / "runs/tiny-bert/bbc-news/partial/seed0/probe/metrics.json").read_text())
    floor = sum(la["ratio"] <= min(alloc["grid"]) for la in alloc["layers"])
    gain = (alloc["a_ref"] - alloc["a_0"]) * probe["val_examples"]
    assert "## The allocation search's signal" in md and "| tiny-bert | bbc-news | lora | 0 |" not in md
    assert (f"| tiny-bert | bbc-news | partial | 0 | threshold | {probe['val_examples']} | {alloc['a_ref']:.3f} | "
            f"{alloc['a_0']:.3f} | {gain:.1f} | {alloc['target']:.3f} | {alloc['joint_accuracy']:.3f} | "
            f"{floor} of {len(alloc['layers'])} |") in md
    for arm in ("partial", "lora"):
        run = out / "runs/tiny-bert/bbc-news" / arm / "seed0"
        results = json.loads((run / "results.json").read_text())
        pred = pd.read_parquet(run / "evaluate/predictions.parquet")
        for split in ("val", "test"):
            part = pred[pred["split"] == split]
            assert len(part) == (results["stages"]["evaluate"]["test_examples"] if split == "test" else len(part))
            assert (part["label"]
                    == part["prediction"]).mean() == pytest.approx(results["metrics"][f"{split}_accuracy"])
            assert part["score"].between(0, 1).all() and (part["index"].to_numpy() == np.arange(len(part))).all()
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0 and "2 finished already, 0 to run" in again.stdout


def test_a_variant_runs_its_own_partial_family_and_shares_the_rest(tmp_path):
    base = plan(tmp_path, Selection(suites=["minilm"], tasks=["rt-polarity"], seeds=[0], arms=["lora", "partial"]))
    for j in base:
        fake_run(j, 0.8)
    (base[0].run_dir / "probe").mkdir()
    (base[0].run_dir / "probe" / "done").write_text("")
    sel = Selection(suites=["minilm"], tasks=["rt-polarity"], seeds=[0], arms=["lora", "partial", "uniform"],
                    variant="gain", variant_overrides=["adapter.allocation.relative_to=gain"])
    jobs = {j.arm: j for j in plan(tmp_path, sel)}
    assert set(jobs) == {"lora", "partial@gain", "uniform@gain"}
    assert jobs["lora"].run_dir == next(j for j in base if j.arm == "lora").run_dir  # shared, not rerun
    assert "adapter.allocation.relative_to=gain" not in jobs["lora"].overrides
    p = jobs["partial@gain"]
    assert p.run_dir.name == "seed0" and p.run_dir.parent.name == "partial@gain" and "label=partial@gain" in p.overrides
    assert "adapter.allocation.relative_to=gain" in p.overrides
    assert f"from_run={tmp_path}/runs/minilm/rt-polarity/partial/seed0" in p.overrides  # the default's probe
    assert jobs["uniform@gain"].after == (p.run_dir,)  # matched to the variant's own budget
    assert f"adapter.match.run={p.run_dir}" in jobs["uniform@gain"].overrides
    assert "++adapter.allocation.relative_to=gain" in jobs["uniform@gain"].overrides  # added where absent
    labels = np.tile([0, 1], 50)
    for arm, wrong in (("partial@gain", 0), ("uniform@gain", 3)):
        preds = labels.copy()
        preds[:wrong] = 1 - preds[:wrong]
        fake_run(jobs[arm], float((preds == labels).mean()), labels, preds)
    for j in base:
        fake_run(j, 0.95 if j.arm == "lora" else 0.9, labels, labels)
    rows = {(r.claim.key, r.claim.method, r.claim.control) for r in claim_rows(collect(tmp_path), n_boot=100)}
    assert ("C2a", "partial@gain", "uniform@gain") in rows and ("C3", "partial@gain", "lora") in rows
    assert ("C3", "partial", "lora") in rows  # the default reading keeps its rows
    arms = [a["arm"] for a in arm_rows(collect(tmp_path))]
    assert arms == ["lora", "partial", "partial@gain", "uniform@gain"]
    # a variant that sets its own budget: the matched controls match its run, not the budget (two budgets refuse)
    prop = Selection(suites=["minilm"], tasks=["rt-polarity"], seeds=[0], arms=["uniform", "lora-matched"],
                     variant="prop", variant_overrides=["adapter.allocation.allocator=proportional",
                                                        "adapter.allocation.budget=0.25", "+adapter.match.rank=2"])
    pj = {j.arm: j for j in plan(tmp_path, prop)}
    assert "adapter.allocation.budget=0.25" in pj["partial@prop"].overrides
    for arm in ("uniform@prop", "lora-matched@prop"):
        assert f"adapter.match.run={pj['partial@prop'].run_dir}" in pj[arm].overrides
        assert "++adapter.allocation.allocator=proportional" in pj[arm].overrides
        assert not [o for o in pj[arm].overrides if "budget" in o or "match.rank" in o]
    for bad, message in ((Selection(variant="Gain!", variant_overrides=["a=1"]), "--variant 'Gain!' must be"),
                         (Selection(variant="gain"), "needs its overrides"),
                         (Selection(variant_overrides=["a=1"]), "--set needs --variant"),
                         (Selection(variant="gain", variant_overrides=["oops"]), "--set 'oops' is not key=value")):
        with pytest.raises(PlrError, match=message):
            plan(tmp_path, bad)


def test_a_suites_variant_plans_as_the_command_line_one_and_the_command_line_replaces_it(tmp_path):
    from partial_lora.study.suite import load

    path = tmp_path / "el.yaml"
    path.write_text("model: minilm\ntasks: [rt-polarity]\nseeds: [0, 1]\narms: [partial, uniform, lora-matched]\n"
                    "variant: {name: el, set: [adapter.mask.granularity=element, adapter.allocation.budget=0.25]}\n"
                    "tune: retrain.lr=1e-3,1e-2\n")
    suite = load(str(path))
    assert suite.variant is not None and suite.variant.name == "el"
    by_suite = plan(tmp_path, Selection(suites=[suite]))
    by_flags = plan(tmp_path, Selection(suites=[suite], variant="el", variant_overrides=list(suite.variant.overrides)))
    assert by_suite == by_flags  # the same jobs, run dirs and overrides as --variant el --set ...
    dirs = {j.run_dir.relative_to(tmp_path / "runs/minilm/rt-polarity").parts[0] for j in by_suite}
    assert dirs == {f"{a}@el{v}" for a in ("partial", "uniform", "lora-matched")
                    for v in ("", "+retrain.lr+0.001", "+retrain.lr+0.01", "+retrain.lr+{choice}")}
    uniform = next(j for j in by_suite if j.arm == "uniform@el" and j.seed == 1)
    assert "++adapter.mask.granularity=element" in uniform.overrides
    assert not [o for o in uniform.overrides if "budget" in o]  # matched to partial@el's run, not the budget
    other = plan(tmp_path, Selection(suites=[suite], variant="gain", variant_overrides=["adapter.allocation.tau=0.8"]))
    assert {j.arm.split("+")[0] for j in other} == {"partial@gain", "uniform@gain", "lora-matched@gain"}
    assert not [o for j in other for o in j.overrides if "granularity" in o]  # --variant replaces the suite's


def test_a_finished_run_made_with_other_settings_runs_again_from_the_stage_that_differs(tmp_path):
    """A default that changed since a run finished (here an arm's overrides) makes the run stale: its
    first differing stage and the later ones run again, and so does the run that reads it."""
    from dataclasses import replace

    from hydra import compose, initialize_config_module

    from partial_lora.pipeline.runner import run_pipeline

    calls: list[str] = []

    def runner(job):
        calls.append(job.arm)
        with initialize_config_module("partial_lora.conf", version_base="1.3"):
            cfg = compose("config", overrides=[*job.overrides, f"run_dir={job.run_dir}"])
        run_pipeline(cfg, job.run_dir, echo=lambda s: None)
        return 0

    jobs = plan(tmp_path, Selection(suites=["minilm"], tasks=["bbc-news"], seeds=[0], arms=["lora", "uniform"],
                                    extra=["experiment=smoke", "model=tiny-bert"]))
    assert execute(jobs, runner=runner, echo=lambda m: None) == [] and sorted(calls) == ["lora", "partial", "uniform"]
    calls.clear()
    assert execute(jobs, runner=runner, echo=lambda m: None) == [] and calls == []  # same settings: all reused

    changed = [replace(j, overrides=(*j.overrides, "adapter.allocation.tau=0.8")) if j.arm == "partial" else
               replace(j, overrides=(*j.overrides, "trainer.lr=0.02")) if j.arm == "lora" else j for j in jobs]
    lines: list[str] = []
    execute(changed, runner=runner, echo=lines.append, keep_stale=True)
    assert calls == [] and sum("--keep-stale" in m for m in lines) == 3  # uniform reads partial: stale too
    partial = next(j for j in jobs if j.arm == "partial").run_dir
    kept = {s: (partial / s / "done").exists() for s in ("probe", "allocate")}
    lines.clear()
    assert execute(changed, runner=runner, echo=lines.append) == []
    assert sorted(calls) == ["lora", "partial", "uniform"]
    assert any("adapter.allocation.tau 0.9 -> 0.8" in m and "runs again from allocate" in m for m in lines), lines
    assert any("trainer.lr" in m and "runs again from retrain" in m for m in lines), lines
    assert any(f"it reads {partial}, which is stale" in m and "runs again from the start" in m for m in lines), lines
    assert kept == {"probe": True, "allocate": True}
    assert json.loads((partial / "allocate" / "fingerprint.json").read_text())["adapter.allocation.tau"] == 0.8
    calls.clear()
    assert execute(changed, runner=runner, echo=lambda m: None) == [] and calls == []  # fresh again
