"""experiments/results.py: docs/results.md and the README's results block are generated from the ledger."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
from fixtures import load_script

ROOT = Path(__file__).resolve().parents[1]


def test_the_committed_results_and_readme_block_were_made_from_the_committed_ledger():
    results = load_script("results")
    want = results.digest(results.LEDGER)
    assert results.recorded_digest(results.RESULTS) == want, "docs/results.md is stale: run `make results`"
    readme = results.README.read_text()
    block = readme.split(results.BEGIN, 1)[1].split(results.END, 1)[0]
    assert f"{results.DIGEST}{want}" in block, "the README's results block is stale: run `make results`"


def _ledger(tmp_path: Path, tuned: bool = False, tuned_tasks: tuple[str, ...] = ("a", "b")) -> Path:
    """A ledger of two tasks x three seeds x {lora, partial, uniform}, with predictions: partial always
    right on the first half of the test examples and wrong on the rest, lora right on 90%. `tuned`: lora
    and partial also at `retrain.lr` 0.01 (a one-value grid) on `tuned_tasks`, where partial is right on
    90% too."""
    into = tmp_path / "docs" / "results" / "study-runs.jsonl"
    rng = np.random.default_rng(0)
    lines = []
    for task in ("a", "b"):
        labels = rng.integers(0, 2, 200)
        arms = [("lora", 0.9), ("partial", 0.5), ("uniform", 0.9)]
        if tuned and task in tuned_tasks:
            arms += [("lora+retrain.lr+0.01", 0.9), ("partial+retrain.lr+0.01", 0.9)]
        for arm, right in arms:
            for seed in range(3):
                ok = np.arange(200) < int(right * 200)
                pred = np.where(ok, labels, 1 - labels)
                rel = Path("predictions") / "m" / task / arm / f"seed{seed}.parquet"
                (into.parent / rel).parent.mkdir(parents=True, exist_ok=True)
                pd.DataFrame({"split": "test", "task": "", "index": np.arange(200), "label": labels,
                              "prediction": pred, "score": np.ones(200, dtype=np.float32)}).to_parquet(
                    into.parent / rel, index=False)
                lines.append({"model": "m", "task": task, "arm": arm, "seed": seed, "main_metric": "accuracy",
                              "metrics": {"test_accuracy": float(ok.mean()), "val_accuracy": float(ok.mean())},
                              "params": {"adapter": 1000 if arm.startswith("lora") else 250,
                                         "dense_lora_same_rank": 1000,
                                         "reduction_pct": 0.0 if arm.startswith("lora") else 75.0},
                              "wall_s": {"retrain": 10.0}, "predictions": rel.as_posix()})
    into.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in lines))
    return into


def test_generate_writes_the_tables_and_only_the_readme_block(tmp_path):
    results = load_script("results")
    ledger = _ledger(tmp_path)
    out, readme = tmp_path / "docs" / "results.md", tmp_path / "README.md"
    readme.write_text(f"# manual\nkept above\n{results.BEGIN}\nold figures\n{results.END}\nkept below\n")
    results.ROOT = tmp_path  # paths in the header are relative to the project
    results.generate(ledger, out, readme)
    text = out.read_text()
    key = results.digest(ledger)
    assert results.recorded_digest(out) == key and "18 runs" in text
    assert "partial − lora" in text or "partial - lora" in text
    block = readme.read_text()
    assert block.startswith("# manual\nkept above\n") and block.endswith("kept below\n")
    assert "old figures" not in block and f"{results.DIGEST}{key}" in block
    # C3 pooled: partial is 40 points below lora on every example pair, so the claim is refuted.
    c3 = next(line for line in block.splitlines() if "C3" in line)
    assert "-40.00" in c3 and "refuted" in c3
    assert (out.parent / "results" / "study.png").exists()


def test_the_readme_block_shows_each_claim_at_the_shared_and_the_tuned_rate_in_one_row(tmp_path):
    results = load_script("results")
    ledger = _ledger(tmp_path, tuned=True)
    out, readme = tmp_path / "docs" / "results.md", tmp_path / "README.md"
    readme.write_text(f"{results.BEGIN}\n{results.END}\n")
    results.ROOT = tmp_path
    results.generate(ledger, out, readme)
    c3 = [line for line in readme.read_text().splitlines() if "C3" in line]
    assert len(c3) == 1, c3  # one row: shared, then tuned
    shared, tuned = c3[0].split("refuted", 1)
    assert "-40.00" in shared and "+0.00 [+0.00, +0.00] | holds | 0 1 2" in tuned


def test_a_grid_on_some_tasks_is_judged_on_those_tasks_alone_beside_the_pooled_shared_row(tmp_path):
    results = load_script("results")
    ledger = _ledger(tmp_path, tuned=True, tuned_tasks=("a",))
    out, readme = tmp_path / "docs" / "results.md", tmp_path / "README.md"
    readme.write_text(f"{results.BEGIN}\n{results.END}\n")
    results.ROOT = tmp_path
    results.generate(ledger, out, readme)
    c3 = [line.split(" | ") for line in readme.read_text().splitlines() if "C3" in line]
    assert [row[1] for row in c3] == ["pooled (2 tasks)", "a"], c3
    pooled, on_a = c3
    assert pooled[3].startswith("-40.00") and pooled[6:8] == ["-", "-"]  # b had no grid: no tuned pooled row
    assert on_a[3].startswith("-40.00") and on_a[6] == "+0.00 [+0.00, +0.00]" and on_a[7] == "holds"
    change = out.read_text().split("shared → tuned", 1)[-1]
    assert "| C3 | m | a |" in change and "| m | pooled |" not in change and "| m | b |" not in change


def test_check_fails_on_a_changed_ledger(tmp_path):
    results = load_script("results")
    ledger = _ledger(tmp_path)
    before = results.digest(ledger)
    rows = ledger.read_text().splitlines()
    ledger.write_text("\n".join(rows[1:]) + "\n")
    assert results.digest(ledger) != before


def test_no_tracked_file_cites_a_file_outside_the_repository():
    """docs/method.md is the project's own account of the method: nothing points a user at notes they cannot open."""
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    outside = ["../" + "shared", "PAPER" + ".md", "PEERS" + ".md", "DESIGN" + ".md"]
    cited = []
    for name in files:
        path = ROOT / name
        if path.suffix not in {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ""} or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        cited += [f"{name}: {needle}" for needle in outside if needle in text]
    assert not cited
