"""The `plr` subcommands, each a parser and a function from its arguments to an exit code that runs
inside the one error handler (`errors.one_line_errors`): `train` (with the checks on its overrides,
`overrides`), `resume`, `report`, `export`, `fetch` and `study`. `cli.COMMANDS` lists them, and
`plr --help` is made from their parsers."""

from __future__ import annotations

import argparse

from partial_lora.errors import fail


class Parser(argparse.ArgumentParser):
    """argparse with plr's one-line errors (`plr: error: ...`, exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        fail(f"{message}; run `{self.prog} --help` for the options")
