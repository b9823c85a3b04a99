"""Run Partial-LoRA's ablations: one Hydra multirun per ablation, then one `plr report` each.

    python experiments/ablate.py NAME[,NAME...]|all [--seeds 0,1,2] [--gpus 0,1] [--device auto]
        [--out DIR] [--dry-run] [-- overrides]

NAME is one of the `conf/experiment/ablation-<NAME>.yaml` files: tau, mode, shots, rank, masks,
granularity, init, lr-scale. Each file sets `label` and declares its sweep in
`hydra.sweeper.params`; this script adds the seeds, fixed run dirs and probe reuse:

1. base (ablations whose probe does not change: all but shots and rank): one default
   Partial-LoRA run per seed in `<out>/base/<task>/seed<seed>`, shared by every ablation in
   `<out>`. A finished base run is reused (its stages are skipped).
2. the sweep: `plr train -m experiment=ablation-<NAME> seed=...` with
   `from_run=<out>/base/${task.name}/seed${seed}` (Hydra resolves it per job), so each run copies
   its seed's probe, and its allocation when the allocation settings are equal. Runs go to
   `<out>/<NAME>/runs/<task>/<label>/seed<seed>`; running the command again resumes.
   `rank` also runs its reference row, a dense LoRA at the budget's rank (label lora-r4).
3. `plr report <out>/<NAME>/runs --out <out>/<NAME>/report`: the ablation's table and plot.

Overrides after `--` go to every run (e.g. `model=vit-b task=flowers102`). A recipe is combined
with the ablation: `-- experiment=vtab` runs `experiment=[vtab,ablation-<NAME>]`. Seeds are dealt
round-robin to the GPUs in `--gpus` (one process chain each, `CUDA_VISIBLE_DEVICES` set; `cpu`:
none). Logs go to `<out>/logs/`. `<out>/ablate.json` records the overrides; a later call with
other overrides is refused, since the fixed run dirs (and the shared base) would mix settings.
`--dry-run` prints the commands and runs nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

EXPERIMENTS = Path(__file__).resolve().parents[1] / "partial_lora" / "conf" / "experiment"
PLR = [sys.executable, "-m", "partial_lora.cli"]
# Extra runs of an ablation, outside its sweep: the dense LoRA at ablation-rank.yaml's budget
# (adapter.match.rank=4). `adapter=partial` with sparsity 0 is dense LoRA that accepts every
# adapter.* override a sparse run does (adapter=lora has no probe/allocation keys).
REFERENCES = {"rank": [["adapter.sparsity=0", "adapter.r=4", "label=lora-r4"]]}


@dataclass(frozen=True)
class Ablation:
    """One `ablation-<name>.yaml`: its swept keys and their values."""

    name: str
    params: dict[str, list[str]]

    @classmethod
    def load(cls, name: str) -> Ablation:
        cfg = yaml.safe_load((EXPERIMENTS / f"ablation-{name}.yaml").read_text())
        params = cfg["hydra"]["sweeper"]["params"]
        return cls(name, {k: str(v).split(",") for k, v in params.items()})

    @property
    def reuses_probe(self) -> bool:
        """Whether every setting can share one probe per seed (the probe's rank and data are not swept)."""
        return not any(k == "adapter.r" or k.startswith("adapter.probe.") for k in self.params)

    @property
    def settings(self) -> int:
        return math.prod(len(v) for v in self.params.values()) + len(REFERENCES.get(self.name, []))


def names() -> list[str]:
    return sorted(p.stem.removeprefix("ablation-") for p in EXPERIMENTS.glob("ablation-*.yaml"))


def split_experiment(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(the recipes selected by `experiment=...` in the overrides, the other overrides)."""
    recipes, rest = [], []
    for o in overrides:
        key, _, value = o.partition("=")
        if key != "experiment":
            rest.append(o)
            continue
        if "," in value and not value.startswith("["):
            raise ValueError(f"{o}: sweeping recipes is not supported here; run ablate.py once per recipe")
        recipes += [v.strip() for v in value.strip("[]").split(",") if v.strip()]
    return recipes, rest


def select(experiments: list[str]) -> list[str]:
    """The override that selects these experiment configs, merged in order (none: no override)."""
    if len(experiments) <= 1:
        return [f"experiment={e}" for e in experiments]
    return [f"experiment=[{','.join(experiments)}]"]


def commands(ablations: list[Ablation], args: argparse.Namespace) -> list[tuple[dict[str, str], list[list[str]], Path]]:
    """Per GPU: (environment additions, the commands it runs one after another, its log file)."""
    out = Path(args.out)
    recipes, rest = split_experiment(args.overrides)
    seeds, gpus = args.seeds.split(","), args.gpus.split(",")
    base_dir = "from_run=" + str(out / "base") + "/${task.name}/seed${seed}"
    shards = []
    for i, gpu in enumerate(gpus):
        shard_seeds = seeds[i::len(gpus)]
        if not shard_seeds:
            continue
        common = [f"seed={','.join(shard_seeds)}", f"trainer.device={args.device}", "trainer.progress=false",
                  f"out_root={out}"]
        cmds = []
        if any(a.reuses_probe for a in ablations):
            cmds.append([*PLR, "train", "-m", *common, f"hydra.sweep.dir={out / 'base'}",
                         "hydra.sweep.subdir=${task.name}/seed${seed}", *args.overrides])
        for a in ablations:
            runs = [f"hydra.sweep.dir={out / a.name / 'runs'}", "hydra.sweep.subdir=${task.name}/${label}/seed${seed}"]
            reuse = [base_dir] if a.reuses_probe else []
            cmds.append([*PLR, "train", "-m", *select(recipes + [f"ablation-{a.name}"]), *common, *runs, *reuse, *rest])
            for ref in REFERENCES.get(a.name, []):
                cmds.append([*PLR, "train", "-m", *select(recipes), *ref, *common, *runs, *rest])
        env = {} if gpu in ("", "cpu") else {"CUDA_VISIBLE_DEVICES": gpu}
        shards.append((env, cmds, out / "logs" / f"gpu{gpu or 'cpu'}.log"))
    return shards


def report_command(a: Ablation, out: Path) -> list[str]:
    return [*PLR, "report", str(out / a.name / "runs"), "--out", str(out / a.name / "report")]


def shell(argv: list[str]) -> str:
    return " ".join(map(shlex.quote, argv))


def check_overrides(out: Path, overrides: list[str]) -> str | None:
    """Record the overrides of `out`'s runs; the reason to refuse when they differ from an earlier call."""
    path = out / "ablate.json"
    if path.exists():
        before = json.loads(path.read_text())["overrides"]
        if before != overrides:
            return (f"{out} holds runs made with the overrides {before}, not {overrides}; use another --out "
                    f"(or delete {path} if the change cannot affect finished runs)")
        return None
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"overrides": overrides}, indent=1) + "\n")
    return None


def run_chain(env: dict[str, str], cmds: list[list[str]], log: Path) -> bool:
    """Run the commands one after another (a failed one does not stop the next); True if all succeeded."""
    log.parent.mkdir(parents=True, exist_ok=True)
    ok = True
    with log.open("a") as f:
        for cmd in cmds:
            f.write(f"$ {shell(cmd)}\n")
            f.flush()
            ok &= subprocess.call(cmd, env={**os.environ, **env}, stdout=f, stderr=subprocess.STDOUT) == 0
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", help=f"comma-separated ablations, or all: {', '.join(names())}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--gpus", default="0", help="comma-separated CUDA device ids; seeds are dealt to them (cpu: none)")
    ap.add_argument("--device", default="auto", help="trainer.device of every run (auto, cuda, cpu)")
    ap.add_argument("--out", default="outputs/ablations", help="output root (default outputs/ablations)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.overrides = extra  # further Hydra overrides for every run (after --)
    chosen = names() if args.names == "all" else [n for n in args.names.split(",") if n]
    unknown = sorted(set(chosen) - set(names()))
    if unknown or not chosen:
        ap.error(f"unknown ablation(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(names())} or all")
    if any(o.partition("=")[0].lstrip("+") in ("seed", "label", "from_run") for o in extra):
        ap.error("seed, label and from_run are set by the driver; use --seeds")
    ablations = [Ablation.load(n) for n in chosen]
    try:
        shards = commands(ablations, args)
    except ValueError as e:
        ap.error(str(e))
    out, n_seeds = Path(args.out), len(args.seeds.split(","))
    for a in ablations:
        reuse = "reuses the base run's probe" if a.reuses_probe else "a probe per run"
        print(f"[ablate] {a.name}: {a.settings} settings x {n_seeds} seed(s) = {a.settings * n_seeds} runs ({reuse}); "
              f"runs in {out / a.name / 'runs'}, report in {out / a.name / 'report'}")
    for env, cmds, log in shards:  # one (...) block per GPU, run in parallel; its commands one after another
        prefix = "".join(f"{k}={v} " for k, v in env.items())
        print("(", *(f"  {prefix}{shell(c)}" for c in cmds), f") >> {log} 2>&1{' &' if len(shards) > 1 else ''}",
              sep="\n")
    if len(shards) > 1:
        print("wait")
    reports = [report_command(a, out) for a in ablations]
    print(*map(shell, reports), sep="\n")
    if args.dry_run:
        return 0
    refused = check_overrides(out, extra)
    if refused:
        print(f"[ablate] error: {refused}", file=sys.stderr)
        return 2
    with ThreadPoolExecutor(len(shards)) as pool:
        ok = list(pool.map(lambda s: run_chain(*s), shards))
    if not all(ok):
        failed = [str(log) for (_, _, log), good in zip(shards, ok) if not good]
        print(f"[ablate] some runs failed, see {', '.join(failed)}; the reports list them", file=sys.stderr)
    rcs = [subprocess.call(cmd) for cmd in reports]
    return 1 if not all(ok) or any(rcs) else 0


if __name__ == "__main__":
    sys.exit(main())
