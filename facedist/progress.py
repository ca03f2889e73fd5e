"""facedist's own progress bar: one line on stderr, redrawn in place, finished with a newline."""

from __future__ import annotations

import sys
from typing import TextIO


class progress_bar:  # noqa: N801  (used like a function: progress=progress_bar("images"))
    """A callback(done, total) drawing `[####....] done/total label`; the line ends once done >=
    total, or at close() (a run that stopped short)."""

    def __init__(self, label: str = "images", stream: TextIO | None = None, width: int = 30):
        self.label, self.stream, self.width = label, stream, width
        self.drawn = self.finished = False

    def __call__(self, done: int, total: int) -> None:
        if self.finished:
            return
        out = self.stream or sys.stderr
        filled = int(self.width * done / max(total, 1))
        out.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} {self.label}")
        self.drawn = True
        if done >= total:
            self.close()
        out.flush()

    def close(self) -> None:
        if self.drawn and not self.finished:
            (self.stream or sys.stderr).write("\n")
        self.finished = True
