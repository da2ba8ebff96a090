"""compare.png: test quality vs trainable fraction (log), bubble area = peak memory, the baseline as a line."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def plot(s: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = {n: m for n, m in s["methods"].items() if "test" in m}
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    peaks = [m["peak_mib"] for m in done.values() if m["peak_mib"]]
    top = max(peaks) if peaks else 1.0
    for name, m in done.items():
        size = 60 + 900 * (m["peak_mib"] / top if m["peak_mib"] else 0.1)
        x = max(m["trainable_fraction"], 1e-7)
        ax.scatter([x], [m["test"][0]], s=size, alpha=0.45)
        ax.errorbar([x], [m["test"][0]], yerr=[2 * m["test"][1]], fmt="none", ecolor="black", capsize=3, lw=0.8)
        ax.annotate(name, (x, m["test"][0]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    if s["baseline"]:
        ax.axhline(s["baseline"]["test"][0], ls="--", color="grey", lw=1, label="no training")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable fraction of the model's parameters (log)")
    ax.set_ylabel(f"test {s['metric']} (mean, ±2 SE)")
    ax.set_title("Methods on this task; bubble area = peak resident memory")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
