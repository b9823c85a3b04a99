"""Would early stopping of the probe have kept its allocation? Replayed from finished runs' curves.

    .venv/bin/python experiments/probe_patience.py [--out outputs/study] [--patience 1 2 3 4]

Issue 18 lists early stopping of the probe on its few-shot validation as a way to a cheaper
pipeline. The probe keeps the epoch with the best few-shot validation metric (the first one to
reach it), and the learning-rate schedule is fixed by the planned epochs, so a probe that stops
after `p` evaluated epochs without a strict improvement follows the full probe's path exactly up to
where it stops. It ends with the same adapter, the same a_ref and so the same allocation if and only
if the full probe's best epoch comes before that stop. That can be read off the per-epoch
validation scores in `probe/metrics.jsonl`, in the metric its `metrics.json` says it selected on,
with no new run.

For every distinct finished probe under `<out>/runs/<model>/<task>/<arm>/seed<n>/` (arms sharing one
probe count once), and each patience, this prints how many probes would have ended on another epoch
(another allocation) and how many probe epochs would have been saved. Restored run dirs
(`experiments/ledger.py --restore`) hold no probe and are skipped.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Curve:
    run: str
    scores: list[float]  # the validation metric after each evaluated epoch, in order

    def best(self) -> int:
        """The epoch the full probe keeps: the first to reach the best score (`loop._select`: strict >)."""
        return self.scores.index(max(self.scores))


def stop(scores: list[float], patience: int) -> tuple[int, int]:
    """(the epoch kept, the epochs run) by a probe that stops after `patience` evaluated epochs in a
    row without a strict improvement."""
    best, since = 0, 0
    for e in range(1, len(scores)):
        if scores[e] > scores[best]:
            best, since = e, 0
        else:
            since += 1
            if since >= patience:
                return best, e + 1
    return best, len(scores)


def read_curve(probe: Path, run: str) -> Curve | None:
    """A finished probe's validation scores by epoch, in the metric it selected its epoch on (the
    `metric` of its `metrics.json`); None for a probe still running or evaluated only once."""
    try:
        key = "val_" + json.loads((probe / "metrics.json").read_text())["metric"]
        lines = (probe / "metrics.jsonl").read_text().splitlines()
    except (OSError, ValueError, KeyError):
        return None
    scores = [float(rec[key]) for rec in map(json.loads, lines) if key in rec]
    return Curve(run, scores) if len(scores) > 1 else None


def curves(out: Path) -> list[Curve]:
    """Each distinct probe once: arms that share a probe (the study's variants reuse the default
    arm's with `from_run`, or train the same one again) have the same model, task, seed and scores."""
    found: dict[tuple, Curve] = {}
    for probe in sorted(out.glob("runs/*/*/*/seed*/probe")):
        model, task, _, seed = probe.parts[-5:-1]
        curve = read_curve(probe, "/".join(probe.parts[-5:-1]))
        if curve is not None:
            found.setdefault((model, task, seed, tuple(curve.scores)), curve)
    return list(found.values())


def table(found: list[Curve], patiences: list[int]) -> str:
    total = sum(len(c.scores) for c in found)
    lines = [f"{len(found)} probe curves, {total} probe epochs in all; the full probe's best epoch: "
             + ", ".join(str(c.best()) for c in found),
             f"{'patience':>8} {'same epoch':>11} {'other epoch':>12} {'epochs saved':>13}"]
    for p in patiences:
        kept = [stop(c.scores, p) for c in found]
        same = sum(k == c.best() for (k, _), c in zip(kept, found, strict=True))
        saved = total - sum(ran for _, ran in kept)
        lines.append(f"{p:>8} {same:>11} {len(found) - same:>12} {saved:>7} ({saved / max(1, total):.0%})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("outputs/study"))
    p.add_argument("--patience", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--runs", action="store_true", help="also list each run's scores and kept epochs")
    args = p.parse_args(argv)
    if any(x < 1 for x in args.patience):
        raise SystemExit("--patience takes whole numbers >= 1 (evaluated epochs without an improvement)")
    found = curves(args.out)
    if not found:
        raise SystemExit(f"no finished probe under {args.out}/runs/*/*/*/seed*/probe; "
                         "point --out at a plr study dir whose Partial-LoRA runs ran here")
    if args.runs:
        for c in found:
            kept = " ".join(f"p{p}:{stop(c.scores, p)[0]}" for p in args.patience)
            print(f"{c.run}: best {c.best()} · {kept} · " + " ".join(f"{s:.3f}" for s in c.scores))
    print(table(found, args.patience))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
