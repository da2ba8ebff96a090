"""Peak resident memory of one trial: the kernel's high-water mark (VmHWM), reset before the trial.

Linux only (/proc/self/clear_refs); elsewhere, or where the reset is refused, the peak is None rather
than a number that would include earlier trials.
"""
from __future__ import annotations

STATUS = "/proc/self/status"
CLEAR_REFS = "/proc/self/clear_refs"
SLACK_KB = 8 * 1024  # VmHWM may trail VmRSS after a reset by the per-thread counter lag


def _kb(key: str) -> int | None:
    try:
        with open(STATUS) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak() -> int | None:
    """Reset the high-water mark; the resident kB at that point, or None when it cannot be reset."""
    try:
        with open(CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        return None
    rss, hwm = _kb("VmRSS"), _kb("VmHWM")
    if rss is None or hwm is None or hwm - rss > SLACK_KB:
        return None
    return rss


def peak_mib(baseline_kb: int | None) -> float | None:
    """The peak resident memory since reset_peak(), in MiB (the whole process: model, data and training)."""
    hwm = _kb("VmHWM") if baseline_kb is not None else None
    return None if hwm is None else round(hwm / 1024, 1)
