"""The continual-learning loop: SGD, ER, DER++, joint training, FPF at the end, and k-FPF.

`run_continual(model, stream, "er+fpf")` trains `model` (in place) on the tasks in order,
records the accuracy matrix after each task, tracks per-module drift, and meters compute.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .buffer import ReservoirBuffer
from .compute import ComputeMeter
from .drift import DriftReport, DriftTracker
from .errors import ContinualError
from .fpf import FPFConfig, fpf_finetune, make_optimizer
from .metrics import average_accuracy, average_forgetting, backward_transfer, evaluate
from .stream import TaskStream, TensorData

METHODS: dict[str, str] = {
    "sgd": "sequential fine-tuning on each task, no replay (lower bound)",
    "er": "experience replay: every step also trains on a batch drawn from the reservoir buffer",
    "derpp": "DER++: ER plus matching the logits stored with the buffered examples",
    "joint": "training on all tasks' data at once (upper bound; no forgetting to measure)",
    "sgd+fpf": "sgd, then FPF on the buffer (filled but never replayed during training)",
    "er+fpf": "ER, then FPF: fine-tune only the forgetting-prone modules on the buffer",
    "derpp+fpf": "DER++, then FPF with DER++'s logit-matching loss",
    "kfpf": "k-FPF: SGD without replay, FPF on the buffer k times along the stream (cross-entropy)",
    "kfpf-kd": "k-FPF with logit distillation: the buffer stores logits, FPF matches them",
}


@dataclass
class CLConfig:
    """Hyper-parameters of a run (the benchmark presets set these per benchmark)."""

    epochs: int = 5
    batch_size: int = 32
    lr: float = 0.05
    optimizer: str = "sgd"
    buffer_size: int = 100
    replay_batch_size: int | None = None  # default: batch_size
    derpp_alpha: float = 0.3
    derpp_beta: float = 0.5
    fpf: FPFConfig = field(default_factory=FPFConfig)
    kfpf_k: int = 5                  # FPF phases along the stream (evenly spaced; the last at the end)
    kfpf_steps: int | None = None    # steps per k-FPF phase (default: fpf.steps)
    kfpf_budget: float | None = None  # parameter budget of k-FPF's selection (default: fpf.budget)
    # "x+fpf" only: further FPF budgets tried on the same trained model (restored in between), in CLResult.variants
    fpf_variants: tuple[float, ...] = ()
    eval_batch_size: int = 256
    progress: bool = True

    def validate(self) -> None:
        """Check the fields before any work; ContinualError names the bad one."""
        self.fpf.validate()
        if self.epochs <= 0 or self.batch_size <= 0 or self.buffer_size <= 0:
            raise ContinualError(f"CLConfig: epochs, batch_size and buffer_size must be positive, got "
                                 f"{self.epochs}, {self.batch_size}, {self.buffer_size}")
        if self.kfpf_budget is not None and not 0 < self.kfpf_budget <= 1:
            raise ContinualError(f"CLConfig.kfpf_budget: expected a fraction in (0, 1], got {self.kfpf_budget!r}")
        if any(not 0 < b <= 1 for b in self.fpf_variants):
            raise ContinualError(f"CLConfig.fpf_variants: expected fractions in (0, 1], got {self.fpf_variants!r}")
        if self.kfpf_k <= 0:
            raise ContinualError(f"CLConfig.kfpf_k: k-FPF needs k >= 1, got {self.kfpf_k}")


@dataclass
class MethodSpec:
    """A method name taken apart: the training rule and when FPF runs."""

    name: str
    base: str            # sgd | er | derpp | joint
    fpf: str             # none | end | k
    store_logits: bool


def parse_method(name: str) -> MethodSpec:
    """Resolve a method name; ContinualError listing the valid names otherwise."""
    if name not in METHODS:
        raise ContinualError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    if name.startswith("kfpf"):
        return MethodSpec(name, "sgd", "k", name == "kfpf-kd")
    base, _, post = name.partition("+")
    return MethodSpec(name, base, "end" if post == "fpf" else "none", base == "derpp")


@dataclass
class CLResult:
    """Outcome of one run: accuracy matrix, metrics, compute, and FPF's module ranking."""

    method: str
    accuracy: list[list[float]]          # row i: accuracy on every task after task i (joint: one row)
    compute: dict
    task_names: list[str]
    drift: DriftReport | None = None     # the ranking used by the last FPF phase
    fpf_phases: int = 0
    base: "CLResult | None" = None       # for "x+fpf": the result of "x" before FPF (same run)
    valid_accuracy: list[list[float]] | None = None  # the same matrix on the validation split, if the stream has one
    variants: "dict[float, CLResult]" = field(default_factory=dict)  # CLConfig.fpf_variants: budget -> result

    @property
    def is_joint(self) -> bool:
        """True for joint training (a single evaluation row)."""
        return len(self.accuracy) == 1 and len(self.task_names) > 1

    @property
    def final_average_accuracy(self) -> float:
        """Mean test accuracy over all tasks after the last one."""
        row = self.accuracy[-1]
        return sum(row) / len(row) if self.is_joint else average_accuracy(self.accuracy)

    @property
    def average_forgetting(self) -> float | None:
        """Mean drop from each task's best accuracy to its final one (None for joint training)."""
        return None if self.is_joint else average_forgetting(self.accuracy)

    @property
    def valid_final_average_accuracy(self) -> float | None:
        """Mean validation accuracy over all tasks after the last one (None without a validation split)."""
        if self.valid_accuracy is None:
            return None
        row = self.valid_accuracy[-1]
        return sum(row) / len(row) if self.is_joint else average_accuracy(self.valid_accuracy)

    def to_dict(self) -> dict:
        """JSON-ready form (without `base`)."""
        return {"method": self.method, "final_average_accuracy": self.final_average_accuracy,
                "valid_final_average_accuracy": self.valid_final_average_accuracy,
                "valid_accuracy_matrix": self.valid_accuracy,
                "average_forgetting": self.average_forgetting,
                "backward_transfer": None if self.is_joint else backward_transfer(self.accuracy),
                "accuracy_matrix": self.accuracy, "task_names": self.task_names, "compute": self.compute,
                "fpf_phases": self.fpf_phases, "fpf_modules": self.drift.selected if self.drift else [],
                "drift": self.drift.to_dict() if self.drift else None}


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ContinualError(f"{type(model).__name__} has no trainable parameter")
    return params


class _Run:
    """State of one run; the methods below are the pieces of `run_continual`."""

    def __init__(self, model: nn.Module, stream: TaskStream, spec: MethodSpec, cfg: CLConfig, seed: int) -> None:
        self.model, self.stream, self.spec, self.cfg = model, stream, spec, cfg
        torch.manual_seed(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.buffer = ReservoirBuffer(cfg.buffer_size, seed)
        self.tracker = DriftTracker(model)
        self.meter = ComputeMeter(batch_size=cfg.batch_size)
        self.start = time.perf_counter()
        self.opt = make_optimizer(_trainable(model), cfg.optimizer, cfg.lr)
        self.rows: list[list[float]] = []
        self.valid_rows: list[list[float]] | None = [] if stream.has_validation else None
        self.report: DriftReport | None = None
        self.phases = 0
        self.eval_seconds = 0.0

    def replay_size(self) -> int:
        return self.cfg.replay_batch_size or self.cfg.batch_size

    def train_step(self, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor, task_ids: torch.Tensor) -> None:
        """One optimizer step of the method's rule; then the batch is offered to the buffer."""
        base, n = self.spec.base, int(labels.shape[0])
        parts = [(inputs, labels, task_ids, None, "ce")]
        if base in ("er", "derpp") and len(self.buffer):
            b = self.buffer.sample(self.replay_size(), self.gen)
            if base == "er":
                parts.append((b.inputs, b.labels, b.task_ids, None, "ce"))
            else:
                parts.append((b.inputs, b.labels, b.task_ids, b.logits, "mse"))
                b2 = self.buffer.sample(self.replay_size(), self.gen)
                parts.append((b2.inputs, b2.labels, b2.task_ids, None, "ce_beta"))
        # One forward over the concatenation (current batch first), then each part's loss.
        sizes = [int(p[1].shape[0]) for p in parts]
        x = tuple(torch.cat([p[0][i] for p in parts]) for i in range(len(inputs)))
        kept: dict[str, torch.Tensor] = {}

        def step() -> None:
            self.opt.zero_grad(set_to_none=True)
            logits = self.model(*x)
            kept["logits"] = logits[:n].detach()
            loss = logits.new_zeros(())
            for (_, y, ids, target, kind), out in zip(parts, torch.split(logits, sizes)):
                if kind == "mse":
                    loss = loss + self.cfg.derpp_alpha * F.mse_loss(out, target)
                else:
                    ce = F.cross_entropy(self.stream.mask_logits(out, ids), y)
                    if base == "er":  # ER: one cross-entropy over the whole concatenated batch
                        ce = ce * out.shape[0] / logits.shape[0]
                    loss = loss + (self.cfg.derpp_beta * ce if kind == "ce_beta" else ce)
            loss.backward()
            self.opt.step()

        self.meter.step("train", sum(sizes), step)
        self.buffer.add(inputs, labels, task_ids, kept["logits"] if self.spec.store_logits else None)

    def fpf_phase(self, steps: int, budget: float) -> None:
        """Select the forgetting-prone modules from the drift so far and fine-tune them on the buffer."""
        f = self.cfg.fpf
        self.report = self.tracker.report(budget, f.top, list(f.include) or None, f.score)
        fpf_finetune(self.model, self.buffer, self.report.selected, self.stream, replace(f, steps=steps),
                     self.gen, on_step=lambda n, fn: self.meter.step("fpf", n, fn))
        self.phases += 1

    def evaluate(self, upto: int | None = None, replace_last: bool = False) -> None:
        """Append (or replace the last) row of test accuracies, and of validation ones if the stream has them."""
        t0 = time.perf_counter()
        pairs = [(self.rows, "test")] + ([(self.valid_rows, "valid")] if self.valid_rows is not None else [])
        for rows, split in pairs:
            row = evaluate(self.model, self.stream, self.cfg.eval_batch_size, upto, split)
            if replace_last:
                rows[-1] = row
            else:
                rows.append(row)
        self.eval_seconds += time.perf_counter() - t0

    def result(self) -> CLResult:
        """The run so far as a CLResult (compute: steps, FLOPs, wall time without evaluation)."""
        compute = self.meter.summary()
        compute["eval_seconds"] = self.eval_seconds
        # Wall time of everything but evaluation and FLOP counting: steps, FPF's adapter set-up, buffer.
        compute["wall_seconds"] = (time.perf_counter() - self.start - self.eval_seconds
                                   - self.meter.overhead_seconds)
        return CLResult(self.spec.name, [list(r) for r in self.rows], compute, self.stream.task_names(),
                        self.report, self.phases,
                        valid_accuracy=None if self.valid_rows is None else [list(r) for r in self.valid_rows])


def _steps_per_epoch(data: TensorData, batch_size: int) -> int:
    return math.ceil(len(data) / batch_size)


def run_continual(model: nn.Module, stream: TaskStream, method: str, config: CLConfig | None = None,
                  seed: int = 0) -> CLResult:
    """Train `model` in place on `stream` with `method` (see METHODS) and return its CLResult."""
    spec = parse_method(method)
    cfg = config or CLConfig()
    cfg.validate()
    run = _Run(model, stream, spec, cfg, seed)
    model.train()
    if spec.base == "joint":
        data = stream.joint()
        total = cfg.epochs * _steps_per_epoch(data, cfg.batch_size)
        with tqdm(total=total, desc=method, disable=not cfg.progress, leave=False) as bar:
            for _ in range(cfg.epochs):
                for inputs, labels in data.batches(cfg.batch_size, run.gen):
                    run.train_step(inputs, labels, stream.task_ids(labels))
                    bar.update()
        run.evaluate()
        return run.result()

    total = sum(cfg.epochs * _steps_per_epoch(t.train, cfg.batch_size) for t in stream)
    k = cfg.kfpf_k if spec.fpf == "k" else 0
    if k > total:
        raise ContinualError(f"CLConfig.kfpf_k: k={k} FPF phases need at least k training steps; "
                             f"the stream has {total}")
    # Evenly spaced, the last one after the last step; distinct because k <= total.
    fpf_at = {round(total * i / k) for i in range(1, k + 1)} if k else set()
    kfpf_budget = cfg.kfpf_budget if cfg.kfpf_budget is not None else cfg.fpf.budget
    done = 0
    with tqdm(total=total, desc=method, disable=not cfg.progress, leave=False) as bar:
        for task in stream:
            ids = torch.full((cfg.batch_size,), task.index, dtype=torch.long)
            for _ in range(cfg.epochs):
                for inputs, labels in task.train.batches(cfg.batch_size, run.gen):
                    run.train_step(inputs, labels, ids[:labels.shape[0]])
                    done += 1
                    bar.update()
                    if done in fpf_at:
                        bar.set_postfix_str(f"k-FPF phase {run.phases + 1}/{k}")
                        run.fpf_phase(cfg.kfpf_steps or cfg.fpf.steps, kfpf_budget)
            run.tracker.end_task()
            run.evaluate(upto=task.index)  # later tasks are not needed by the metrics
    if spec.fpf != "end":
        return run.result()
    before = run.result()
    before.method = spec.base
    variants = {}
    for budget in cfg.fpf_variants:  # each from the state before FPF, as if FPF had run only at that budget
        saved = (copy.deepcopy(model.state_dict()), run.gen.get_state(), copy.deepcopy(run.meter),
                 [list(r) for r in run.rows], run.valid_rows and [list(r) for r in run.valid_rows], run.eval_seconds)
        t0 = time.perf_counter()
        run.fpf_phase(cfg.fpf.steps, budget)
        run.evaluate(replace_last=True)
        variants[budget] = run.result()
        variants[budget].base = before
        state, gen, run.meter, run.rows, run.valid_rows, run.eval_seconds = saved
        model.load_state_dict(state)
        run.gen.set_state(gen)
        run.phases -= 1
        run.start += time.perf_counter() - t0  # the variant's time is not the main result's
    run.fpf_phase(cfg.fpf.steps, cfg.fpf.budget)
    run.evaluate(replace_last=True)
    result = run.result()
    result.base = before
    result.variants = variants
    return result
