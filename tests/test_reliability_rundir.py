"""Reliability of the run dir (issue 35): plr deletes only what it made, the data is part of a run's
identity, and a run dir from someone else runs no code. Every test runs `plr` in-process through
`cli.main`, as a user's command would, and checks the user's files byte for byte."""

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from partial_lora import artifacts, cli
from partial_lora.pipeline import runner
from tests.test_reliability import crash_at_step

SMOKE = ["experiment=smoke"]
DENSE = ["experiment=smoke", "adapter=lora", "trainer.max_steps=1"]
SPLITS = ["task=hf-text", "task.val_split=validation", "task.test_split=test"]


@pytest.fixture(autouse=True)
def _clean_cli_state(monkeypatch, tmp_path):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")


def plr(capsys, *args):
    """`plr <args>` in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = cli.main(list(args))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err.strip()


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for a folder)."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def user_files(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("my notes, not plr's\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "data.csv").write_bytes(b"a,b\n1,2\n")
    return folder


def csv_task(folder: Path, test_label_flip: bool = False) -> Path:
    """A three-split text task in CSV files; `test_label_flip` flips the first test label."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, at in (("train", 40, 0), ("validation", 10, 100), ("test", 10, 200)):
        labels = [i % 2 for i in range(n)]
        if split == "test" and test_label_flip:
            labels[0] = 1 - labels[0]
        (folder / f"{split}.csv").write_text("text,label\n" + "".join(
            f"text number {at + i} is {'good' if i % 2 else 'bad'},{labels[i]}\n" for i in range(n)))
    return folder


# --- item 1: a failed run deletes only what it created ----------------------------------------------


@pytest.mark.parametrize("where", ["folder", "cwd", "outputs"])
@pytest.mark.parametrize("mistake", [["adapter.alpha=0"], []], ids=["failing", "correct"])
def test_a_folder_of_the_users_is_refused_as_run_dir_and_left_byte_for_byte(tmp_path, capsys, where, mistake):
    """`run_dir=some/folder` (notes.txt, sub/data.csv), `run_dir=.` and `run_dir=outputs` (an earlier run
    inside) were deleted by a failed run; now they are refused before anything, failing settings or not."""
    cwd = tmp_path / "cwd"
    if where == "folder":
        user_files(cwd / "some" / "folder")
        run_dir = "some/folder"
    elif where == "cwd":
        user_files(cwd)
        run_dir = "."
    else:
        earlier = cwd / "outputs" / "bbc-news-tiny-bert-partial" / "2026-01-01_00-00-00"
        (earlier / ".hydra").mkdir(parents=True)
        (earlier / ".hydra" / "config.yaml").write_text("seed: 0\n")
        (earlier / "results.json").write_text('{"status": "complete"}\n')
        run_dir = "outputs"
    before = tree(tmp_path)
    code, _, err = plr(capsys, "train", *SMOKE, *mistake, f"run_dir={run_dir}")
    assert code == 2 and err.startswith("plr: error:") and "\n" not in err, err
    assert f"run_dir={run_dir} is a folder that holds other files" in err and "choose a new run_dir" in err
    assert tree(tmp_path) == before


def test_under_a_launch_the_job_log_of_a_peer_rank_is_not_a_users_file(tmp_path, monkeypatch):
    """torchrun starts the ranks at their own pace: one may find the train.log another rank's Hydra just opened.
    Every rank checks before it writes; the log alone is not the user's, anything else still is."""
    from partial_lora.commands.overrides import check_run_dir

    run_dir = tmp_path / "two"
    run_dir.mkdir()
    (run_dir / "train.log").write_text("[plr] probe ...\n")  # what the faster rank has written by then
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        assert check_run_dir(str(run_dir)) == run_dir
    (run_dir / "notes.txt").write_text("mine\n")
    with pytest.raises(SystemExit):
        check_run_dir(str(run_dir))
    (run_dir / "notes.txt").unlink()
    monkeypatch.delenv("WORLD_SIZE")  # one process: a folder with a log of unknown origin is not taken over
    with pytest.raises(SystemExit):
        check_run_dir(str(run_dir))


@pytest.mark.parametrize("case", ["new nested", "empty", "half-made run dir"])
def test_ctrl_c_before_the_first_stage_finishes_removes_only_what_the_run_wrote(tmp_path, capsys, monkeypatch, case):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setitem(runner.REGISTRY, "probe", interrupted)  # Ctrl-C in the middle of the first stage
    cwd = tmp_path / "cwd"
    run_dir = cwd / ("new/deep/run" if case == "new nested" else "run")
    if case == "empty":
        run_dir.mkdir()
    if case == "half-made run dir":  # what an older plr left, and a note the user put in it
        (run_dir / ".hydra").mkdir(parents=True)
        (run_dir / ".hydra" / "overrides.yaml").write_text("- experiment=smoke\n")
        (run_dir / "notes.txt").write_text("why this run\n")
    before = tree(cwd)
    code, _, err = plr(capsys, "train", *SMOKE, f"run_dir={run_dir}")
    assert code == 130, err
    assert err.splitlines()[-1] == ("plr: interrupted before any stage finished or checkpointed; removed what this run "
                                    "had written (nothing else)")
    assert tree(cwd) == before  # the nested parents it made are gone too; what was there is as it was


def test_a_failed_run_leaves_no_half_made_run_dir_so_the_right_command_then_runs(tmp_path, capsys):
    """Each of issue 35's tracebacks left `.lock`, `.hydra` and a fingerprint that refused the next,
    correct command ("made with other settings"); a failure now removes what it wrote."""
    run_dir = tmp_path / "cwd" / "run"
    code, _, err = plr(capsys, "train", *DENSE, "model.max_length=100000", f"run_dir={run_dir}")
    assert code == 2 and "model.max_length=100000 is more than the 128 positions" in err
    assert not run_dir.exists()
    code, _, err = plr(capsys, "train", *DENSE, f"run_dir={run_dir}")
    assert code == 0, err
    assert json.loads((run_dir / artifacts.RESULTS).read_text())["status"] == "complete"


def test_the_default_run_dir_is_resolved_once_and_a_failure_removes_it_and_the_folders_it_made(tmp_path, capsys):
    cwd = tmp_path / "cwd"
    code, _, err = plr(capsys, "train", *SMOKE, "adapter.alpha=0")
    assert code == 2 and "adapter.alpha must be positive" in err
    assert not any(cwd.iterdir())  # not even outputs/
    code, _, err = plr(capsys, "train", *DENSE)
    assert code == 0, err
    (run_dir,) = (cwd / "outputs" / "bbc-news-tiny-bert-lora").iterdir()
    recorded = (run_dir / artifacts.HYDRA_OVERRIDES).read_text()
    assert f"run_dir=outputs/bbc-news-tiny-bert-lora/{run_dir.name}" in recorded


def test_a_quoted_run_dir_with_spaces_runs_there_and_leaves_no_folder_named_with_the_quotes(tmp_path, capsys):
    cwd = tmp_path / "cwd"
    code, _, err = plr(capsys, "train", *DENSE, "run_dir='W/ré sult ☃/x'")
    assert code == 0, err
    assert sorted(p.name for p in cwd.iterdir()) == ["W"]
    assert json.loads((cwd / "W" / "ré sult ☃" / "x" / artifacts.RESULTS).read_text())["status"] == "complete"


# --- item 2: the data is part of a run's identity ----------------------------------------------------


def test_resume_after_the_data_changed_is_refused_naming_the_file_and_the_stage(tmp_path, capsys, monkeypatch):
    """A killed run whose train.csv and test.csv were edited before `plr resume` finished the later
    stages on the new data, silently; now the resume is refused in one line, and --rerun-from works."""
    from partial_lora.data import identity

    data = csv_task(tmp_path / "data")
    run_dir = tmp_path / "cwd" / "run"
    args = [*SMOKE, "adapter=lora", "trainer.max_steps=6", "trainer.checkpoint_every=2", *SPLITS, f"task.path={data}",
            f"run_dir={run_dir}"]
    with monkeypatch.context() as m:
        crash_at_step(m, 4)
        code, _, _ = plr(capsys, "train", *args)
    assert code == 130 and (run_dir / "retrain" / "checkpoint.safetensors").exists()
    recorded = json.loads((run_dir / "retrain" / "fingerprint.json").read_text())
    assert recorded[f"data:{data / 'train.csv'}"] == identity.digest_file(data / "train.csv")
    for name in ("train.csv", "test.csv"):
        (data / name).write_text((data / name).read_text().replace("is good,1", "is good,0", 1))
    code, _, err = plr(capsys, "resume", str(run_dir))
    assert code == 2 and err.startswith("plr: error:") and "\n" not in err, err
    assert f"the data changed since retrain of run dir {run_dir} was made from it: {data / 'test.csv'} changed " \
           "(and 1 more file)" in err and "--rerun-from retrain" in err
    assert (run_dir / "retrain" / "checkpoint.safetensors").exists()  # the refusal touched nothing
    code, _, err = plr(capsys, "resume", str(run_dir), "--rerun-from", "retrain")
    assert code == 0, err
    assert json.loads((run_dir / "retrain" / "fingerprint.json").read_text())[f"data:{data / 'train.csv'}"] == \
        identity.digest_file(data / "train.csv")


def test_a_file_changed_with_its_size_and_mtime_kept_is_read_anew_and_the_task_loads_once(tmp_path, capsys,
                                                                                          monkeypatch):
    """`datasets` keys its cache by path and mtime: the second of two runs on one folder scored the
    test split with its old labels. Now the cache folder is named by the files' content."""
    from partial_lora.working_set import data as run_data

    data = csv_task(tmp_path / "data")
    loads = []
    real = run_data.load_task
    monkeypatch.setattr(run_data, "load_task", lambda spec: loads.append(spec.name) or real(spec))
    args = [*DENSE, *SPLITS, f"task.path={data}"]

    def test_labels(run_dir):
        frame = pd.read_parquet(run_dir / "evaluate" / artifacts.PREDICTIONS)
        return frame[frame["split"] == "test"].sort_values("index")["label"].tolist()

    assert plr(capsys, "train", *args, f"run_dir={tmp_path / 'cwd' / 'a'}")[0] == 0
    assert loads == ["hf-text"]  # the pipeline's one load serves both stages
    stat = (data / "test.csv").stat()
    csv_task(tmp_path / "data", test_label_flip=True)
    os.utime(data / "test.csv", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (data / "test.csv").stat().st_size == stat.st_size
    assert plr(capsys, "train", *args, f"run_dir={tmp_path / 'cwd' / 'b'}")[0] == 0
    old, new = test_labels(tmp_path / "cwd" / "a"), test_labels(tmp_path / "cwd" / "b")
    assert new[0] == 1 - old[0] and new[1:] == old[1:]
    assert new == pd.read_csv(data / "test.csv")["label"].tolist()


# --- item 3: a run dir from someone else runs no code ------------------------------------------------

CALLBACK = ["+hydra.callbacks.x._target_=builtins.open", "+hydra.callbacks.x.file=MADE", "+hydra.callbacks.x.mode=w"]


def test_resume_rebuilds_the_run_from_its_plr_settings_only(tmp_path, capsys):
    run_dir = tmp_path / "cwd" / "run"
    assert plr(capsys, "train", *DENSE, f"run_dir={run_dir}")[0] == 0
    artifacts.clear_done(run_dir, "evaluate")
    made = tmp_path / "made-by-a-callback"
    foreign = [c.replace("MADE", str(made)) for c in CALLBACK] + ["--config-dir=/tmp", "hydra/launcher=basic"]
    with open(run_dir / artifacts.HYDRA_OVERRIDES, "a") as f:
        f.write("".join(f"- {json.dumps(o)}\n" for o in foreign))
    code, out, err = plr(capsys, "resume", str(run_dir))
    assert code == 0, err
    assert not made.exists()
    assert "left out 5 entries" in out and "not a plr setting" in out and "a run dir's files never run code" in out
    assert artifacts.is_done(run_dir, "evaluate")


def test_hydra_overrides_that_run_code_are_refused_unless_the_command_allows_them(tmp_path, capsys):
    made, run_dir = tmp_path / "made", tmp_path / "cwd" / "run"
    callback = [c.replace("MADE", str(made)) for c in CALLBACK]
    code, _, err = plr(capsys, "train", *DENSE, *callback, f"run_dir={run_dir}")
    assert code == 2 and "\n" not in err and "makes Hydra import and run code" in err and "--allow-hydra-code" in err
    assert not made.exists() and not run_dir.exists()
    code, _, err = plr(capsys, "train", "--allow-hydra-code", *DENSE, *callback, f"run_dir={run_dir}")
    assert code == 0, err
    assert made.exists()  # the documented opt-in lets them through


@pytest.mark.parametrize("override", [
    "hydra.callbacks.x._target_=os.getcwd", "hydra/callbacks=x", "hydra/sweeper=x", "hydra.launcher._target_=os.getcwd",
    "hydra.job_logging.handlers.h.class=os.getcwd", "hydra/job_logging=custom",
    "hydra.searchpath=[file:///tmp]", "hydra.launcher={_target_: os.getcwd}", "--config-dir=/tmp", "-cp=/tmp",
    "--experimental-rerun=config.pickle", "model@hydra.callbacks.x=minilm", "hydra/launcher=submitit_local"])
def test_every_hydra_way_to_run_code_is_refused(override, capsys):
    from partial_lora.commands.overrides import check_hydra

    with pytest.raises(SystemExit) as e:
        check_hydra([override])
    assert e.value.code == 2 and "--allow-hydra-code" in capsys.readouterr().err


def test_hydra_settings_that_run_no_code_pass():
    from partial_lora.commands.overrides import check_hydra

    check_hydra(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.sweep.dir=out",
                 "hydra.sweeper.params.seed=0,1", "hydra/job_logging=disabled", "hydra.verbose=true", "-m",
                 "--cfg", "job", "seed=1"])


# --- items 4-6: one line where a traceback was ----------------------------------------------------------


def test_a_damaged_allocation_is_one_line_and_rerun_from_allocate_remakes_it(tmp_path, capsys):
    run_dir = tmp_path / "cwd" / "run"
    uniform = [*SMOKE, "adapter=uniform", "adapter.allocation.ratio=0.5", "trainer.max_steps=1", f"run_dir={run_dir}"]
    assert plr(capsys, "train", *uniform)[0] == 0
    (run_dir / "allocate" / artifacts.ALLOCATION).write_text("{}\n")
    for stage in ("extract", "retrain", "evaluate"):
        artifacts.clear_done(run_dir, stage)
    code, _, err = plr(capsys, "resume", str(run_dir))
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    assert f"corrupt artifact {run_dir / 'allocate' / artifacts.ALLOCATION} (no 'layers'); remake it with " \
           f"`plr resume {run_dir} --rerun-from allocate`" in err
    code, _, err = plr(capsys, "resume", str(run_dir), "--rerun-from", "allocate")
    assert code == 0, err
