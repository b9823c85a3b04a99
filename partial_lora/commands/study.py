"""`plr study`: the claims study's command line: its parser, the plan it prints (`--dry-run`), the
slots and launcher it runs on, and the study it runs and writes (`partial_lora.study`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from partial_lora import ownership, rundir
from partial_lora.commands import Parser
from partial_lora.errors import PlrError, fail, one_line_errors


def study_parser() -> argparse.ArgumentParser:
    from partial_lora.study import ARMS
    from partial_lora.study.suite import OFFLINE, builtin

    def names(text: str) -> list[str]:
        return [t for t in text.replace(",", " ").split() if t]

    def numbers(flag: str):
        def parse(text: str) -> list[int]:
            try:
                return [int(t) for t in names(text)]
            except ValueError:
                raise argparse.ArgumentTypeError(f"{flag} takes whole numbers, got '{text}'") from None
        return parse

    def count(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--jobs takes a whole number, got '{text}'") from None

    parser = Parser(prog="plr study", description="The claims study: every (task, arm, seed) of a suite is an "
                     "ordinary `plr train` run in <out>/runs/<model>/<task>/<arm>/seed<n> (finished runs are reused, "
                     "an unfinished one resumes; its output goes to <out>/logs/<model>/<task>/<arm>/seed<n>.log), then "
                     "study.md / study.csv / study.png with each claim judged on paired differences (hierarchical "
                     f"bootstrap CI). Built-in suites (partial_lora/study/suites/): {', '.join(builtin())}; without "
                     f"--suite: {', '.join(OFFLINE)}. Arms: "
                     + "; ".join(f"{a.name} ({a.about})" for a in ARMS.values()),
                     epilog="Overrides after -- go to every run, e.g. -- trainer.num_workers=16 (-- model=NAME runs "
                     "the suite on another model, in its own <model> folder)")
    parser.add_argument("--suite", type=names, metavar="S", help="the suite(s) to run: a built-in name ("
                        + ", ".join(builtin()) + ") or a suite file (path/to/mine.yaml); comma separated")
    parser.add_argument("--model", type=names, metavar="M", help="the same as --suite, for the offline suites "
                        "(named after their models): " + ", ".join(OFFLINE))
    parser.add_argument("--tasks", type=names, metavar="T", help="narrow to these tasks (comma or space separated)")
    parser.add_argument("--seeds", type=numbers("--seeds"), metavar="S", help="narrow to these seeds")
    parser.add_argument("--arms", type=names, metavar="A", help="narrow to these arms (the Partial-LoRA run that "
                        "an arm reads is added)")
    parser.add_argument("--variant", metavar="NAME", help="run another reading of Partial-LoRA under this name: "
                        "its --set overrides go to the arms built on Partial-LoRA (run dirs <arm>@NAME; uniform and "
                        "lora-matched match its budget); the other arms are shared with the default reading")
    parser.add_argument("--set", dest="variant_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="an override of the --variant (repeat for several)")
    parser.add_argument("--tune", metavar="KEY=V1,V2,...", help="tune a setting per arm, e.g. --tune "
                        "retrain.lr=2e-3,5e-3,1e-2,2e-2,5e-2: for each (task, arm) every value runs on the choice "
                        "seed (the suite's smallest seed, 0 in every built-in suite), the value with the best "
                        "validation main metric is chosen (ties to the smaller; no test number chooses), and the "
                        "other seeds run at it (the chosen value's choice-seed run is reused). Runs go to "
                        "<arm>+KEY+VALUE/seed<n>; the arm's own dir keeps the shared setting. The head arm is not "
                        "tuned. Overrides the suite's tune:; --tune none turns it off")
    parser.add_argument("--out", type=Path, metavar="DIR", help="the study folder (default: the suite's, "
                        "outputs/study for the offline suites, else outputs/study-<suite>)")
    parser.add_argument("--jobs", type=count, metavar="N", help="run up to N runs at once on this machine's CPU; "
                        "each gets cores // N threads (default 1: one run with all the cores)")
    parser.add_argument("--gpus", type=numbers("--gpus"), metavar="IDS", help="CUDA device ids, e.g. 0,1,2,3: one "
                        "run per GPU at a time (CUDA_VISIBLE_DEVICES); list an id twice for two runs on it")
    parser.add_argument("--launcher", choices=("process", "slurm", "submitit-local"), default="process",
                        help="process (default): runs on this machine; slurm: each run one SLURM job, submitted "
                        "through submitit with the resources of partial_lora/conf/hydra/launcher/slurm.yaml; "
                        "submitit-local: the same submissions run by submitit's local executor (a check before "
                        "a cluster)")
    parser.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE", help="a resource of every "
                        "SLURM job, e.g. --slurm partition=gpu --slurm timeout_min=240 (repeat for several)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (what runs, what is reused, "
                        "where); run nothing")
    parser.add_argument("--tables-only", action="store_true",
                        help="write the tables from the finished runs; run nothing")
    parser.add_argument("--keep-stale", action="store_true", help="reuse finished runs made with other settings than "
                        "their arm has now (by default they run again from the first stage that differs)")
    parser.add_argument("--bootstrap", type=int, default=2000, metavar="N", help="bootstrap replicates (default 2000)")
    parser.add_argument("--compare", nargs=2, action="append", metavar=("METHOD", "CONTROL"),
                        help="print the paired difference of two finished arms (e.g. partial@a partial@b), per task "
                        "and pooled, with its CI, on the runs that --suite/--tasks/--seeds leave; run nothing, write "
                        "nothing (repeat for several pairs)")
    return parser


def _study_folder(args: argparse.Namespace, suites: list) -> Path:
    if args.out is not None:
        return args.out
    folders = sorted({str(s.folder) for s in suites})
    if len(folders) > 1:
        raise PlrError(f"the suites {', '.join(s.name for s in suites)} keep their runs in different folders "
                       f"({', '.join(folders)}); run them one at a time, or give --out DIR")
    return Path(folders[0])


def _slots_and_launcher(args: argparse.Namespace, out: Path):
    """The slots of `--jobs`, `--gpus` or `--launcher`, checked, and a function that makes the launcher
    (called only when the study runs: submitit creates its folder)."""
    from partial_lora.study import schedule

    if args.jobs is not None and args.jobs < 1:
        raise PlrError(f"--jobs {args.jobs}: run at least one run at a time (--jobs 1 or more)")
    if args.launcher != "process":
        if args.gpus is not None:
            raise PlrError(f"--gpus is for runs on this machine; with --launcher {args.launcher} each SLURM job gets "
                           "its GPUs from --slurm gpus_per_node=N")
        resources, parallel = schedule.slurm_resources(args.slurm)
        slots = [schedule.Slot(f"slurm{i}", {}) for i in range(args.jobs or parallel)]
        cluster = "slurm" if args.launcher == "slurm" else "local"
        if cluster == "slurm" and not args.dry_run:
            schedule.check_slurm()
        return slots, lambda: schedule.Submitit(out / ".submitit", resources, cluster=cluster), resources
    if args.slurm:
        raise PlrError("--slurm sets the resources of SLURM jobs; add --launcher slurm")
    if args.gpus is not None:
        if args.jobs is not None:
            raise PlrError("give --jobs or --gpus, not both: with --gpus one run goes to each GPU at a time (list an "
                           "id twice, --gpus 0,0,1,1, for two runs per GPU)")
        return schedule.gpu_slots(args.gpus, check=not args.dry_run), schedule.Processes, None
    return schedule.cpu_slots(1 if args.jobs is None else args.jobs), schedule.Processes, None


def _grid_lines(jobs: list) -> list[str]:
    """One line per (task, arm) tuning grid: each value's validation score on the choice seed, and the choice."""
    from partial_lora.study import grid
    from partial_lora.study.run import finished, val_score

    grids: dict[tuple, list] = {}
    for job in jobs:
        base, key, value = grid.split(job.arm)
        if key is not None and not job.waits:
            grids.setdefault((job.model, job.task, base, key, job.seed), []).append((value, job.run_dir))
    lines = []
    for (model, task, arm, key, seed), runs in grids.items():
        scores = {v: val_score(finished(d)) for v, d in runs}
        done = sum(finished(d) is not None for _, d in runs)
        cells = " · ".join(f"{v} {'-' if scores[v] is None else format(scores[v], '.4f')}" for v, _ in runs)
        chosen = grid.choose(scores)
        side = grid.edge(scores, chosen)
        edge = "" if side is None else \
            f" (the grid's {side} value: widen the grid {'below' if side == 'lowest' else 'above'} it)"
        choice = (f"-> {chosen}{edge}" if done == len(runs) else
                  f"-> chosen when the grid has run ({done} of {len(runs)} finished)")
        lines.append(f"tune  {model}/{task}/{arm} {key} on seed {seed} (validation): {cells} {choice}")
    return lines


def _print_plan(jobs: list, slots: list, resources: dict | None, out: Path) -> None:
    from partial_lora.study import grid
    from partial_lora.study.estimate import estimate
    from partial_lora.study.run import finished, grid_state, resolve, restored_sources, stale

    groups: dict[str, list] = {}
    for job in jobs:
        groups.setdefault(job.model, []).append(job)
    for model, js in groups.items():
        tasks, seeds = ({getattr(j, k) for j in js} for k in ("task", "seed"))
        arms = {grid.split(j.arm)[0] for j in js}
        tuned = any(grid.split(j.arm)[1] for j in js)
        print(f"[plr] study: {model}: {len(tasks)} task(s) x {len(arms)} arm(s) x {len(seeds)} seed(s)"
              + (f", and the tuning grid: {len(js)} runs" if tuned else f" = {len(js)} runs"))
    submit = None if resources is None else "[slurm " + " ".join(f"{k}={v}" for k, v in resources.items()) + "] "
    print(f"[plr] study: {len(slots)} at a time" + (f" ({', '.join(s.name for s in slots)})" if submit is None else
                                                     ", each run one SLURM job with the resources shown"))
    restored = restored_sources(jobs)
    n_done, kinds, todo = 0, {"shared": 0, "grid": 0, "choice": 0}, []
    for job in jobs:
        kinds["choice" if job.waits else "shared" if grid.split(job.arm)[1] is None else "grid"] += 1
        if job.waits:
            known = resolve(job, complete=True)
            if known is None:
                todo.append(job)
                state = grid_state(job)
                print(f"wait  {' '.join(job.command())}   # at the grid's choice ({sum(d for _, d, _ in state)} of "
                      f"{len(state)} grid runs finished)")
                continue
            job = known
        done = finished(job.run_dir) is not None and job.run_dir not in restored
        diff = stale(job) if done else {}
        n_done += done
        todo += [job] if not done or diff else []
        state = "run  " if not done else "stale" if diff else "reuse"
        why = (f"   # made with {rundir.describe(diff, limit=4)}" if diff else
               f"   # restored from the ledger: runs again, {restored[job.run_dir]} run(s) reuse its probe and "
               "allocation" if job.run_dir in restored else "")
        print(f"{state} {submit if submit and state != 'reuse' else ''}{' '.join(job.command())}{why}")
    for line in _grid_lines(jobs):
        print(line)
    tuned = (f" ({kinds['shared']} at the shared setting, {kinds['grid']} on the tuning grid, {kinds['choice']} at "
             "the grid's choice)" if kinds["grid"] else "")
    print(f"[plr] study: {len(jobs)} runs planned{tuned}, {n_done} finished already")
    print(estimate(todo, out / "logs").line(1 if submit else len(slots)))


@one_line_errors()
def study_command(argv: list[str]) -> int:
    from partial_lora import study

    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = study_parser().parse_args(argv)
    if args.bootstrap < 100:
        fail(f"--bootstrap={args.bootstrap} is too few replicates for a 95% CI; use 1000 or more")
    try:
        if args.suite is not None and args.model is not None:
            raise PlrError("--model is another name for --suite; give one of them")
        named = args.suite if args.suite is not None else args.model
        from partial_lora.study import grid

        tune = True if args.tune is None else grid.parse(args.tune)
        sel = study.Selection(named, args.tasks, args.seeds, args.arms, extra, args.variant, args.variant_overrides,
                              tune)
        suites = sel.resolved()
        out = _study_folder(args, suites)
        jobs = study.plan(out, sel)
        if args.compare:
            from partial_lora.study.claims import collect, comparison_markdown, comparison_rows

            models = None if named is None else sorted({j.model for j in jobs})
            runs = collect(out).narrow(models, args.tasks, args.seeds)
            print(comparison_markdown(comparison_rows(runs, args.compare, n_boot=args.bootstrap)), end="")
            return 0
        failed = []
        if not args.tables_only:
            slots, launcher, resources = _slots_and_launcher(args, out)
            study.check(jobs)
            if args.dry_run:
                _print_plan(jobs, slots, resources, out)
                return 0
            with ownership.locked(out, what="study folder", other="give this study another --out"):
                failed = study.execute(jobs, launcher=launcher(), slots=slots, keep_stale=args.keep_stale, out=out)
                written = study.write(out, n_boot=args.bootstrap)
        else:
            from partial_lora.study.claims import collect

            collect(out)  # a folder with no runs is refused before the lock creates it
            with ownership.locked(out, what="study folder", other="give this study another --out"):
                written = study.write(out, n_boot=args.bootstrap)
    except KeyboardInterrupt:
        return 130
    print(written[0].read_text(), end="")
    print(f"[plr] study: wrote {', '.join(str(p) for p in written)}")
    if failed:
        print(f"[plr] study: {len(failed)} run(s) failed or were skipped; the same command resumes them:")
        for f in failed:
            print(f"  {f.job.run_dir}  ({f.why}; log {f.job.log})")
        print(f"plr: error: {len(failed)} run(s) of the study failed or were skipped: "
              f"{', '.join(str(f.job.run_dir) for f in failed[:3])}{', ...' if len(failed) > 3 else ''}",
              file=sys.stderr)
        return 1
    return 0
