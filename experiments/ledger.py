"""Keep the study's finished runs in a small file in the repo, so a table outlives its run dirs.

    .venv/bin/python experiments/ledger.py [--out outputs/study] [--into docs/results/study-runs.jsonl]
    .venv/bin/python experiments/ledger.py --restore outputs/study-ledger   # then: plr study --tables-only

Run dirs live on one machine; a lost machine loses every figure that only they hold. This walks
`<out>/runs/<model>/<task>/<arm>/seed<n>/results.json` and merges each complete run into the
ledger, one JSON line per run, keyed by (model, task, arm, seed): a run already there is replaced
by its newer record. Each line keeps what the tables read (the main metric, the val/test metrics,
adapter parameters, wall time per stage, the retrain's peak memory) and where it came from (the plr
commit, the date). An arm is its run dir's name as it is: `partial@gain` (a variant), `partial+retrain.lr+0.01`
(a tuned run of `plr study --tune`).

Each run's test-split predictions (what the paired bootstrap CIs of `plr study` pair example by
example) are kept beside the ledger, `<ledger dir>/predictions/<model>/<task>/<arm>/seed<n>.parquet`,
and the record names the file. `--restore DIR` writes the ledger back as slim run dirs under
`DIR/runs/...` (results.json and evaluate/predictions.parquet): `plr study --out DIR --tables-only`
then writes study.md, with its claims table, from them. A restored dir serves tables only: it holds
no probe or allocation, so arms that read a Partial-LoRA run (`from_run`) cannot run against it.

`experiments/offline_table.py --ledger <file>` prints the offline table from the ledger.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

KEEP = ("main_metric", "metrics", "params", "wall_s", "peak_memory", "label", "git")
PREDICTIONS = Path("evaluate") / "predictions.parquet"  # a run dir's per-example predictions (artifacts.py)
RESTORED = "RESTORED"  # marks a slim run dir written by --restore


def record(run: Path, model: str, task: str, arm: str, seed: int) -> dict | None:
    try:
        r = json.loads((run / "results.json").read_text())
    except (OSError, ValueError):
        return None
    if r.get("status") != "complete":
        return None
    when = time.strftime("%Y-%m-%d", time.gmtime((run / "results.json").stat().st_mtime))
    return {"model": model, "task": task, "arm": arm, "seed": seed, "finished": when,
            **{k: r[k] for k in KEEP if k in r}}


def read(path: Path) -> dict[tuple, dict]:
    """The ledger's records by (model, task, arm, seed); an absent file is an empty ledger."""
    if not path.exists():
        return {}
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                r = json.loads(line)
                out[(r["model"], r["task"], r["arm"], int(r["seed"]))] = r
            except (ValueError, KeyError) as e:
                raise SystemExit(f"ledger {path} line {n} is not a run record ({e}); fix or remove that line")
    return out


def _keep_predictions(run: Path, rec: dict, into: Path) -> None:
    """Copy the run's test-split predictions beside the ledger and name the file in the record."""
    import pandas as pd

    src = run / PREDICTIONS
    if not src.exists():
        return
    df = pd.read_parquet(src)
    df = df[df["split"] == "test"].reset_index(drop=True)
    rel = Path("predictions") / rec["model"] / rec["task"] / rec["arm"] / f"seed{rec['seed']}.parquet"
    dest = into.parent / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    df.to_parquet(tmp, index=False)
    tmp.replace(dest)
    rec["predictions"] = rel.as_posix()


def merge(out: Path, into: Path) -> tuple[int, int]:
    """Merge `out`'s finished runs into the ledger `into`; (records now, records added or replaced)."""
    ledger = read(into)
    changed = 0
    for res in sorted((out / "runs").glob("*/*/*/seed*/results.json")):
        run = res.parent
        if (run / RESTORED).exists():
            continue  # the ledger's own copy
        arm_dir, task_dir, model_dir = run.parent, run.parent.parent, run.parent.parent.parent
        rec = record(run, model_dir.name, task_dir.name, arm_dir.name, int(run.name[4:]))
        if rec is None:
            continue
        _keep_predictions(run, rec, into)
        key = (rec["model"], rec["task"], rec["arm"], rec["seed"])
        if ledger.get(key) != rec:
            ledger[key] = rec
            changed += 1
    into.parent.mkdir(parents=True, exist_ok=True)
    tmp = into.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(ledger[k], sort_keys=True) + "\n" for k in sorted(ledger)))
    tmp.replace(into)
    return len(ledger), changed


def restore(into: Path, dest: Path) -> int:
    """Write the ledger's runs that kept their predictions as slim run dirs under `dest/runs`; how many."""
    import shutil

    n = 0
    for (model, task, arm, seed), rec in read(into).items():
        if "predictions" not in rec:
            continue
        src = into.parent / rec["predictions"]
        if not src.exists():
            raise SystemExit(f"ledger {into}: {model}/{task}/{arm}/seed{seed} names {src}, which is missing; "
                             "merge that run again or drop its line")
        run = dest / "runs" / model / task / arm / f"seed{seed}"
        if run.exists() and not (run / RESTORED).exists():
            raise SystemExit(f"{run} is a real run dir; restore into another folder (--restore DIR)")
        (run / PREDICTIONS.parent).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, run / PREDICTIONS)
        results = {"status": "complete", **{k: rec[k] for k in KEEP if k in rec}}
        (run / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))
        (run / RESTORED).write_text(f"written from {into} by experiments/ledger.py --restore\n")
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("outputs/study"), help="the study dir (plr study --out)")
    ap.add_argument("--into", type=Path, default=Path("docs/results/study-runs.jsonl"))
    ap.add_argument("--restore", type=Path, metavar="DIR",
                    help="write the ledger's runs with predictions as slim run dirs under DIR (for plr study "
                         "--out DIR --tables-only), instead of merging")
    args = ap.parse_args()
    if args.restore is not None:
        n = restore(args.into, args.restore)
        print(f"{args.restore}/runs: {n} runs restored from {args.into}; now: plr study --out {args.restore} "
              "--tables-only")
        return
    if not (args.out / "runs").is_dir():
        raise SystemExit(f"{args.out} has no runs/ folder; pass the study dir with --out")
    total, changed = merge(args.out, args.into)
    print(f"{args.into}: {total} runs ({changed} added or updated from {args.out})")


if __name__ == "__main__":
    main()
