"""Generate docs/results.md and the README's results summary from the ledger: no figure is typed.

    make results                       # = .venv/bin/python experiments/results.py
    .venv/bin/python experiments/results.py --check   # exit 1 if docs/results.md is older than the ledger

The ledger (`docs/results/study-runs.jsonl`, one line per finished study run, and the test-split
predictions beside it; `experiments/ledger.py` writes it) is the only source. This script:
1. restores the ledger into a temporary study folder (`experiments/ledger.py --restore`);
2. runs `plr study --out <that folder> --tables-only`, which writes study.md (every arm, each claim
   per task and pooled with its paired bootstrap CI and verdict, the default rule, the allocation
   searches, the tuning grids and the method table), study.csv and study.png;
3. writes `docs/results.md`: the offline-benchmarks table (`experiments/offline_table.py --ledger`)
   and study.md, under a header naming the ledger's digest, and copies the plot to
   `docs/results/study.png`;
4. rewrites the README's block between `<!-- results:begin -->` and `<!-- results:end -->`: the
   pooled claims of each model (at the shared learning rate, and, in the same row, at each arm's tuned one
   where a grid ran)
   and the method table, read from study.csv and method-table.md.

The bootstrap's resampling seed is fixed, so the same ledger gives the same files. `--check` only
compares the digest recorded in docs/results.md with the ledger's (a test runs it).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEDGER = ROOT / "docs" / "results" / "study-runs.jsonl"
RESULTS = ROOT / "docs" / "results.md"
README = ROOT / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
DIGEST = "ledger digest: "
# The readings the README's block shows (docs/results.md shows every one): the default (no variant) and the
# element-mask reading that leads the method search.
README_READINGS = (None, "p25elem")

sys.path.insert(0, str(ROOT / "experiments"))
import ledger as ledger_mod  # noqa: E402
import offline_table  # noqa: E402


def digest(ledger: Path) -> str:
    """sha256 over the ledger and every predictions file it names (what the tables are made from)."""
    h = hashlib.sha256(ledger.read_bytes())
    for rec in sorted(ledger_mod.read(ledger).values(), key=lambda r: (r["model"], r["task"], r["arm"], r["seed"])):
        if "predictions" in rec:
            h.update((ledger.parent / rec["predictions"]).read_bytes())
    return h.hexdigest()[:16]


def recorded_digest(results: Path) -> str | None:
    if not results.exists():
        return None
    for line in results.read_text().splitlines()[:10]:
        if DIGEST in line:
            return line.split(DIGEST, 1)[1].split()[0].strip("`.)")
    return None


def _shown(arm: str) -> bool:
    """Whether an arm (or `<arm>@<reading>`, with a `+key+value` tuning suffix) is of a README reading."""
    reading = arm.split("+", 1)[0].partition("@")[2] or None
    return reading in README_READINGS


def _pooled(study_csv: Path) -> list[str]:
    """The claim rows of study.csv for the README's readings, as a markdown table: one row per claim, pooled
    over a model's tasks (a model with one task: that task's row), at the shared rate and, where a grid ran,
    at each arm's tuned rate. The shared -> tuned rows cover the tasks the grid ran on, pooled over those
    alone; where they are not all the model's tasks, the model's pooled row at the shared rate is its own row."""
    with study_csv.open() as f:
        rows = [r for r in csv.DictReader(f) if r["kind"].startswith("claim")
                and _shown(r["arm_or_claim"].split(": ", 1)[1].split(" - ")[0])]
    groups: dict[tuple[str, str], list[dict[str, str]]] = {}  # (model, kind) -> its rows
    for row in rows:
        groups.setdefault((row["model"], row["kind"]), []).append(row)
    cells: dict[tuple[str, str, str], dict[str, str]] = {}
    for (model, kind), group in groups.items():
        tasks = sorted({r["task"] for r in group if r["task"] != "pooled"})
        pooled = len(tasks) > 1 and any(r["task"] == "pooled" for r in group)
        for row in group:
            if (row["task"] == "pooled") != pooled:
                continue
            where = f"pooled ({len(tasks)} tasks)" if pooled else row["task"]
            setting = "tuned" if kind.startswith("claim tuned") else "shared"
            cells.setdefault((model, where, row["arm_or_claim"]), {})[setting] = (
                f"{float(row['mean']):+.2f} [{float(row['ci_low']):+.2f}, {float(row['ci_high']):+.2f}] | "
                f"{row['verdict']} | {row['seeds']}")
    lines = ["| model | task | claim: method − control | shared lr: difference (pts) [95% CI] | verdict | seeds | "
             "each at its tuned lr | verdict | seeds |", "|---|---|---|---|---|---|---|---|---|"]
    for (model, task, claim), at in sorted(cells.items(), key=lambda kv: kv[0][0]):  # stable: the CSV's order
        lines.append(f"| {model} | {task} | {claim} | {at.get('shared', '- | - | -')} | "
                     f"{at.get('tuned', '- | - | -')} |")
    return lines


def summary(study_dir: Path, ledger: Path, n_runs: int, key: str) -> str:
    """The README's generated block."""
    out = [BEGIN, f"<!-- generated by `make results` from {ledger.relative_to(ROOT)} ({n_runs} runs; "
           f"{DIGEST}{key}); do not edit by hand -->", "",
           "Each claim pooled over its model's tasks (paired by seed and test example; "
           "\"matches\" is non-inferiority at −1 point, \"beats\" superiority over 0; "
           "[docs/results.md](docs/results.md) has every task):", "",
           *_pooled(study_dir / "study.csv")]
    table = study_dir / "method-table.md"
    if table.exists():
        rows = [line for line in table.read_text().splitlines() if line.startswith("|")]
        kept = rows[:2] + [r for r in rows[2:] if _shown(r.split("|")[2].strip())]
        out += ["", "Each arm pooled over its model's tasks (the method table; test: the tasks' main metric; the "
                "difference and CI against dense LoRA r=8 in points; wall time per run on the 2-core CPU):", "", *kept]
    return "\n".join(out + [END])


def generate(ledger: Path = LEDGER, results: Path = RESULTS, readme: Path = README) -> None:
    key = digest(ledger)
    with tempfile.TemporaryDirectory(prefix="plr-results-") as tmp:
        study_dir = Path(tmp) / "study"
        n_runs = ledger_mod.restore(ledger, study_dir)
        done = subprocess.run([sys.executable, "-m", "partial_lora.cli", "study", "--out", str(study_dir),
                               "--tables-only"], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"plr study --tables-only failed: {done.stderr.strip().splitlines()[-1:]}")
        offline = offline_table.table(study_dir, ledger_mod.read(ledger))
        body = ["# Results (generated)", "",
                f"Generated by `make results` from `{ledger.relative_to(ROOT)}` ({n_runs} runs with predictions; "
                f"{DIGEST}{key}). Do not edit by hand: add runs to the ledger (`experiments/ledger.py`) and "
                "run `make results` again. The dated lab log of how each figure was obtained is "
                "[lab-log.md](lab-log.md).", "",
                "## The offline benchmarks (head, dense LoRA r=8 and r=1)", "", offline.strip(), "",
                "## The claims study", "", "![every arm's metric against its trainable parameters](results/study.png)",
                ""]
        body += [line.replace("# plr study", "## plr study", 1) if line.startswith("# ") else
                 ("#" + line if line.startswith("#") else line)
                 for line in (study_dir / "study.md").read_text().splitlines()]
        results.write_text("\n".join(body).rstrip() + "\n")
        shutil.copyfile(study_dir / "study.png", results.parent / "results" / "study.png")
        text = readme.read_text()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            tail = rest.split(END, 1)[1]
            readme.write_text(head + summary(study_dir, ledger, n_runs, key) + tail)
    print(f"wrote {results.relative_to(ROOT)}, docs/results/study.png and the README's results block "
          f"({n_runs} runs; {DIGEST}{key})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ledger", type=Path, default=LEDGER)
    ap.add_argument("--check", action="store_true", help="only check that docs/results.md matches the ledger")
    args = ap.parse_args()
    if args.check:
        want, got = digest(args.ledger), recorded_digest(RESULTS)
        if want != got:
            print(f"docs/results.md was made from another ledger ({got}, the ledger is {want}); run `make results`")
            return 1
        print(f"docs/results.md matches the ledger ({want})")
        return 0
    generate(args.ledger)
    return 0


if __name__ == "__main__":
    sys.exit(main())
