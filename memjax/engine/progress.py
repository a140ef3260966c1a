"""A minimal progress bar (examples/s) on stderr, printed by process 0 only."""

from __future__ import annotations

import sys
import time


class Progress:
    """Counts examples and prints ``desc  done/total [pct] rate ex/s``.

    Redraws at most every ``interval`` seconds (every 10 s when stderr is not a terminal,
    so CI logs stay short), and once at the end.
    """

    def __init__(self, total: int, desc: str = "scoring", enabled: bool = True,
                 stream=None):
        self.total = total
        self.desc = desc
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = 0.2 if self.tty else 10.0
        self.done = 0
        self.start = time.perf_counter()
        self.last_draw = 0.0

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return f"{self.desc}  {self.done}/{self.total} [{pct:5.1f}%] {self.rate():,.0f} ex/s"

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and now - self.last_draw >= self.interval:
            self.last_draw = now
            self._draw(final=False)

    def close(self) -> None:
        if self.enabled:
            self._draw(final=True)

    def _draw(self, final: bool) -> None:
        end = "\n" if final or not self.tty else ""
        prefix = "\r" if self.tty else ""
        self.stream.write(prefix + self.line() + end)
        self.stream.flush()
