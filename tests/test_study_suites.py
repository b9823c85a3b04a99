"""`plr study` for any suite: suite files, the scheduler (--jobs, --gpus, SLURM through submitit), the
paper's suites as plans, resuming a stopped study, and each bad input as one line."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from partial_lora.study import Selection, plan, schedule
from partial_lora.study.claims import claim_rows, collect
from partial_lora.study.plan import Job

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
POS, NEG, FILLER = "good great fine nice happy".split(), "bad awful poor sad dull".split(), "the a film was it".split()


def user_suite(root: Path, arms: list[str], seeds: tuple[int, ...] = (0,), task_overrides: list[str] | None = None,
               more_tasks: tuple[str, ...] = (), arm_overrides: dict[str, list[str]] | None = None,
               **keys: str) -> Path:
    """A suite of the user's own: tiny BERT on a generated CSV task (review -> y), given as an override list."""
    rng = np.random.default_rng(0)
    data = root / "mine.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "y"])
        for i in range(120):
            words = [*rng.choice(FILLER, 4), *rng.choice(POS if i % 2 else NEG, 2)]
            w.writerow([" ".join(words), "pos" if i % 2 else "neg"])
    overrides = task_overrides or ["task=hf-text", f"task.path={data}", "task.text_column=review",
                                   "task.label_column=y"]
    lines = ["# tests: a user suite", "model: tiny-bert", "tasks:", "  - name: mine",
             f"    overrides: [{', '.join(overrides)}]",
             *more_tasks,
             f"seeds: [{', '.join(map(str, seeds))}]", f"arms: [{', '.join(arms)}]",
             "recipe: [trainer.epochs=1, trainer.batch_size=16, trainer.max_steps=3]",
             "arm_overrides:", "  partial: [adapter.probe.shots=4, adapter.probe.val_shots=4, adapter.probe.epochs=1]",
             *(f"  {arm}: [{', '.join(values)}]" for arm, values in (arm_overrides or {}).items()),
             *(f"{k}: {v}" for k, v in keys.items())]
    path = root / "mine.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def study(*args: str, threads: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "partial_lora.cli", "study", *args], cwd=ROOT, capture_output=True,
                          text=True, env={**ENV, "OMP_NUM_THREADS": str(threads)}, timeout=600)


def span(log: Path) -> tuple:
    """(first start, last end) of a run's log."""
    m = schedule.marks(log)
    return next(t for t, w in m if w.startswith("start")), [t for t, w in m if w.startswith("end")][-1]


def complete(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "results.json").read_text())["status"] == "complete"
    except (OSError, ValueError, KeyError):
        return False


# --- end to end -----------------------------------------------------------------------------------

def test_a_user_suite_runs_two_runs_at_once_in_dependency_order_and_judges_the_claims(tmp_path):
    arms = ["lora", "partial", "uniform"]
    out = tmp_path / "study"
    gone = ["  - name: gone",
            f"    overrides: [task=hf-text, task.path={tmp_path / 'gone.csv'}]"]  # its file is missing
    done = study("--suite", str(user_suite(tmp_path, arms, more_tasks=gone)), "--jobs", "2", "--bootstrap", "200",
                 "--out", str(out))
    # The task whose data is missing fails (its uniform run, which reads its partial run, is skipped); the
    # study goes on, lists them at the end with their logs, and exits 1.
    assert done.returncode == 1 and "plr: error: 3 run(s) of the study failed or were skipped" in done.stderr
    for arm, why in (("lora", "exit 2"), ("partial", "exit 2"), ("uniform", "skipped")):  # plr train: exit 2
        log = out / "logs/tiny-bert/gone" / arm / "seed0.log"
        assert f"  {out}/runs/tiny-bert/gone/{arm}/seed0  ({why}" in done.stdout and f"log {log})" in done.stdout
    assert "gone.csv" in (out / "logs/tiny-bert/gone/lora/seed0.log").read_text()  # the log says why
    md = (out / "study.md").read_text()
    assert "| C3 | tiny-bert | mine | partial − lora | matches |" in md
    assert "| C2a | tiny-bert | mine | partial − uniform | beats |" in md
    logs = {a: out / "logs/tiny-bert/mine" / a / "seed0.log" for a in arms}
    spans = {a: span(log) for a, log in logs.items()}
    # lora and partial ran at the same time; uniform (it matches partial's budget) started after partial ended
    assert spans["lora"][0] < spans["partial"][1] and spans["partial"][0] < spans["lora"][1]
    assert spans["uniform"][0] >= spans["partial"][1]
    for a in arms:  # 2 cores, 2 jobs: one thread each, as each run recorded
        assert "(1 thread)" in logs[a].read_text()
        assert json.loads((out / "runs/tiny-bert/mine" / a / "seed0/env.json").read_text())["threads"] == 1


def test_a_stopped_study_resumes_reusing_what_finished_and_holds_its_folder_meanwhile(tmp_path):
    arms = ["head", "lora", "lora-r1"]  # three independent runs, one after another with --jobs 1
    # the two LoRA runs train 300 steps: the study is still busy after `head` however loaded the machine, and
    # a run that did not stop when asked would finish
    longer = ["trainer.epochs=100", "trainer.max_steps=300"]
    suite, out = user_suite(tmp_path, arms, arm_overrides={"lora": longer, "lora-r1": longer}), tmp_path / "study"
    runs = {a: out / "runs/tiny-bert/mine" / a / "seed0" for a in arms}
    cmd = [sys.executable, "-m", "partial_lora.cli", "study", "--suite", str(suite), "--bootstrap", "200", "--out",
           str(out)]
    printed = tmp_path / "first.txt"
    # started as a shell starts a background job (`plr study ... &`, nohup): SIGINT ignored, which its runs
    # must not inherit, since SIGINT is how the study stops them
    first = subprocess.Popen(cmd, cwd=ROOT, env={**ENV, "OMP_NUM_THREADS": "1"}, stdout=printed.open("w"),
                             stderr=subprocess.STDOUT, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.monotonic() + 300
        while not complete(runs["head"]) and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert complete(runs["head"]), "the first run did not finish"
        second = study("--suite", str(suite), "--out", str(out))  # the same folder while the first study runs
        assert second.returncode == 2 and f"is in use by pid {first.pid}" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1 and second.stderr.startswith("plr: error: study folder")
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 130
    finally:
        if first.poll() is None:
            first.kill()
    assert "Run the same command again to resume" in printed.read_text()
    finished = [a for a in arms if complete(runs[a])]
    assert 1 <= len(finished) < 3
    stamps = {a: (runs[a] / "results.json").stat().st_mtime_ns for a in finished}
    again = study("--suite", str(suite), "--bootstrap", "200", "--out", str(out))
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"3 runs, {len(finished)} finished already, {3 - len(finished)} to run" in again.stdout
    assert all(complete(r) for r in runs.values())
    assert {a: (runs[a] / "results.json").stat().st_mtime_ns for a in finished} == stamps  # reused, not rerun


def test_the_slurm_path_submits_through_submitit_in_dependency_order(tmp_path):
    """submitit's local executor runs the same submissions a cluster would get; the dry run prints the resources."""
    suite, out = user_suite(tmp_path, ["uniform"]), tmp_path / "study"
    done = study("--suite", str(suite), "--launcher", "submitit-local", "--slurm", "gpus_per_node=0",
                 "--slurm", "timeout_min=10", "--bootstrap", "200", "--out", str(out), threads=1)
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
    assert "[slurm0]" in done.stdout and "| C2a | tiny-bert | mine | partial − uniform | beats |" in done.stdout
    logs = out / "logs/tiny-bert/mine"
    assert span(logs / "uniform/seed0.log")[0] >= span(logs / "partial/seed0.log")[1]  # after the run it reads
    assert len(list((out / ".submitit").glob("*_result.pkl"))) == 2  # two submissions, each with its result


def test_the_slurm_dry_run_prints_each_submissions_resources(tmp_path, capsys):
    from partial_lora.commands.study import study_command

    suite, out = user_suite(tmp_path, ["lora", "partial"]), tmp_path / "study"
    assert study_command(["--suite", str(suite), "--launcher", "slurm", "--slurm", "partition=gpu", "--slurm",
                          "mem_gb=32", "--out", str(out), "--dry-run"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("run ")]
    assert len(lines) == 2 and not out.exists()
    for ln in lines:  # the resources of conf/hydra/launcher/slurm.yaml, with the two set here
        assert ln.startswith("run   [slurm timeout_min=720 nodes=1 tasks_per_node=1 gpus_per_node=1 cpus_per_task=8 "
                             "mem_gb=32 partition=gpu] plr train model=tiny-bert")
    if shutil.which("sbatch") is None:
        with pytest.raises(SystemExit) as e:
            study_command(["--suite", str(suite), "--launcher", "slurm", "--out", str(out)])
        assert e.value.code == 2 and "no SLURM on this machine (sbatch not found)" in capsys.readouterr().err
        assert not out.exists()


# --- the paper's suites as plans -------------------------------------------------------------------

ARMS9 = ["head", "lora", "partial", "partial-random", "uniform", "lora-matched", "partial-r32-rank1", "lora-r1",
         "peft-lora"]
VTAB = ["cifar100", "caltech101", "dtd", "flowers102", "pets", "svhn", "eurosat", "resisc45"]
GLUE = ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"]


@pytest.mark.parametrize("suite, model, tasks, arms, recipe", [
    ("vtab", "vit-b", VTAB, ARMS9, lambda t: "experiment=vtab"),
    ("glue", "deberta-v3-base", GLUE, ARMS9, lambda t: f"experiment=glue-{t}"),
    ("commonsense", "llama-7b", ["commonsense"], ARMS9[:-1], lambda t: "experiment=commonsense"),
])
def test_the_paper_suites_dry_runs_list_every_task_arm_and_seed_with_its_recipe(tmp_path, capsys, suite, model,
                                                                               tasks, arms, recipe):
    from partial_lora.commands.study import study_command

    out = tmp_path / "study"
    assert study_command(["--suite", suite, "--gpus", "0,1", "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    n = len(tasks) * len(arms) * 3
    assert f"[plr] study: {model}: {len(tasks)} task(s) x {len(arms)} arm(s) x 3 seed(s) = {n} runs" in text
    assert "2 at a time (gpu0, gpu1)" in text and f"{n} runs planned, 0 finished already" in text
    seen = set()
    for ln in (ln for ln in text.splitlines() if ln.startswith("run ")):
        words = ln.split()
        got = {k: v for k, _, v in (w.partition("=") for w in words) if k in ("task", "label", "seed", "run_dir")}
        assert words[3] == f"model={model}" and recipe(got["task"]) in words  # the suite's recipe, per task
        assert got["run_dir"] == f"{out}/runs/{model}/{got['task']}/{got['label']}/seed{got['seed']}"
        seen.add((got["task"], got["label"], int(got["seed"])))
    assert seen == {(t, a, s) for t in tasks for a in arms for s in (0, 1, 2)}
    assert not out.exists()  # a dry run writes nothing


def test_every_builtin_suite_loads_and_says_how_to_run_it():
    from partial_lora.study.suite import SUITE_DIR, builtin, load

    assert builtin() == ["commonsense", "dinov2-vits", "efficientnet-lite0", "fair-dinov2", "fair-effnet",
                         "fair-minilm", "fair-minilm-element", "fair-smollm2", "gemma3-270m", "glue", "minilm",
                         "smollm2-135m", "vtab"]
    for name in builtin():
        suite = load(name)
        assert suite.tasks and suite.seeds and suite.arms and suite.source == SUITE_DIR / f"{name}.yaml"
        head = suite.source.read_text().splitlines()[:6]
        assert head[0].startswith("#") and any(f"plr study --suite {name}" in ln for ln in head), name


def test_make_reproduce_dry_targets_are_plr_study(tmp_path):
    venv = Path(sys.prefix)  # the venv running the tests; -o: never (re)install it from here
    res = subprocess.run(["make", "-s", "reproduce-glue-dry", f"VENV={venv}", "-o", str(venv / ".installed"),
                          "GPUS=0,1", "TASKS=rte", "SEEDS=0", f"OUT={tmp_path / 'glue'}"], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "[plr] study: deberta-v3-base: 1 task(s) x 9 arm(s) x 1 seed(s) = 9 runs" in res.stdout
    assert "2 at a time (gpu0, gpu1)" in res.stdout
    assert "experiment=glue-rte task=rte adapter=lora seed=0 label=lora trainer.device=auto" in res.stdout


# --- the scheduler, on a launcher of fake runs -----------------------------------------------------

class Fake:
    """Runs that end after `polls` polls with `codes[arm]` (0 by default), recording what ran at once."""

    def __init__(self, codes: dict[str, int], polls: int = 3) -> None:
        self.codes, self.polls, self.live, self.most, self.order = codes, polls, set(), 0, []

    def start(self, job: Job, slot: schedule.Slot):
        fake = self
        fake.live.add(job.run_dir)
        fake.most = max(fake.most, len(fake.live))
        fake.order.append((job.arm, job.seed, slot.env["OMP_NUM_THREADS"]))

        class Handle:
            left = fake.polls

            def poll(self):
                self.left -= 1
                if self.left > 0:
                    return None
                fake.live.discard(job.run_dir)
                return fake.codes.get(job.arm, 0)

            def stop(self):
                pass
        return Handle()


def test_the_scheduler_fills_its_slots_keeps_the_order_and_skips_what_reads_a_failed_run(tmp_path):
    jobs = plan(tmp_path, Selection(suites=["minilm"], tasks=["rt-polarity"], seeds=[0, 1],
                                    arms=["lora", "head", "uniform", "lora-matched"]))
    fake = Fake({"partial": 1})  # Partial-LoRA fails on every seed
    failures = schedule.run([j for j in jobs if j.seed == 0], fake, schedule.cpu_slots(2, total=4), ok=lambda j: True,
                            ready=lambda d: False, echo=lambda m: None, poll_s=0)
    assert fake.most == 2 and {t for _, _, t in fake.order} == {"2"}  # 2 at once, 4 cores: 2 threads each
    assert [a for a, _, _ in fake.order] == ["partial", "head", "lora"]  # the arms that read partial never start
    assert {(f.job.arm, f.why.split(":")[0]) for f in failures} == {
        ("partial", "exit 1"), ("uniform", "skipped"), ("lora-matched", "skipped")}
    fake = Fake({})
    assert schedule.run(jobs, fake, schedule.cpu_slots(3, total=3), ok=lambda j: True, ready=lambda d: False,
                        echo=lambda m: None, poll_s=0) == []
    assert fake.most == 3 and len(fake.order) == len(jobs)
    for seed in (0, 1):  # each seed's matched controls start after that seed's Partial-LoRA run
        arms = [a for a, s, _ in fake.order if s == seed]
        assert arms.index("partial") < arms.index("uniform") and arms.index("partial") < arms.index("lora-matched")
    slots = schedule.gpu_slots([0, 0, 1], check=False, total=6)  # an id twice: two runs on that GPU
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "0", "1"] and slots[0].env["OMP_NUM_THREADS"] == "2"


# --- a multi-task run: the claims per member task ---------------------------------------------------

def test_a_multi_task_runs_claims_are_judged_per_member_and_pooled_as_its_mean(tmp_path):
    members = {"arc-e": 40, "boolq": 60}
    labels = {m: np.arange(n) % 2 for m, n in members.items()}
    wrong = {("lora", "arc-e"): 0, ("lora", "boolq"): 0, ("partial", "arc-e"): 4, ("partial", "boolq"): 12}
    for arm in ("lora", "partial"):
        for seed in (0, 1):
            run = tmp_path / "runs/tiny-llama/commonsense" / arm / f"seed{seed}"
            (run / "evaluate").mkdir(parents=True)
            parts, metrics = [], {}
            for m, y in labels.items():
                pred = y.copy()
                pred[:wrong[arm, m]] = 1 - pred[:wrong[arm, m]]
                parts.append(pd.DataFrame({"split": "test", "task": m, "index": np.arange(len(y)), "label": y,
                                           "prediction": pred, "score": 1.0}))
                metrics[f"test_{m}_accuracy"] = float((pred == y).mean())
            metrics["test_mean"] = float(np.mean(list(metrics.values())))
            pd.concat(parts).to_parquet(run / "evaluate/predictions.parquet")
            (run / "results.json").write_text(json.dumps({
                "status": "complete", "main_metric": "mean", "metrics": metrics, "members": list(members),
                "member_metrics": {m: {"metrics": ["accuracy"], "main": "accuracy"} for m in members},
                "params": {"adapter": 100 if arm == "partial" else 1000}, "wall_s": {"retrain": 1.0}}))
    study = collect(tmp_path)
    assert sorted({r.task for r in study.runs}) == ["commonsense/arc-e", "commonsense/boolq"]
    rows = {r.task: r for r in claim_rows(study, n_boot=200) if r.claim.key == "C3"}
    assert rows["commonsense/arc-e"].comparison.mean == pytest.approx(-10.0)  # 4 of 40 examples
    assert rows["commonsense/boolq"].comparison.mean == pytest.approx(-20.0)  # 12 of 60
    run = json.loads((tmp_path / "runs/tiny-llama/commonsense/partial/seed0/results.json").read_text())
    dense = json.loads((tmp_path / "runs/tiny-llama/commonsense/lora/seed0/results.json").read_text())
    # pooled over the members: the difference of the run's mean accuracy
    difference = run["metrics"]["test_mean"] - dense["metrics"]["test_mean"]
    assert rows["pooled"].comparison.mean == pytest.approx(100 * difference)
    assert collect(tmp_path).narrow(tasks=["commonsense"]).runs == study.runs


# --- bad input: one line, non-zero, nothing written --------------------------------------------------

def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return str(path)


GOOD = "model: tiny-bert\ntasks: [bbc-news]\nseeds: [0]\n"


@pytest.mark.parametrize("make_args, message", [
    (lambda p: ["--suite", "nosuch"],
     "unknown suite 'nosuch'; choose one of commonsense, dinov2-vits, efficientnet-lite0"),
    (lambda p: ["--suite", _write(p, GOOD.replace("[0]", "'0'"))],
     "seeds='0' must be a list of whole numbers, got a string; fix the suite file"),
    (lambda p: ["--suite", _write(p, GOOD + "arms: [lora, dora]\n")], "unknown arm 'dora'; choose from: head"),
    (lambda p: ["--suite", _write(p, GOOD.replace("bbc-news", "no-such-task"))], "no task config 'no-such-task'"),
    (lambda p: ["--suite", _write(p, GOOD + "modle: x\n")], "unknown key suite"),
    (lambda p: ["--suite", _write(p, GOOD.replace("model: tiny-bert\n", ""))], "no model: a suite names its model"),
    (lambda p: ["--suite", _write(p, GOOD.replace("[bbc-news]", "[{name: mine, overrides: [task=hf-text, "
                                                                  "task.path=x.csv, task.lable_column=y]}]"))],
     "task 'mine' of the study does not compose (Could not override 'task.lable_column'"),
    (lambda p: ["--suite", _write(p, GOOD.replace("[bbc-news]", "[{name: mine, overrides: [task=hf-text]}]"))],
     "task 'mine' of the study: task.path is required"),
    (lambda p: ["--suite", _write(p, GOOD + "variant: {name: El!, set: [a=1]}\n")], "variant.name 'El!' must be"),
    (lambda p: ["--suite", _write(p, GOOD + "variant: {name: el, set: []}\n")], "variant.set is empty"),
    (lambda p: ["--suite", _write(p, GOOD + "variant: {name: el, set: [oops]}\n")], "'oops' is not an override"),
    (lambda p: ["--suite", _write(p, GOOD + "variant: {name: el}\n")], "variant has no set: give suite"),
    (lambda p: ["--suite", _write(p, GOOD + "arms: [lora]\nvariant: {name: el, set: [a=1]}\n")],
     "none of the suite's arms takes a variant"),
    (lambda p: ["--suite", _write(p, GOOD), "--jobs", "0"], "--jobs 0: run at least one run at a time"),
    (lambda p: ["--suite", _write(p, GOOD), "--gpus", "0"], "--gpus: this machine has no CUDA device"),
    (lambda p: ["--suite", _write(p, GOOD), "--jobs", "2", "--gpus", "0"], "give --jobs or --gpus, not both"),
    (lambda p: ["--suite", _write(p, GOOD), "--slurm", "partition=gpu"], "--slurm sets the resources of SLURM jobs"),
    (lambda p: ["--suite", _write(p, GOOD), "--launcher", "submitit-local", "--slurm", "partiton=gpu"],
     "--slurm partiton: not a resource"),
    (lambda p: ["--suite", _write(p, GOOD), "--launcher", "submitit-local", "--slurm", "mem_gb=lots"],
     "--slurm mem_gb='lots' must be a number, got a string; fix that --slurm"),
    (lambda p: ["--suite", _write(p, GOOD), "--launcher", "slurm", "--jobs", "0", "--dry-run"],
     "--jobs 0: run at least"),
    (lambda p: ["--dry-run", "--tasks", "nonexistent"], "no run planned: --tasks nonexistent names no task"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, make_args, message):
    import torch

    from partial_lora.commands.study import study_command

    args = make_args(tmp_path)
    if "--gpus" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "study"
    with pytest.raises(SystemExit) as e:
        study_command([*args, "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("plr: error: ") and len(err.strip().splitlines()) == 1, err
    assert message in err, err
    assert not out.exists()


def test_a_run_started_by_a_study_in_the_background_can_still_be_stopped_with_sigint():
    """A shell starts background jobs (`plr study ... &`, nohup) with SIGINT ignored, and children inherit that.
    SIGINT is how the study stops its runs (and what they get when the study dies), so each run starts with
    it restored: the run's Python then turns it into plr train's Ctrl-C."""
    from partial_lora.study import schedule

    probe = [sys.executable, "-c", "import signal; h = signal.getsignal(signal.SIGINT); "
             "print('ignored' if h == signal.SIG_IGN else 'ctrl-c' if h is signal.default_int_handler else h)"]
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # this process, as a background job
    try:
        inherited = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip()
        started = subprocess.run(probe, capture_output=True, text=True, check=True,
                                 preexec_fn=schedule._die_with_parent).stdout.strip()
    finally:
        signal.signal(signal.SIGINT, before)
    assert inherited == "ignored"  # what a run would get without the study's reset
    assert started == "ctrl-c"
