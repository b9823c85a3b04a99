"""Reproduce the paper's benchmark tables: Hydra multirun sweeps, one per GPU, then `plr report`.

    python experiments/reproduce.py vision|glue|commonsense [--gpus 0,1] [--device auto]
        [--seeds 0,1,2] [--tasks a,b] [--methods lora,partial] [--model vit-b] [--out DIR]
        [--dry-run] [-- overrides]

Sweep = tasks × methods × seeds (by default the 8 vision tasks or the 8 GLUE tasks × {dense
LoRA, Partial-LoRA auto} × 3 seeds = 48 runs), with the recipes of `conf/experiment/vtab.yaml`
and `conf/experiment/glue-<task>.yaml`. The tasks are dealt round-robin to the GPUs in `--gpus`;
each GPU runs its share as one `plr train -m` (Hydra's basic launcher, one run after another)
with `CUDA_VISIBLE_DEVICES` set to it. `commonsense` is one multi-task run per method and seed
(the eight commonsense tasks trained jointly on a LLaMA-family model, `conf/experiment/
commonsense.yaml`; `--tasks` picks members): there the seeds are dealt to the GPUs. Every run gets a fixed dir
`<out>/runs/<task>/<method>/seed<seed>`, so running the same command again resumes: finished
stages are skipped. Logs go to `<out>/logs/`, the report to `<out>/report/`.

`make reproduce-vision` / `make reproduce-glue` call this; the `-dry` targets add `--dry-run`,
which prints the commands without running anything.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

VISION_TASKS = ["cifar100", "caltech101", "dtd", "flowers102", "pets", "svhn", "eurosat", "resisc45"]
GLUE_TASKS = ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"]
COMMONSENSE_TASKS = ["boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc-e", "arc-c", "obqa"]


@dataclass(frozen=True)
class Suite:
    """A benchmark: its default tasks, its model, the overrides that sweep a list of tasks, and
    whether one run covers all its tasks (multi-task: the GPUs then share out the seeds)."""

    tasks: list[str]
    default_model: str | None
    task_overrides: Callable[[list[str]], list[str]]
    multi_task: bool = False


SUITES = {
    # one recipe for every vision task: sweep the task
    "vision": Suite(VISION_TASKS, "vit-b", lambda tasks: ["experiment=vtab", "task=" + ",".join(tasks)]),
    # a recipe per GLUE task: sweep the experiment
    "glue": Suite(GLUE_TASKS, None, lambda tasks: ["experiment=" + ",".join(f"glue-{t}" for t in tasks)]),
    # one multi-task run over the eight tasks (or the ones asked for)
    "commonsense": Suite(COMMONSENSE_TASKS, "llama-7b",
                         lambda tasks: ["experiment=commonsense"]
                         + ([] if tasks == COMMONSENSE_TASKS else ["task.names=[" + ",".join(tasks) + "]"]),
                         multi_task=True),
}


def shards(tasks: list[str], gpus: list[str]) -> list[tuple[str, list[str]]]:
    """Tasks dealt round-robin to GPUs; GPUs left without a task are dropped."""
    out = [(g, tasks[i::len(gpus)]) for i, g in enumerate(gpus)]
    return [(g, ts) for g, ts in out if ts]


def commands(args: argparse.Namespace) -> list[tuple[dict[str, str], list[str], Path]]:
    """(environment additions, argv, log file) per GPU shard."""
    suite = SUITES[args.suite]
    out = Path(args.out)
    plr = [sys.executable, "-m", "partial_lora.cli", "train", "-m"]
    cmds = []
    tasks = args.tasks or suite.tasks
    if suite.multi_task:  # one run holds every task: deal the seeds to the GPUs instead
        work = [(gpu, tasks, ",".join(seeds)) for gpu, seeds in shards(args.seeds.split(","), args.gpus.split(","))]
    else:
        work = [(gpu, ts, args.seeds) for gpu, ts in shards(tasks, args.gpus.split(","))]
    for gpu, tasks, seeds in work:
        overrides = [*suite.task_overrides(tasks), f"adapter={args.methods}", f"seed={seeds}",
                     f"trainer.device={args.device}", "trainer.progress=false",
                     f"out_root={out}", f"hydra.sweep.dir={out / 'runs'}",
                     "hydra.sweep.subdir=${task.name}/${label}/seed${seed}"]
        if args.model or suite.default_model:
            overrides.append(f"model={args.model or suite.default_model}")
        env = {} if gpu in ("", "cpu") else {"CUDA_VISIBLE_DEVICES": gpu}
        cmds.append((env, [*plr, *overrides, *args.overrides], out / "logs" / f"gpu{gpu or 'cpu'}.log"))
    return cmds


def shell(env: dict[str, str], argv: list[str]) -> str:
    return " ".join([*(f"{k}={v}" for k, v in env.items()), *map(shlex.quote, argv)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", choices=sorted(SUITES))
    ap.add_argument("--gpus", default="0", help="comma-separated CUDA device ids, one sweep each (cpu: none)")
    ap.add_argument("--device", default="auto", help="trainer.device of every run (auto, cuda, cpu)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--tasks", type=lambda s: [t for t in s.split(",") if t], default=None,
                    help="comma-separated task names (default: the suite's eight)")
    ap.add_argument("--methods", default="lora,partial", help="adapter configs to sweep")
    ap.add_argument("--model", default=None,
                    help="model config (vision default vit-b, e.g. vit-b-timm; commonsense default llama-7b)")
    ap.add_argument("--out", default=None, help="output root (default outputs/reproduce-<suite>)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.overrides = extra  # further Hydra overrides for every run (after --)
    args.out = args.out or f"outputs/reproduce-{args.suite}"
    # glue-<task> experiments exist for the eight GLUE tasks; vision runs any image task config.
    known = set(SUITES[args.suite].tasks) | (_task_configs() if args.suite == "vision" else set())
    unknown = sorted(set(args.tasks or []) - known)
    if unknown:
        ap.error(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    cmds = commands(args)
    report = [sys.executable, "-m", "partial_lora.cli", "report", str(Path(args.out) / "runs"),
              "--out", str(Path(args.out) / "report")]
    n_tasks = 1 if SUITES[args.suite].multi_task else len(args.tasks or SUITES[args.suite].tasks)
    n_runs = n_tasks * len(args.methods.split(",")) * len(args.seeds.split(","))
    print(f"[reproduce] {args.suite}: {n_runs} runs on {len(cmds)} sweep(s); resumable, runs in {args.out}/runs")
    for env, cmd, log in cmds:
        print(f"{shell(env, cmd)} > {log} 2>&1{' &' if len(cmds) > 1 else ''}")
    if len(cmds) > 1:
        print("wait")
    print(shell({}, report))
    if args.dry_run:
        return 0
    procs = []
    for env, cmd, log in cmds:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as f:
            procs.append((subprocess.Popen(cmd, env={**os.environ, **env}, stdout=f, stderr=subprocess.STDOUT), log))
    failed = [str(log) for p, log in procs if p.wait() != 0]
    if failed:
        print(f"[reproduce] sweep(s) failed, see {', '.join(failed)}; the report lists the unfinished runs",
              file=sys.stderr)
    rc = subprocess.call(report)
    return 1 if failed or rc else 0


def _task_configs() -> set[str]:
    conf = Path(__file__).resolve().parents[1] / "partial_lora" / "conf" / "task"
    return {p.stem for p in conf.glob("*.yaml")}


if __name__ == "__main__":
    sys.exit(main())
