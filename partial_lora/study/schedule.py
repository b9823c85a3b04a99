"""Running a study's jobs: several at once, each in a slot, in dependency order.

A **slot** is where one run goes: a share of the CPU cores (`--jobs N`: N slots of cores // N
threads each, through OMP_NUM_THREADS), one GPU (`--gpus 0,1`: a slot per listed id, through
CUDA_VISIBLE_DEVICES; list an id twice for two runs on it), or one SLURM job (`--launcher slurm`,
submitted through submitit with the resources of `conf/hydra/launcher/slurm.yaml`). A **launcher**
starts a job in a slot and is polled for its exit code. `run` keeps every slot busy with the next
job whose runs it reads (`Job.after`) have finished; a job whose run failed is skipped, a failed
job does not stop the others, and each run's output goes to its own log (`Job.log`), which marks
when the run started and ended. A job that waits on a tuning grid's choice (`Job.waits`) becomes a
run at the chosen value (`resolve`) as soon as every run of its grid has ended, while the other
grids still run.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from partial_lora.errors import PlrError, first_line
from partial_lora.study.plan import Job
from partial_lora.typecheck import check_type

SLURM_YAML = Path(__file__).resolve().parents[1] / "conf" / "hydra" / "launcher" / "slurm.yaml"
STAMP = "%Y-%m-%dT%H:%M:%S.%f"  # the logs' start and end marks


@dataclass(frozen=True)
class Slot:
    """Where a run goes: its name in the progress lines, and the environment it adds."""

    name: str
    env: Mapping[str, str]


@dataclass(frozen=True)
class Failure:
    job: Job
    why: str  # "exit 1", or why it was skipped


class Handle(Protocol):
    def poll(self) -> int | None: ...  # the exit code once the run ended, else None
    def stop(self) -> None: ...        # ask the run to stop (it may still checkpoint)


class Launcher(Protocol):
    def start(self, job: Job, slot: Slot) -> Handle: ...


def cores() -> int:
    """The cores the study may use: OMP_NUM_THREADS if set, else the CPUs this process may run on."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _threads(n: int) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n)}


def cpu_slots(jobs: int, total: int | None = None) -> list[Slot]:
    """`--jobs N`: N slots that split the cores (threads per run = cores // N, at least 1)."""
    if jobs < 1:
        raise PlrError(f"--jobs {jobs}: run at least one run at a time (--jobs 1 or more)")
    per = max(1, (total or cores()) // jobs)
    return [Slot(f"cpu{i} ({per} thread{'s' if per > 1 else ''})", _threads(per)) for i in range(jobs)]


def gpu_slots(ids: Sequence[int], *, check: bool = True, total: int | None = None) -> list[Slot]:
    """`--gpus 0,1`: a slot per listed GPU (CUDA_VISIBLE_DEVICES), the cores split between them.

    Raises:
        PlrError: no CUDA on this machine (with `check`), or an id it does not have.
    """
    if not ids:
        raise PlrError("--gpus needs at least one CUDA device id, e.g. --gpus 0,1")
    if any(i < 0 for i in ids):
        raise PlrError(f"--gpus takes CUDA device ids (0, 1, ...), got {','.join(map(str, ids))}")
    if check:
        import torch

        if not torch.cuda.is_available():
            raise PlrError("--gpus: this machine has no CUDA device (torch.cuda.is_available() is False); run on "
                           "the CPU with --jobs N instead, or on a GPU machine")
        count = torch.cuda.device_count()
        if max(ids) >= count:
            raise PlrError(f"--gpus {','.join(map(str, ids))}: this machine has {count} CUDA device(s), ids 0 to "
                           f"{count - 1}")
    per = max(1, (total or cores()) // len(ids))
    return [Slot(f"gpu{i}", {"CUDA_VISIBLE_DEVICES": str(i), **_threads(per)}) for i in ids]


# --- the logs -------------------------------------------------------------------------------------

def _mark(log: Any, what: str) -> None:
    log.write(f"[plr] study: {datetime.now().strftime(STAMP)} {what}\n")
    log.flush()


def marks(log: Path) -> list[tuple[datetime, str]]:
    """The start and end marks of a run's log, in order: (time, "start ..." or "end ...")."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("[plr] study: "):
            stamp, _, what = line[len("[plr] study: "):].partition(" ")
            try:
                out.append((datetime.strptime(stamp, STAMP), what))
            except ValueError:
                continue
    return out


def _argv(job: Job) -> list[str]:
    return [sys.executable, "-m", "partial_lora.cli", "train", "trainer.progress=false", *job.overrides,
            f"run_dir={job.run_dir}"]


def _log_of(job: Job) -> Path:
    log = job.log if job.log is not None else job.run_dir.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    return log


def run_logged(argv: list[str], env: Mapping[str, str], log: str) -> int:
    """Run one `plr train` to its end with its output appended to `log` (what a SLURM job runs)."""
    with open(log, "a") as f:
        _mark(f, f"start {' '.join(argv[2:])}")
        t0 = time.perf_counter()
        code = subprocess.run(argv, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, stdout=f,
                              stderr=subprocess.STDOUT).returncode
        _mark(f, f"end exit {code} after {time.perf_counter() - t0:.1f} s")
    return code


# --- launchers ------------------------------------------------------------------------------------

def _die_with_parent() -> None:  # pragma: no cover - runs in the child, before exec
    """The run gets SIGINT (plr train's Ctrl-C: it stops where it can resume) if the study dies.

    SIGINT is how the study stops a run, so the run must not inherit it ignored: a shell starts
    background jobs (`plr study ... &` in a script, nohup) with SIGINT ignored, and a run that
    ignores it would train on after the study was stopped.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG
        except OSError:
            pass


class _Process:
    def __init__(self, job: Job, slot: Slot) -> None:
        self.log = open(_log_of(job), "a")  # noqa: SIM115 - closed when the run ends
        argv = _argv(job)
        _mark(self.log, f"start {' '.join(argv[2:])}   (slot {slot.name})")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(argv, env={**os.environ, **slot.env, "PYTHONUNBUFFERED": "1"}, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)

    def poll(self) -> int | None:
        code = self.proc.poll()
        if code is not None and not self.log.closed:
            _mark(self.log, f"end exit {code} after {time.perf_counter() - self.t0:.1f} s")
            self.log.close()
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # plr train's Ctrl-C: it says where it stopped, resumable


class Processes:
    """Each run a `plr train` subprocess on this machine (the CPU or the slot's GPU)."""

    def start(self, job: Job, slot: Slot) -> Handle:
        return _Process(job, slot)


class _Done:
    def __init__(self, code: int) -> None:
        self.code = code

    def poll(self) -> int | None:
        return self.code

    def stop(self) -> None:
        pass


class Inline:
    """Each run a call of `runner(job) -> exit code`, in this process, one at a time (tests)."""

    def __init__(self, runner: Callable[[Job], int]) -> None:
        self.runner = runner

    def start(self, job: Job, slot: Slot) -> Handle:
        return _Done(self.runner(job))


# --- SLURM through submitit -----------------------------------------------------------------------

GENERIC = ("timeout_min", "mem_gb", "nodes", "cpus_per_task", "gpus_per_node", "tasks_per_node")


def _submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise PlrError("--launcher slurm needs submitit: pip install 'plr[slurm]'") from None
    return submitit


def slurm_resources(sets: Sequence[str] = ()) -> tuple[dict[str, Any], int]:
    """The resources of each submission, from `conf/hydra/launcher/slurm.yaml` and `--slurm KEY=VALUE`,
    and how many runs may be submitted at once (its array_parallelism).

    Raises:
        PlrError: a --slurm that is not KEY=VALUE, or a key submitit's SLURM executor does not know.
    """
    import yaml
    from omegaconf import OmegaConf

    SlurmExecutor = _submitit().SlurmExecutor
    base = OmegaConf.to_container(OmegaConf.load(SLURM_YAML), resolve=False)
    assert isinstance(base, dict)
    for key in ("defaults", "submitit_folder"):  # Hydra's own: the study keeps submitit's files in <out>/.submitit
        base.pop(key, None)
    valid = set(GENERIC) | set(SlurmExecutor._valid_parameters())
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise PlrError(f"--slurm '{item}' is not KEY=VALUE (e.g. --slurm partition=gpu)")
        if key not in valid and key != "array_parallelism":
            raise PlrError(f"--slurm {key}: not a resource submitit's SLURM executor knows; use one of "
                           f"{', '.join(sorted(valid | {'array_parallelism'}))}")
        base[key] = yaml.safe_load(value)
    for key in GENERIC:  # submitit asserts these types at submission: refuse a wrong one now, in one line
        if base.get(key) is not None:
            check_type(f"--slurm {key}", base[key], float if key == "mem_gb" else int, fix="fix that --slurm")
    parallel = base.pop("array_parallelism", 64)
    if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1:
        raise PlrError(f"--slurm array_parallelism={parallel!r} must be a whole number >= 1")
    return {k: v for k, v in base.items() if v is not None}, parallel


def _executor_parameters(resources: Mapping[str, Any]) -> dict[str, Any]:
    return {k if k in GENERIC else f"slurm_{k}": v for k, v in resources.items()}


def check_slurm() -> None:
    """Raises PlrError where no SLURM submits (no sbatch on the PATH)."""
    if shutil.which("sbatch") is None:
        raise PlrError("--launcher slurm: no SLURM on this machine (sbatch not found); run plr study on a "
                       "machine that submits to the cluster, or try the submissions here with "
                       "--launcher submitit-local")


class Submitit:
    """Each run one SLURM job submitted through submitit (`cluster="local"`: submitit's local executor,
    which runs the same submission on this machine)."""

    def __init__(self, folder: Path, resources: Mapping[str, Any], cluster: str = "slurm") -> None:
        submitit = _submitit()
        if cluster == "slurm":
            check_slurm()
        self.resources = dict(resources)
        self.executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
        try:
            self.executor.update_parameters(**_executor_parameters(self.resources))
        except (AssertionError, NameError, ValueError, TypeError) as e:
            raise PlrError(f"--slurm: submitit refused the resources ({first_line(e)}); fix them") from None

    def start(self, job: Job, slot: Slot) -> Handle:
        self.executor.update_parameters(name=f"plr-{job.task}-{job.arm}-s{job.seed}")
        return _Submitted(self.executor.submit(run_logged, _argv(job), dict(slot.env), str(_log_of(job))))


class _Submitted:
    def __init__(self, job: Any) -> None:
        self.job = job

    def poll(self) -> int | None:
        if not self.job.done():
            return None
        try:
            return int(self.job.result())
        except Exception:  # noqa: BLE001 - the SLURM job itself failed (timeout, node failure): the run failed
            return 1

    def stop(self) -> None:
        try:
            self.job.cancel(check=False)
        except Exception:  # noqa: BLE001 - already gone
            pass


# --- the scheduler --------------------------------------------------------------------------------

@contextmanager
def _term_is_interrupt() -> Iterator[None]:
    """SIGTERM stops the study as Ctrl-C does (its runs are asked to stop, and a rerun resumes)."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    try:
        before = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def run(jobs: Sequence[Job], launcher: Launcher, slots: Sequence[Slot], *, ok: Callable[[Job], bool],
        ready: Callable[[Path], bool], echo: Callable[[str], None] = print, poll_s: float = 0.2,
        resolve: Callable[[Job], Job | None] | None = None) -> list[Failure]:
    """Run every job, up to one per slot at once, each after the runs it reads; return the failures.

    Args:
        jobs: in plan order (the order they start in when slots are free).
        ok: whether a job that exited 0 left a finished run.
        ready: whether a run dir a job reads, that is not among `jobs`, has finished.
        resolve: a waiting job (`Job.waits`) at its grid's choice, called once every run of the grid
            has ended (None: no grid run finished, and the job is skipped); a finished run is reused.
    """
    pending = list(jobs)
    planned = {j.run_dir for j in jobs}
    good: set[Path] = set()
    failures: list[Failure] = []
    bad: set[Path] = set()
    free = list(slots)
    running: dict[Path, tuple[Job, Slot, Handle, float]] = {}
    n, started = len(jobs), 0
    t_study, run_s, ran = time.perf_counter(), 0.0, 0
    with _term_is_interrupt():
        try:
            while pending or running:
                progressed = False
                for job in list(pending):
                    failed_dep = next((d for d in job.after if d in bad or (d not in planned and not ready(d))), None)
                    if failed_dep is not None:
                        pending.remove(job)
                        echo(f"[plr] study: skip {job.run_dir} (the run it reads, {failed_dep}, did not finish)")
                        failures.append(Failure(job, f"skipped: {failed_dep} did not finish"))
                        bad.add(job.run_dir)
                        progressed = True
                        continue
                    if job.waits:
                        if any(d in planned and d not in good | bad for _, d in job.grid):
                            continue  # the grid still runs
                        pending.remove(job)
                        progressed = True
                        chosen = resolve(job) if resolve is not None else None
                        if chosen is None:
                            echo(f"[plr] study: skip {job.run_dir} (no run of its grid finished)")
                            failures.append(Failure(job, "skipped: no run of its tuning grid finished"))
                            bad.add(job.run_dir)
                        elif ready(chosen.run_dir):
                            echo(f"[plr] study: {chosen.run_dir} (the grid's choice) finished already; reused")
                            good.add(chosen.run_dir)
                        else:
                            echo(f"[plr] study: the grid chose {chosen.arm} for {job.task}; seed {job.seed} runs "
                                 f"at it")
                            pending.insert(0, chosen)
                            planned.add(chosen.run_dir)
                        continue
                    if not free or any(d in planned and d not in good for d in job.after):
                        continue
                    slot = free.pop(0)
                    pending.remove(job)
                    started += 1
                    echo(f"[plr] study {started}/{n} [{slot.name}]: {' '.join(job.command())}")
                    progressed = True
                    try:
                        running[job.run_dir] = (job, slot, launcher.start(job, slot), time.perf_counter())
                    except (OSError, RuntimeError, ValueError) as e:  # e.g. sbatch refused the submission
                        free.insert(0, slot)
                        bad.add(job.run_dir)
                        failures.append(Failure(job, f"not started: {first_line(e) or type(e).__name__}"))
                        echo(f"[plr] study: could not start {job.run_dir} ({first_line(e)}); the study goes on")
                for key, (job, slot, handle, t0) in list(running.items()):
                    code = handle.poll()
                    if code is None:
                        continue
                    del running[key]
                    free.insert(0, slot)
                    progressed = True
                    elapsed = time.perf_counter() - t0
                    run_s += elapsed
                    if code == 0 and ok(job):
                        good.add(job.run_dir)
                        ran += 1
                        echo(f"[plr] study: done {job.run_dir} in {elapsed:.0f} s")
                    else:
                        bad.add(job.run_dir)
                        failures.append(Failure(job, f"exit {code}"))
                        echo(f"[plr] study: run failed (exit {code}): {job.run_dir}; log {job.log}; the study goes on")
                if not progressed:
                    time.sleep(poll_s)
        except KeyboardInterrupt:
            for job, _, handle, _ in running.values():
                handle.stop()
            deadline = time.monotonic() + 60
            while running and time.monotonic() < deadline:
                for key, (_, _, handle, _) in list(running.items()):
                    if handle.poll() is not None:
                        del running[key]
                time.sleep(0.2)
            echo(f"[plr] study: stopped; {len(good)} run(s) finished this time. Run the same command again to "
                 "resume: finished runs are reused, stopped ones continue from their checkpoints")
            raise
    if started:
        what = f"; {len(failures)} failed or skipped" if failures else ""
        echo(f"[plr] study: {ran} run(s) finished in {duration(time.perf_counter() - t_study)} of wall clock, "
             f"{duration(run_s)} of run time in all{what}")
    return failures


def duration(seconds: float) -> str:
    """A time as the study prints it: seconds under two minutes, minutes under 90, else hours."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"
