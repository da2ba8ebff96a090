"""The offline benchmarks (Seq-Digits, Seq-Fortunes), running several methods over seeds, and the table."""
from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from .errors import ContinualError
from .learner import CLConfig, CLResult, parse_method, run_continual
from .stream import TaskStream


@dataclass(frozen=True)
class Benchmark:
    """A task stream (fixed data split), a seeded model factory and the preset hyper-parameters."""

    name: str
    description: str
    stream: Callable[[str], TaskStream]
    model: Callable[[int, TaskStream], nn.Module]
    preset: Callable[[], CLConfig]


def _digits() -> Benchmark:
    from . import digits as d
    return Benchmark("seq-digits", "scikit-learn digits, 5 tasks of 2 classes, small CNN trained from scratch",
                     d.seq_digits_stream, d.seq_digits_model, d.seq_digits_config)


def _fortunes() -> Benchmark:
    from . import fortunes as f
    return Benchmark("seq-fortunes", "Debian fortune categories, 4 tasks of 2, frozen MiniLM (top layer run) "
                     "+ LoRA on every linear + head",
                     f.seq_fortunes_stream, f.seq_fortunes_model, f.seq_fortunes_config)


BENCHMARKS: dict[str, Callable[[], Benchmark]] = {"seq-digits": _digits, "seq-fortunes": _fortunes}

# What the benchmark scripts compare, in table order.
DEFAULT_METHODS = ("sgd", "er", "er+fpf", "derpp", "derpp+fpf", "kfpf", "kfpf-kd", "joint")


def get_benchmark(name: str) -> Benchmark:
    """The benchmark called `name`; ContinualError listing the valid names otherwise."""
    if name not in BENCHMARKS:
        raise ContinualError(f"unknown benchmark {name!r}; valid benchmarks: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]()


def training_runs(methods: Sequence[str]) -> list[str]:
    """The runs that produce `methods`: "x+fpf" also yields "x" (its state before FPF), so "x" is not re-run."""
    specs = [parse_method(m) for m in methods]
    with_fpf = {s.base for s in specs if s.fpf == "end"}
    runs: list[str] = []
    for s in specs:
        if s.fpf == "none" and s.base in with_fpf:
            continue
        if s.name not in runs:
            runs.append(s.name)
    return runs


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


RATIOS = {"batch_steps": "batch_steps", "optimizer_steps": "optimizer_steps", "flops": "flops",
          "wall_time": "wall_seconds", "cpu_time": "train_cpu_seconds"}


def compute_ratios(compute: dict, reference: dict) -> dict:
    """A run's compute relative to a reference run's (ER): batch-steps, steps, FLOPs, wall and CPU time."""
    return {name: compute[key] / reference[key] for name, key in RATIOS.items()}


def summarize(rows: list[dict]) -> dict:
    """Mean and std over seeds of accuracy, forgetting and the compute ratios of per-seed rows."""
    stats = {"final_average_accuracy": [r["final_average_accuracy"] for r in rows],
             "average_forgetting": [r["average_forgetting"] for r in rows],
             "valid_final_average_accuracy": [r.get("valid_final_average_accuracy") for r in rows]}
    for key in RATIOS:
        stats[f"{key}_vs_er"] = [r["vs_er"][key] if r["vs_er"] else None for r in rows]
    return {k: dict(zip(("mean", "std"), _mean_std(v))) for k, v in stats.items()}


def _row(res: CLResult, er: CLResult | None) -> dict:
    out = res.to_dict()
    out["vs_er"] = None if er is None else compute_ratios(res.compute, er.compute)
    return out


def variant_name(method: str, budget: float) -> str:
    """The row name of `method` ("x+fpf") with its final FPF at another budget (CLConfig.fpf_variants)."""
    return f"{method} (FPF budget {budget:g})"


def run_benchmark(name: str, methods: Sequence[str], seeds: Sequence[int], scenario: str = "class-il",
                  config: CLConfig | None = None, progress: bool = True,
                  log: Callable[[str], None] = print, warmup: bool = False,
                  valid_fraction: float | None = None, valid_seed: int = 0,
                  stream: TaskStream | None = None) -> dict:
    """Run `methods` on benchmark `name` for every seed; per-seed results plus mean and std per method.

    `warmup` first runs one unrecorded epoch, so that one-time start-up costs (kernel and
    allocator warm-up) do not land in the wall time of whichever method happens to run first.
    `valid_fraction` holds that fraction of each task's training data out as a validation split
    (`TaskStream.with_validation(valid_fraction, valid_seed)`): the runs train on the rest and
    record validation accuracies beside the test ones. `stream` reuses an already built stream
    of this benchmark (its own scenario and validation split; `scenario` and `valid_fraction` are then ignored).
    """
    bench = get_benchmark(name)
    runs = training_runs(methods)  # validates every method name before any work
    if not seeds:
        raise ContinualError("run_benchmark: give at least one seed")
    cfg = config or bench.preset()
    cfg.validate()  # before the (possibly slow) data preparation
    cfg.progress = progress
    if stream is None:
        stream = bench.stream(scenario)
        if valid_fraction is not None:
            stream = stream.with_validation(valid_fraction, valid_seed)
    scenario = stream.scenario
    if warmup:
        run_continual(bench.model(seeds[0], stream), stream, runs[0],
                      dataclasses.replace(cfg, epochs=1, kfpf_k=1), seeds[0])
    per_seed: dict[str, list[dict]] = {m: [] for m in methods}
    last: dict[str, CLResult] = {}
    for seed in seeds:
        results: dict[str, CLResult] = {}
        for run in runs:
            res = run_continual(bench.model(seed, stream), stream, run, dataclasses.replace(cfg), seed)
            results[run] = res
            if res.base is not None:
                results.setdefault(res.base.method, res.base)
            log(f"[{name} seed {seed}] {run}: final average accuracy {res.final_average_accuracy:.3f}"
                + (f" (before FPF {res.base.final_average_accuracy:.3f})" if res.base else ""))
        for m in methods:
            per_seed[m].append(_row(results[m], results.get("er")))
            for budget, variant in results[m].variants.items():  # CLConfig.fpf_variants
                per_seed.setdefault(variant_name(m, budget), []).append(_row(variant, results.get("er")))
        last = results
    summary = {m: summarize(rows) for m, rows in per_seed.items()}
    return {"benchmark": name, "description": bench.description, "scenario": scenario, "seeds": list(seeds),
            "task_names": stream.task_names(), "config": dataclasses.asdict(cfg), "methods": list(per_seed),
            "summary": summary, "per_seed": per_seed,
            "drift_report": {m: r.drift.table() for m, r in last.items() if r.drift is not None}}


def _fmt(stat: dict, pct: bool = True, ratio: bool = False) -> str:
    if stat["mean"] is None:
        return "–"
    if ratio:
        return f"{stat['mean']:.2f}x"
    scale = 100.0 if pct else 1.0
    return f"{scale * stat['mean']:.1f} ± {scale * stat['std']:.1f}"


def markdown_table(payload: dict) -> str:
    """A markdown table of a `run_benchmark` payload: accuracy, forgetting and compute relative to ER."""
    lines = [f"{payload['benchmark']} ({payload['scenario']}, seeds {payload['seeds']}; mean ± std over seeds)", "",
             "| method | final avg. accuracy (%) | avg. forgetting (%) | batch-steps vs ER "
             "| optimizer.step() calls vs ER "
             "| FLOPs vs ER | wall time vs ER | CPU time vs ER |", "|---|---|---|---|---|---|---|---|"]
    for m in payload["methods"]:
        s = payload["summary"][m]
        lines.append(f"| {m} | {_fmt(s['final_average_accuracy'])} | {_fmt(s['average_forgetting'])} | "
                     f"{_fmt(s['batch_steps_vs_er'], ratio=True)} | {_fmt(s['optimizer_steps_vs_er'], ratio=True)} | "
                     f"{_fmt(s['flops_vs_er'], ratio=True)} | {_fmt(s['wall_time_vs_er'], ratio=True)} | "
                     f"{_fmt(s['cpu_time_vs_er'], ratio=True)} |")
    return "\n".join(lines)
