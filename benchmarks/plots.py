"""PNG figures beside the benchmark JSON results: bars with error bars and learning curves (matplotlib Agg).

The reproduction scripts call `png_path(json_path)` for the name, build panels with `bars` /
`curves` on axes from `panels` (or `new_figure` + subplot_mosaic), and write with `save`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PANEL = (5.0, 3.6)  # inches per panel; at dpi 100 a panel is 500 x 360 pixels
DPI = 100


def png_path(json_path: str | Path) -> Path:
    """The PNG that goes beside a result JSON: same folder, same stem."""
    return Path(json_path).with_suffix(".png")


def new_figure(width: float, height: float, title: str = "") -> Any:
    """An empty figure on the Agg canvas (no display, no pyplot state), `width` x `height` inches."""
    # Figure + FigureCanvasAgg instead of pyplot: no backend is switched under whoever imported us.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    if title:
        fig.suptitle(title)
    return fig


def panels(n: int, title: str = "", cols: int | None = None, size: tuple[float, float] = PANEL) -> tuple[Any, list]:
    """A figure of `n` panels on a grid (`cols` per row, default up to 3) and its axes, in reading order."""
    cols = cols or (2 if n in (2, 4) else min(3, n))
    rows = -(-n // cols)
    fig = new_figure(size[0] * cols, size[1] * rows + (0.5 if title else 0.0), title)
    axes = list(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def bars(ax: Any, categories: Sequence[str], series: Mapping[str, Sequence[float | None]],
         errors: Mapping[str, Sequence[float | None]] | None = None, title: str = "", ylabel: str = "",
         value_format: str | None = None, rotate: bool = False) -> None:
    """Grouped bars: one group per category, one bar per series, optional +-error bars; None draws no bar."""
    import math

    width = 0.8 / max(1, len(series))
    crowded = len(categories) * len(series) > 6  # numbers side by side would overlap: upright, without the ±
    for k, (name, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(categories))]
        ys = [math.nan if v is None else float(v) for v in values]
        err = None
        if errors is not None and name in errors:
            err = [0.0 if e is None else float(e) for e in errors[name]]
            err = err if any(err) else None  # all zero (one seed): no caps drawn on every bar
        # One series: a colour per category (they are the things compared); several: a colour per series.
        colour = [f"C{i}" for i in range(len(categories))] if len(series) == 1 else f"C{k}"
        ax.bar(xs, ys, width * 0.95, yerr=err, capsize=3 if err else 0, label=name if len(series) > 1 else None,
               color=colour, error_kw={"elinewidth": 1.0})
        if value_format:
            for i, (x, y) in enumerate(zip(xs, ys)):
                if math.isnan(y):
                    continue
                e = err[i] if err else 0.0
                text = value_format.format(y) + (f" ± {value_format.format(e)}" if e and not crowded else "")
                # Above the error bar, so neither a short bar nor the bar's cap hides the number.
                ax.annotate(text, (x, y + e if y >= 0 else y - e), xytext=(0, 2 if y >= 0 else -2),
                            textcoords="offset points", ha="center", va="bottom" if y >= 0 else "top",
                            fontsize="x-small", rotation=90 if crowded else 0)
    if value_format or len(series) > 1:
        ax.margins(y=0.2 if crowded else 0.15)  # head room for the numbers, or the legend, above the tallest bar
    ax.set_xticks(range(len(categories)), list(categories), rotation=30 if rotate else 0,
                  ha="right" if rotate else "center", fontsize="small")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    if len(series) > 1:
        ax.legend(fontsize="small")


def curves(ax: Any, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], title: str = "",
           xlabel: str = "step", ylabel: str = "", marker: str = "o") -> None:
    """Learning curves: one line (x, y) per series, with a legend when there are several."""
    for k, (name, (xs, ys)) in enumerate(series.items()):
        ax.plot(list(xs), list(ys), marker=marker, markersize=3, color=f"C{k}", label=name)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and task numbers are whole numbers
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize="small")


def save(fig: Any, path: str | Path) -> Path:
    """Write `fig` as PNG to `path` (its folder is created), never leaving half a PNG behind."""
    from unipeft.train.plots import save_png

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return save_png(fig, path)
