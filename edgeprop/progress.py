"""A dependency-free progress bar for long work (stderr, redrawn at most 10 times a second)."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str = "", start: int = 0, unit: str = "steps", enabled: bool = True,
                 stream=sys.stderr):
        self.total, self.label, self.n, self.unit = total, label, start, unit
        self.enabled, self.stream = enabled, stream
        self.t0, self.n0, self.last, self.note = time.monotonic(), start, 0.0, ""

    def update(self, n: int, note: str = "") -> None:
        self.n, self.note = n, note or self.note
        now = time.monotonic()
        if self.enabled and (now - self.last > 0.1 or n >= self.total):
            self.last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = self.n / max(self.total, 1)
        bar = "#" * int(30 * frac)
        rate = (self.n - self.n0) / max(now - self.t0, 1e-9)
        eta = (self.total - self.n) / rate if rate > 0 else 0.0
        self.stream.write(f"\r{self.label} [{bar:<30}] {self.n}/{self.total} {rate:,.1f} {self.unit}/s "
                          f"eta {eta:4.0f}s {self.note}\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
