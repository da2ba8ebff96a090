"""How many torch CPU threads a training process uses by default.

One thread per physical core this process may run on (its CPU affinity, not the machine's
count: containers and `taskset` restrict it), shared among the processes of a launch on this
machine. Hyper-threads of one core share its vector units, so a second thread per core adds
contention, not speed, to a GEMM-bound step. When the machine is already busy (the 1-minute load
average of other work leaves fewer free cores than that), the default drops to the free ones
and says so (one CPU of the load is taken to be this process's own start-up): threads that wait for each other on an oversubscribed machine run slower than
fewer threads would.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

SYSFS = Path("/sys/devices/system/cpu")


def allowed_cpus() -> list[int]:
    """The logical CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def physical_cores(cpus: list[int], sysfs: Path = SYSFS) -> int:
    """Distinct physical cores among `cpus` (logical CPUs), from the kernel's topology files."""
    cores = set()
    for cpu in cpus:
        topo = sysfs / f"cpu{cpu}" / "topology"
        try:
            cores.add((topo.joinpath("physical_package_id").read_text().strip(),
                       topo.joinpath("core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))  # no topology exposed: count the logical CPU as a core
    return max(1, len(cores))


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str
    warning: str | None = None


def default_threads(local_processes: int = 1, load: float | None = None,
                    cpus: list[int] | None = None, sysfs: Path = SYSFS) -> ThreadChoice:
    """Threads per process for `local_processes` processes of one launch on this machine."""
    cpus = allowed_cpus() if cpus is None else cpus
    cores = physical_cores(cpus, sysfs)
    share = max(1, cores // max(1, local_processes))
    reason = (f"{cores} physical core(s) available to this process ({len(cpus)} logical CPU(s))"
              + (f" shared by {local_processes} processes" if local_processes > 1 else ""))
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = 0.0
    # Free CPUs, rounded up by one: the load average may include this process's own start-up.
    free = int(len(cpus) - load + 1.0)
    if free < cores:
        fallback = max(1, free // max(1, local_processes))
        if fallback < share:
            return ThreadChoice(fallback, reason, (
                f"the machine is busy (load average {load:.1f} on {len(cpus)} CPU(s)): using {fallback} torch "
                f"thread(s) per process instead of {share}, since threads that wait for each other on an "
                f"oversubscribed machine are slower than fewer threads; set `threads:` to override"))
    return ThreadChoice(share, reason)


def apply_threads(requested: int | None, local_processes: int = 1) -> ThreadChoice:
    """Set torch's thread count: `requested` if given, else `default_threads` (warning when it falls back)."""
    import torch

    if requested is not None:
        choice = ThreadChoice(requested, "set by the run config")
    else:
        choice = default_threads(local_processes)
        if choice.warning:
            warnings.warn(choice.warning, RuntimeWarning, stacklevel=2)
    torch.set_num_threads(choice.threads)
    return choice
