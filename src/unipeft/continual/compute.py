"""Compute accounting for a continual-learning run: optimizer steps, batch-steps, FLOPs and wall time."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from torch.utils.flop_counter import FlopCounterMode


@dataclass
class ComputeMeter:
    """Counts per kind of step ("train", "fpf", ...).

    - `steps`: optimizer.step() calls.
    - batch-steps: examples back-propagated / `batch_size`. An ER or DER++ step on 32 new and
      32 replayed examples is 1 optimizer step but 2 batch-steps of work; an FPF step on 32
      buffered examples is 1. This is the "optimizer steps" figure compared across methods.
    - FLOPs (forward + backward, as counted by torch's FlopCounterMode) are measured on the
      first step of each kind and scaled by the number of examples afterwards, so counting
      costs one instrumented step per kind. Backward FLOPs only cover what autograd computes:
      frozen modules below the lowest trainable one cost no backward.
    - seconds: wall time of the steps; the instrumented step's extra time (the FLOP counter
      is slow) is estimated from the kind's other steps and kept out, in `overhead_seconds`.
      `cpu_seconds` is the process's CPU time of the steps (time.process_time), which other
      programs on a shared machine disturb far less than wall time.
    """

    batch_size: int = 1
    steps: dict[str, int] = field(default_factory=dict)
    examples: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    flops_per_example: dict[str, float] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    _counted_seconds: dict[str, float] = field(default_factory=dict)

    def step(self, kind: str, n_examples: int, fn: Callable[[], None]) -> None:
        """Run one optimizer step `fn` over `n_examples` (all inputs of the step) and count it."""
        t0, c0 = time.perf_counter(), time.process_time()
        if kind not in self.flops_per_example:
            counter = FlopCounterMode(display=False)
            with counter:
                fn()
            self.flops_per_example[kind] = counter.get_total_flops() / max(n_examples, 1)
            self._counted_seconds[kind] = time.perf_counter() - t0
        else:
            fn()
            self.seconds[kind] = self.seconds.get(kind, 0.0) + time.perf_counter() - t0
            self.cpu_seconds[kind] = self.cpu_seconds.get(kind, 0.0) + time.process_time() - c0
        self.steps[kind] = self.steps.get(kind, 0) + 1
        self.examples[kind] = self.examples.get(kind, 0) + n_examples

    def kind_seconds(self, kind: str, cpu: bool = False) -> float:
        """Wall (or CPU) time of the kind's steps, the instrumented one counted at the mean of the others."""
        plain, n = (self.cpu_seconds if cpu else self.seconds).get(kind, 0.0), self.steps.get(kind, 0)
        if kind not in self._counted_seconds:
            return plain
        return plain * n / (n - 1) if n > 1 else self._counted_seconds[kind]

    @property
    def overhead_seconds(self) -> float:
        """Time the FLOP counter added (to subtract from a run's wall time)."""
        return sum(max(0.0, c - (self.kind_seconds(k) - self.seconds.get(k, 0.0)))
                   for k, c in self._counted_seconds.items())

    def summary(self) -> dict:
        """Totals over the kinds of step, plus the per-kind figures."""
        kinds = list(self.steps)
        flops = sum(self.flops_per_example.get(k, 0.0) * self.examples.get(k, 0) for k in kinds)
        examples = sum(self.examples.values())
        return {"optimizer_steps": sum(self.steps.values()), "examples": examples,
                "batch_steps": examples / self.batch_size, "flops": flops,
                "train_seconds": sum(self.kind_seconds(k) for k in kinds),
                "train_cpu_seconds": sum(self.kind_seconds(k, cpu=True) for k in kinds),
                "per_kind": {k: {"steps": self.steps[k], "examples": self.examples[k],
                                 "seconds": self.kind_seconds(k), "cpu_seconds": self.kind_seconds(k, cpu=True),
                                 "flops_per_example": self.flops_per_example.get(k, 0.0)} for k in kinds}}
