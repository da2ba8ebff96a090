"""The memory probe sees a known allocation, and a failed reset of the high-water mark is an error."""
from __future__ import annotations

import pytest
import torch

from benchmarks import memprobe
from benchmarks.memprobe import PeakResetError, peak_mb_since, reset_peak

SIZE_MB = 200
# Measured here (Linux 6, glibc, torch CPU): the peak of a touched-and-freed 200 MB tensor came out
# 199.8-201.3 MB over repeated runs; 5 MB leaves room for the interpreter's own small allocations.
TOLERANCE_MB = 5.0


def _allocate_touch_free(mb: int) -> None:
    t = torch.ones(mb * 2 ** 20 // 4, dtype=torch.float32)  # ones() writes every page, so all are resident
    assert float(t[-1]) == 1.0
    del t  # 200 MB is far above glibc's mmap threshold: freeing returns the pages to the kernel at once


def test_peak_sees_a_known_allocation_and_a_reset_forgets_it():
    _allocate_touch_free(SIZE_MB)  # first-call overheads (allocator, kernels) outside the measurement
    rss0 = reset_peak()
    _allocate_touch_free(SIZE_MB)
    assert peak_mb_since(rss0) == pytest.approx(SIZE_MB, abs=TOLERANCE_MB)
    rss1 = reset_peak()  # after the free: the 200 MB must not count any more
    assert abs(rss1 - rss0) / 1024 < TOLERANCE_MB
    assert peak_mb_since(rss1) < TOLERANCE_MB


def test_a_failed_reset_is_an_error_naming_the_file(tmp_path, monkeypatch):
    missing = tmp_path / "no" / "clear_refs"
    monkeypatch.setattr(memprobe, "CLEAR_REFS", str(missing))
    with pytest.raises(PeakResetError, match=f"writing '5' to {missing} failed.*read-write"):
        reset_peak()


def test_a_reset_the_kernel_ignores_is_an_error(tmp_path, monkeypatch):
    _allocate_touch_free(SIZE_MB)  # VmHWM is now ~200 MB above VmRSS
    monkeypatch.setattr(memprobe, "CLEAR_REFS", str(tmp_path / "clear_refs"))  # writable, but resets nothing
    with pytest.raises(PeakResetError, match="did not reset the peak"):
        reset_peak()
