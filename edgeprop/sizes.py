"""Byte sizes as people write them ("48MB", "320 KiB") and as reports print them."""
from __future__ import annotations

import re

from .errors import EdgepropError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
MAX_SIZE = 1 << 50  # 1 PiB: larger is a typo, not a device


def parse_size(text: str | int, what: str = "size") -> int:
    """Bytes from 1234, "48MB", "320 KiB", "0.5 GB". KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024."""
    if isinstance(text, bool):
        raise EdgepropError(f"{what}: expected a size such as '48MB' or '320 KiB', got {text!r}")
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]i?B|B)?\s*", str(text), re.IGNORECASE)
        if not m:
            raise EdgepropError(f"{what}: expected a size such as '48MB' or '320 KiB', got {text!r}")
        number = float(m.group(1)) * _UNITS[(m.group(2) or "").upper()]
        value = int(number) if number <= MAX_SIZE else MAX_SIZE + 1
    if value <= 0:
        raise EdgepropError(f"{what}: must be positive, got {text!r}")
    if value > MAX_SIZE:
        raise EdgepropError(f"{what}: {str(text)[:30]}{'...' if len(str(text)) > 30 else ''} is more than 1 PiB")
    return value


def format_size(n: float) -> str:
    """Bytes as a short human figure in powers of 1024, e.g. 8.4 MiB."""
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    return f"{n}"
