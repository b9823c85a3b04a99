"""Keep the study's finished runs in a small file in the repo, so a table outlives its run dirs.

    .venv/bin/python experiments/ledger.py [--out outputs/study] [--into docs/results/study-runs.jsonl]

Run dirs live on one machine; a lost machine loses every figure that only they hold. This walks
`<out>/runs/<model>/<task>/<arm>/seed<n>/results.json` and merges each complete run into the
ledger, one JSON line per run, keyed by (model, task, arm, seed): a run already there is replaced
by its newer record. Each line keeps what the tables read (the main metric, the val/test metrics,
adapter parameters, wall time per stage) and where it came from (the plr commit, the date). Not the
per-example predictions: the paired bootstrap CIs of `plr study` still need the run dirs.

`experiments/offline_table.py --ledger <file>` prints the offline table from the ledger.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

KEEP = ("main_metric", "metrics", "params", "wall_s", "label", "git")


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


def merge(out: Path, into: Path) -> tuple[int, int]:
    """Merge `out`'s finished runs into the ledger `into`; (records now, records added or replaced)."""
    ledger = read(into)
    changed = 0
    for res in sorted((out / "runs").glob("*/*/*/seed*/results.json")):
        run = res.parent
        arm_dir, task_dir, model_dir = run.parent, run.parent.parent, run.parent.parent.parent
        rec = record(run, model_dir.name, task_dir.name, arm_dir.name, int(run.name[4:]))
        if rec is None:
            continue
        key = (rec["model"], rec["task"], rec["arm"], rec["seed"])
        if ledger.get(key) != rec:
            ledger[key] = rec
            changed += 1
    into.parent.mkdir(parents=True, exist_ok=True)
    tmp = into.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(ledger[k], sort_keys=True) + "\n" for k in sorted(ledger)))
    tmp.replace(into)
    return len(ledger), changed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("outputs/study"), help="the study dir (plr study --out)")
    ap.add_argument("--into", type=Path, default=Path("docs/results/study-runs.jsonl"))
    args = ap.parse_args()
    if not (args.out / "runs").is_dir():
        raise SystemExit(f"{args.out} has no runs/ folder; pass the study dir with --out")
    total, changed = merge(args.out, args.into)
    print(f"{args.into}: {total} runs ({changed} added or updated from {args.out})")


if __name__ == "__main__":
    main()
