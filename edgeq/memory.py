"""Resident memory of this process, Linux /proc first: ru_maxrss inherits the parent's peak across fork+exec."""
from __future__ import annotations

import sys
from pathlib import Path


def _proc_status() -> dict[str, int]:
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])  # kB
    return fields


def rss_kib() -> float:
    """Resident memory now, in KiB."""
    status = _proc_status()
    if "VmRSS" in status:
        return float(status["VmRSS"])
    import psutil

    return psutil.Process().memory_info().rss / 1024.0


def peak_rss_kib() -> float:
    """Peak resident memory of this process, in KiB.

    On Linux the kernel copies the parent's peak into a child's ru_maxrss at exec, so a worker started from a big
    process would report the parent's size; /proc/self/status VmHWM belongs to this process alone.
    """
    status = _proc_status()
    if "VmHWM" in status:
        return float(status["VmHWM"])
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 if sys.platform == "darwin" else float(peak)  # bytes on macOS, KiB elsewhere


def reset_peak() -> bool:
    """Reset the peak to the current RSS (Linux 4.0+); where that is impossible the peak includes earlier steps."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False
