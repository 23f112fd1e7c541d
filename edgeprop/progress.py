"""A dependency-free progress bar for long work, on stderr.

On a terminal it redraws in place ten times a second; into a log file (a device's service
log, CI) it writes a plain line every ten seconds instead of thousands of redraws.
"""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str = "", start: int = 0, unit: str = "steps", enabled: bool = True,
                 stream=sys.stderr):
        self.total, self.label, self.n, self.unit = total, label, start, unit
        self.enabled, self.stream = enabled, stream
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.interval = 0.1 if self.tty else 10.0
        self.t0, self.n0, self.last, self.note = time.monotonic(), start, time.monotonic(), ""

    def update(self, n: int, note: str = "") -> None:
        self.n, self.note = n, note or self.note
        now = time.monotonic()
        if self.enabled and now - self.last > self.interval:
            self.last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = self.n / max(self.total, 1)
        bar = "#" * int(30 * frac)
        rate = (self.n - self.n0) / max(now - self.t0, 1e-9)
        eta = (self.total - self.n) / rate if rate > 0 else 0.0
        line = f"{self.label} [{bar:<30}] {self.n}/{self.total} {rate:,.1f} {self.unit}/s eta {eta:4.0f}s {self.note}"
        self.stream.write(f"\r{line}\x1b[K" if self.tty else f"{line}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            if self.tty:
                self.stream.write("\n")
