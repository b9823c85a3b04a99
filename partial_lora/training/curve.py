"""The training curve: `metrics.jsonl`, one record a line, optionally mirrored to a tracker.

Written line by line as training goes, so a crashed run still leaves its curve behind; a
resumed run keeps the records up to its checkpoint's step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from partial_lora import artifacts, distributed


class JsonlLog:
    """Append-only metrics log, flushed per line, optionally mirrored to a tracker."""

    def __init__(self, path: Path | None, tracker: Any | None = None, prefix: str = "") -> None:
        self.path, self.tracker, self.prefix = path, tracker, prefix

    def reset(self, keep_until_step: int | None = None) -> None:
        """Start the curve: empty, or (resuming) keep the records up to a checkpoint's step."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if keep_until_step is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= keep_until_step:
                        kept.append(line + "\n")
                except json.JSONDecodeError:
                    break  # a line cut by the kill: nothing after it is kept
        with artifacts.atomic_path(self.path) as tmp:
            tmp.write_text("".join(kept))

    def __call__(self, record: dict[str, Any]) -> None:
        if self.path is not None and distributed.is_main():
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.tracker is not None:
            step = record.get("step")
            self.tracker.log({f"{self.prefix}{k}": v for k, v in record.items() if k != "step"}, step=step)
