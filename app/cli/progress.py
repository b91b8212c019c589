"""Progress of a long command: a line to stderr at most once an interval, so output stays readable."""
from __future__ import annotations

import sys
import time


class Throttled:
    """Prints a line to stderr at most once every `every` seconds; lines in between are dropped."""

    def __init__(self, every: float = 1.0) -> None:
        self.every = every
        self._last = time.monotonic()

    def print(self, line: str) -> None:
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            print(line, file=sys.stderr, flush=True)
