"""The one exception type users see.

A `PlrError` carries a one-line message that names the problem and the fix. The CLI prints
it without a traceback (unless HYDRA_FULL_ERROR=1) and exits non-zero; the core raises it
for every bad input a user can type.
"""


class PlrError(Exception):
    """A user-facing error: one line, says what is wrong and how to fix it."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run: where it stopped (the stage, and the training step when it was training)."""

    def __init__(self, stage: str, step: int | None = None) -> None:
        super().__init__(stage, step)
        self.stage, self.step = stage, step

    def where(self) -> str:
        return self.stage + ("" if self.step is None else f" step {self.step}")
