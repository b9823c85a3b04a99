"""The one exception type users see.

A `PlrError` carries a one-line message that names the problem and the fix. Every command prints
it without a traceback and exits non-zero (`one_line_errors`, unless HYDRA_FULL_ERROR=1: `full_error`);
the core raises it for every bad input a user can type.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class PlrError(Exception):
    """A user-facing error: one line, says what is wrong and how to fix it."""


def first_line(e: BaseException | str) -> str:
    """The first line of an exception's message (or of a string); empty when there is none."""
    lines = str(e).strip().splitlines()
    return lines[0].strip() if lines else ""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run: where it stopped (the stage, and the training step when it was training)."""

    def __init__(self, stage: str, step: int | None = None) -> None:
        super().__init__(stage, step)
        self.stage, self.step = stage, step

    def where(self) -> str:
        return self.stage + ("" if self.step is None else f" step {self.step}")


def disk_full(e: BaseException) -> bool:
    """ENOSPC or EDQUOT, raised as OSError by Python or inside safetensors' own error (Rust's "os error 28")."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(s in str(e) for s in ("No space left on device", "Disk quota exceeded"))


@contextmanager
def disk_full_is_one_line(where: Path) -> Iterator[None]:
    """A full disk while writing under `where` becomes one line saying how to go on. Every write of
    the run dir is atomic, so nothing half-written is left and a rerun resumes where it stopped."""
    try:
        yield
    except PlrError:
        raise
    except Exception as e:
        if not disk_full(e):
            raise
        raise PlrError(f"no space left on the disk of {where} ({e}); free some space and rerun the same "
                       "command: it resumes from the last finished stage or checkpoint") from None


def fail(message: str, code: int = 2) -> None:
    """Print one error line and exit non-zero (a traceback only with HYDRA_FULL_ERROR=1)."""
    print(f"plr: error: {message}", file=sys.stderr)
    sys.exit(code)


def full_error() -> bool:
    """Whether the user asked for tracebacks instead of one-line errors (`HYDRA_FULL_ERROR=1`, Hydra's switch)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Every command's error handler: a `PlrError` inside becomes `plr: error: <message>` and exit 2 (with
    HYDRA_FULL_ERROR=1 it propagates, with its traceback)."""
    try:
        yield
    except PlrError as e:
        if full_error():
            raise
        fail(str(e))
