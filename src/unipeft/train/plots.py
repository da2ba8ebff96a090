"""The figure of a run's metrics.jsonl: one panel per quantity (loss, learning rate, validation metrics) vs step.

metrics.jsonl (written by progress.MetricsLog) holds three kinds of records, each with an integer
"step": training records every log_every steps (no "split"; loss, lr, samples_per_s, grad_norm when
clipping), "split": "valid" records at each evaluation (accuracy, macro_f1, loss or perplexity,
token_accuracy) and one "split": "test" record at the end of a finished run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..core.errors import UnipeftError

METRICS = "metrics.jsonl"
DEFAULT_NAME = "report.png"
# Bookkeeping fields, not quantities: throughput depends on the machine's load, not on training.
NOT_PLOTTED = frozenset({"step", "epoch", "split", "examples", "samples_per_s"})
LABELS = {"loss": "loss", "lr": "learning rate", "grad_norm": "gradient norm",
          "accuracy": "accuracy", "macro_f1": "macro-F1", "perplexity": "perplexity",
          "token_accuracy": "token accuracy"}
STYLE = {"train": dict(color="C0", linestyle="-", linewidth=1.5),
         "valid": dict(color="C1", linestyle="-", marker="o", markersize=4),
         "test": dict(color="C3", linestyle="none", marker="*", markersize=11)}


class MetricsError(UnipeftError, ValueError):
    """A run's metrics.jsonl is missing, empty or unreadable (the CLI prints one line, exit code 2)."""


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, in file order; MetricsError if it is missing, empty or malformed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MetricsError(f"{path}: no such file (unipeft train writes it into the run folder)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MetricsError(f"{path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MetricsError(f"{path} line {number}: not a JSON object ({exc.msg})") from None
        if not isinstance(record, dict) or type(record.get("step")) is not int:
            raise MetricsError(f"{path} line {number}: expected a JSON object with an integer 'step'")
        records.append(record)
    if not records:
        raise MetricsError(f"{path} is empty: the run has not logged a step yet (it logs every log_every steps)")
    return records


def series(records: list[dict[str, Any]]) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """quantity -> split ('train', 'valid', 'test') -> (steps, values), quantities in order of first appearance."""
    out: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for record in records:
        split = record.get("split", "train")
        for key, value in record.items():
            # bool is an int subclass; a flag is no quantity to draw.
            if key in NOT_PLOTTED or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            steps, values = out.setdefault(key, {}).setdefault(split, ([], []))
            steps.append(record["step"])
            values.append(float(value))
    return out


def _steps_per_epoch(records: list[dict[str, Any]]) -> int | None:
    for r in records:
        epoch = r.get("epoch")
        if isinstance(epoch, (int, float)) and epoch > 0:
            return round(r["step"] / epoch)
    return None


def run_title(run_dir: Path) -> str:
    """'<folder>: <method> on <model> (<task>)' from summary.json, else config.yaml (a run in progress)."""
    name = run_dir.resolve().name
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        return f"{name}: {summary['method']} on {summary['model']} ({summary['task']})"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        import yaml

        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        model = cfg["model"]["name"] if isinstance(cfg["model"], dict) else cfg["model"]
        return f"{name}: {cfg['method']['name']} on {model} ({cfg['task']}), not finished"
    except Exception:  # noqa: BLE001 - the title is a courtesy: the figure needs only metrics.jsonl
        return name


def draw(records: list[dict[str, Any]], out: str | Path, title: str = "") -> Path:
    """Draw `records` (of read_metrics) to the PNG `out`, one panel per quantity; written atomically."""
    # Figure + the Agg canvas, not pyplot: no display, and no global backend switched under the caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    quantities = series(records)
    if not quantities:
        raise MetricsError("metrics.jsonl holds no numeric quantity to draw")
    n = len(quantities)
    cols = 2 if n in (2, 4) else min(3, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(5.0 * cols, 3.4 * rows + 0.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    spe = _steps_per_epoch(records)
    xlabel = "optimizer step" + (f" ({spe} per epoch)" if spe else "")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (key, splits) in zip(axes, quantities.items()):
        label = LABELS.get(key, key.replace("_", " "))
        for split in ("train", "valid", "test"):
            if split in splits:
                steps, values = splits[split]
                style = dict(STYLE[split])
                if split == "train" and len(steps) == 1:
                    style["marker"] = "o"  # a lone point of a line is invisible otherwise
                ax.plot(steps, values, label=split, **style)
        only = next(iter(splits)) if len(splits) == 1 else "train"
        ax.set_title(label if only == "train" else f"{label} ({only})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if len(splits) > 1:
            ax.legend(fontsize="small")
    # One step range on every panel, so a validation point lines up with the training curve above it.
    steps = [r["step"] for r in records]
    pad = max(1.0, 0.03 * (max(steps) - min(steps)))
    for ax in axes[:n]:
        ax.set_xlim(min(steps) - pad, max(steps) + pad)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return save_png(fig, out)


def save_png(fig: Any, out: str | Path) -> Path:
    """Write `fig` as a PNG at `out` through a temporary file beside it, so a crash never leaves half a PNG."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw RUN_DIR/metrics.jsonl to `out` (default RUN_DIR/report.png); MetricsError before writing anything."""
    run_dir = Path(run_dir)
    metrics = run_dir / METRICS
    partial = run_dir.with_name(run_dir.name + ".partial") / METRICS
    hint = f"; the run in progress logs to {partial}" if partial.exists() else ""
    if not run_dir.is_dir():
        raise MetricsError(f"{run_dir} is not a folder; give a run folder (the output_dir of unipeft train){hint}")
    if not metrics.exists():
        raise MetricsError(f"{metrics}: no such file{hint}")
    out = Path(out) if out is not None else run_dir / DEFAULT_NAME
    if out.suffix.lower() != ".png":
        raise MetricsError(f"--out {out}: the report is a PNG; give a path ending in .png")
    if not out.parent.is_dir():
        raise MetricsError(f"--out {out}: folder {out.parent} does not exist")
    records = read_metrics(metrics)
    return draw(records, out, run_title(run_dir))
