"""The study's estimate of the run time left (`study.estimate`), read off the logs of finished runs."""

from __future__ import annotations

import re
from pathlib import Path

from partial_lora.study.estimate import Estimate, estimate, run_time, times
from partial_lora.study.plan import Job
from partial_lora.study.schedule import duration

STAMP = "[plr] study: 2026-12-08T02:00:00.000000"


def _log(logs: Path, rel: str, *attempts: tuple[int, float]) -> None:
    """A run's log as the study writes it: a start and an end mark per attempt, with the run's output between."""
    path = logs / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for code, seconds in attempts:
        lines += [f"{STAMP} start partial_lora.cli train ...", "[plr] retrain: done in 1.0 s",
                  f"{STAMP} end exit {code} after {seconds} s"]
    path.write_text("\n".join(lines) + "\n")


def _job(model: str, task: str, arm: str, seed: int = 0) -> Job:
    return Job(model, task, arm, seed, Path("/nowhere") / model / task / arm / f"seed{seed}", ())


def test_a_runs_time_adds_up_its_attempts_and_only_a_finished_run_has_one(tmp_path):
    _log(tmp_path, "m/t/lora/seed0.log", (130, 50.0), (0, 100.5))       # stopped, then resumed to its end
    _log(tmp_path, "m/t/lora/seed1.log", (0, 80.0), (1, 3.0))           # its last attempt failed
    (tmp_path / "m/t/lora/seed2.log").write_text(f"{STAMP} start partial_lora.cli train ...\n")  # still running
    assert run_time(tmp_path / "m/t/lora/seed0.log") == 150.5
    assert run_time(tmp_path / "m/t/lora/seed1.log") is None
    assert run_time(tmp_path / "m/t/lora/seed2.log") is None
    assert run_time(tmp_path / "m/t/lora/seed9.log") is None  # no log
    assert times(tmp_path) == {("m", "t", "lora", False): [150.5]}


def test_each_job_is_timed_by_the_finished_runs_most_like_it(tmp_path):
    _log(tmp_path, "m/t1/partial/seed0.log", (0, 200.0))
    _log(tmp_path, "m/t1/partial+retrain.lr+0.01/seed0.log", (0, 100.0))
    _log(tmp_path, "m/t1/partial+retrain.lr+0.02/seed0.log", (0, 120.0))
    _log(tmp_path, "m/t2/lora/seed0.log", (0, 60.0))
    todo = [
        _job("m", "t1", "partial", 1),                      # the same task and arm: 200
        _job("m", "t2", "partial+retrain.lr+0.05"),         # the same arm, tuned, on another task: (100 + 120) / 2
        _job("m", "t2", "partial+retrain.lr+{choice}", 1),  # a run waiting on a grid's choice: tuned too
        _job("m", "t3", "uniform"),                         # any untuned arm of the model: (200 + 60) / 2
        _job("other", "t1", "lora"),                        # no finished run of its model: counted, not timed
    ]
    est = estimate(todo, tmp_path)
    assert est == Estimate(runs=5, timed=4, seconds=200 + 110 + 110 + 130, evidence=4)
    assert est.line(2) == ("[plr] study: about 9 min of run time left for 4 runs (from the logs of 4 finished runs "
                           "like them; 1 with no finished run like them, not counted); about 5 min at 2 at a time")
    assert Estimate(40, 40, 40 * 3 * 3600 / 40, 12).line(1) == (
        "[plr] study: about 3.0 h of run time left for 40 runs (from the logs of 12 finished runs like them)")
    assert "no finished run of their model(s)" in estimate(todo[-1:], tmp_path).line(2)
    assert estimate([], tmp_path).line(2) == "[plr] study: nothing left to run"


def test_the_dry_run_and_the_study_say_how_long_the_runs_left_take(tmp_path, capsys):
    from partial_lora.commands.study import study_command
    from partial_lora.study import Selection, execute, plan

    out = tmp_path / "study"
    _log(out / "logs", "minilm/rt-polarity/lora/seed0.log", (0, 600.0))
    argv = ["--suite", "minilm", "--tasks", "rt-polarity", "--arms", "lora", "--seeds", "0,1", "--out", str(out),
            "--jobs", "2", "--dry-run"]
    assert study_command(argv) == 0
    # nothing has finished (the log alone is not a run): two dense LoRA runs to go, ten minutes each
    assert ("[plr] study: about 20 min of run time left for 2 runs (from the logs of 1 finished run like them); "
            "about 10 min at 2 at a time") in capsys.readouterr().out
    jobs = plan(out, Selection(suites=["minilm"], tasks=["rt-polarity"], seeds=[0, 1], arms=["lora"]))
    lines: list[str] = []
    execute(jobs, runner=lambda job: 1, echo=lines.append, out=out)
    assert "[plr] study: about 20 min of run time left for 2 runs" in "\n".join(lines)
    # and it ends with the time it took
    assert re.fullmatch(r"\[plr\] study: 0 run\(s\) finished in \d+ s of wall clock, \d+ s of run time in all; "
                        r"2 failed or skipped", lines[-1]), lines[-1]
    assert (duration(59.6), duration(600), duration(5399), duration(5400)) == ("60 s", "10 min", "90 min", "1.5 h")
