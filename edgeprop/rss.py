"""What the process really holds, from the operating system: resident set, and its peak.

Linux reports both in /proc/self/status (VmRSS, VmHWM), and lets a process reset its own
peak (writing "5" to /proc/self/clear_refs), so a peak can be taken over one stretch of
work. Elsewhere the peak comes from getrusage and cannot be reset.
"""
from __future__ import annotations

import resource
import sys
from pathlib import Path

STATUS = Path("/proc/self/status")
_earlier_peak = 0  # the highest peak a reset_peak() has discarded


def _status(field: str) -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current() -> int:
    """Resident bytes now."""
    value = _status("VmRSS")
    return value if value is not None else peak()


def peak() -> int:
    """Peak resident bytes since the process started or since `reset_peak()`."""
    value = _status("VmHWM")
    if value is not None:
        return value
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def process_peak() -> int:
    """Peak resident bytes since the process started, across any reset_peak()."""
    return max(_earlier_peak, peak())


def reset_peak() -> bool:
    """Start a new peak from the current resident set; False where the OS cannot."""
    global _earlier_peak
    _earlier_peak = process_peak()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
