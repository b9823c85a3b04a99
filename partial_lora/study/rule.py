"""The protocol's rule for plr's default reading of Partial-LoRA (docs/lab-log.md), read off the claims.

On a task, a reading meets the rule when it has (i) at least 60% fewer adapter parameters than dense
LoRA r=8, (ii) a mean difference against dense LoRA (claim C3) of -1 point or better and (iii) a mean
difference against the dense LoRA rank-matched to its budget (the reviewers' control R) of 0 or better.
The reading that meets it on the most tasks becomes the default; if none meets it on a majority, the
paper's reading stays.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from partial_lora.study.claims import ClaimRow

# (i) the least reduction against dense LoRA r=8 (%), (ii) the least C3 and (iii) the least R difference (points)
RULE_REDUCTION_PCT, RULE_VS_DENSE, RULE_VS_MATCHED = 60.0, -1.0, 0.0


@dataclass(frozen=True)
class RuleRow:
    model: str
    reading: str  # "partial" (the default settings) or "partial@<variant>"
    task: str
    reduction_pct: float | None
    vs_dense: float | None    # C3's mean difference, points
    vs_matched: float | None  # R's mean difference, points

    @property
    def checks(self) -> tuple[bool | None, bool | None, bool | None]:
        def at_least(x: float | None, bound: float) -> bool | None:
            return None if x is None else x >= bound
        return (at_least(self.reduction_pct, RULE_REDUCTION_PCT), at_least(self.vs_dense, RULE_VS_DENSE),
                at_least(self.vs_matched, RULE_VS_MATCHED))

    @property
    def meets(self) -> bool | None:
        """True when (i)-(iii) all hold, False when one fails, None while one is unmeasured."""
        checks = self.checks
        return False if False in checks else (None if None in checks else True)


def rule_rows(rows: Sequence[ClaimRow]) -> list[RuleRow]:
    """The default rule per (model, reading, task), read off the C3 and R rows (pooled rows left out)."""
    found: dict[tuple[str, str, str], dict[str, ClaimRow]] = defaultdict(dict)
    for r in rows:
        if r.claim.key in ("C3", "R") and r.task != "pooled":
            found[r.model, r.claim.method, r.task][r.claim.key] = r
    out = []
    for (model, reading, task), by_key in sorted(found.items()):
        c3, rr = by_key.get("C3"), by_key.get("R")
        reduction = next((x.reduction_pct for x in (c3, rr) if x is not None and x.reduction_pct is not None), None)
        out.append(RuleRow(model, reading, task, reduction, c3.comparison.mean if c3 else None,
                           rr.comparison.mean if rr else None))
    return out


def markdown(rules: Sequence[RuleRow], title: str = "The default rule") -> list[str]:
    if not rules:
        return []
    mark = {True: "yes", False: "no", None: "-"}
    lines = ["", f"## {title}", "",
             f"A reading meets the rule on a task when (i) it has at least {RULE_REDUCTION_PCT:.0f}% fewer adapter "
             f"parameters than dense LoRA r=8, (ii) its mean difference against dense LoRA (C3) is at least "
             f"{RULE_VS_DENSE:g} point and (iii) its mean difference against the dense LoRA rank-matched to its "
             f"budget (R) is at least {RULE_VS_MATCHED:g}. The reading that meets it on the most tasks becomes "
             "the default; if none meets it on a majority, the paper's reading stays. '-': not measured.", "",
             "| model | reading | task | reduction | vs dense (pts) | vs rank-matched (pts) | (i) | (ii) | (iii) | "
             "meets |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)
    for r in rules:
        i, ii, iii = (mark[c] for c in r.checks)
        red = "-" if r.reduction_pct is None else f"{r.reduction_pct:.1f}%"
        lines.append(f"| {r.model} | {r.reading} | {r.task} | {red} | "
                     f"{num(r.vs_dense, '+.2f')} | {num(r.vs_matched, '+.2f')} | {i} | {ii} | {iii} | "
                     f"**{mark[r.meets]}** |")
    lines += ["", "| model | reading | tasks measured | meets on |", "|---|---|---|---|"]
    for (model, reading) in sorted({(r.model, r.reading) for r in rules}):
        mine = [r for r in rules if (r.model, r.reading) == (model, reading)]
        met = [r.task for r in mine if r.meets]
        lines.append(f"| {model} | {reading} | {len(mine)} | {len(met)}{' (' + ', '.join(met) + ')' if met else ''} |")
    return lines
