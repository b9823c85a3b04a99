"""`plr report`: tables and a plot over finished runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from partial_lora.commands import Parser
from partial_lora.errors import one_line_errors


def report_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="plr report", description="Tables (report.md, report.csv, runs.csv) and a plot "
                     "(report.png) over plr run dirs: each method's test metrics as mean ± sample std over "
                     "seeds, per task; unfinished runs are listed, not averaged.")
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="a run dir, a directory holding run dirs at any depth (e.g. a multirun root), "
                             "or a glob (quote it; ** recurses)")
    parser.add_argument("--out", type=Path, default=Path("report"), metavar="DIR",
                        help="folder for report.md, report.csv, runs.csv, report.png (default: ./report)")
    parser.add_argument("--metric", metavar="NAME",
                        help="metric of the summary table, e.g. macro_f1 (default: each task's main metric)")
    return parser


@one_line_errors()
def report_command(argv: list[str]) -> int:
    from partial_lora import report

    args = report_parser().parse_args(argv)
    rep = report.build(args.paths, metric=args.metric)
    written = report.write(rep, args.out)
    print(report.markdown(rep), end="")
    print(f"[plr] report: wrote {args.out / written[0].name}, {', '.join(p.name for p in written[1:])}")
    return 0
