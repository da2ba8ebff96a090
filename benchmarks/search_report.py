"""Markdown and PNG of benchmarks/search.py (every figure from that run)."""
from __future__ import annotations


def markdown(res: dict) -> str:
    ref = res["reference"]
    lines = [f"# Configuration search on fortunes: {res['trials']} trials of {res['steps']} steps, {res['seeds']} "
             f"seeds per sampler", "",
             f"Reference: default LoRA r=8 (query/key/value/dense), {ref['trainable_params']} trainable parameters, "
             f"test {ref['test_mean']:.3f} ± {ref['test_se']:.3f} (same steps). A search's pick: the finished trial "
             f"with <= {ref['limit']:.0f} trainable parameters (1/4) and the best validation accuracy, retrained "
             f"and tested. {res['seconds']:.0f} s in all.", "",
             "| sampler | seed | trials complete / pruned / failed | pick | pick params | pick valid | pick test "
             "| search s |", "|---|---|---|---|---|---|---|---|"]
    for sampler, runs in res["searches"].items():
        for r in runs:
            states = [t["state"] for t in r["trials"]]
            counts = f"{states.count('COMPLETE')} / {states.count('PRUNED')} / {states.count('FAIL')}"
            p = r["pick"]
            if p is None:
                lines.append(f"| {sampler} | {r['seed']} | {counts} | none at <= 1/4 | - | - | - | {r['seconds']:.0f} |")
                continue
            shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in p["params"].items())
            lines.append(f"| {sampler} | {r['seed']} | {counts} | #{p['trial']}: {shown} | {p['trainable_params']} | "
                         f"{p['valid']:.3f} | {p['test']:.3f} | {r['seconds']:.0f} |")
    lines += ["", "## Does the search find >= the reference's test accuracy at <= 1/4 of its parameters?", "",
              "| sampler | pick test - reference (mean) | band (mean ± 2 se) | per seed | verdict |",
              "|---|---|---|---|---|"]
    for sampler, c in res["claims"].items():
        per = ", ".join(f"{d:+.3f}" for d in c["per_seed"])
        lines.append(f"| {sampler} | {c['mean']:+.3f} | [{c['band'][0]:+.3f}, {c['band'][1]:+.3f}] | {per} | "
                     f"{c['verdict']} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path) -> None:
    from .plots import panels, save
    fig, axes = panels(len(res["searches"]), "Trials of each search (validation accuracy vs trainable parameters)")
    ref = res["reference"]
    for ax, (sampler, runs) in zip(axes, res["searches"].items()):
        for k, r in enumerate(runs):
            pts = [(t["trainable_params"], t["valid_accuracy"]) for t in r["trials"] if t["state"] == "COMPLETE"]
            if pts:
                ax.scatter(*zip(*pts), s=16, color=f"C{k}", label=f"seed {r['seed']}")
            if r["pick"]:
                ax.scatter([r["pick"]["trainable_params"]], [r["pick"]["valid"]], marker="*", s=120, color=f"C{k}",
                           edgecolor="k")
        refs = [(x["trainable_params"], x["valid"]) for x in ref["runs"]]
        ax.scatter(*zip(*refs), marker="s", color="k", label="LoRA r=8 (reference)")
        ax.axvline(ref["limit"], color="k", ls="--", lw=1, label="1/4 of its parameters")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("validation accuracy")
        ax.set_title(f"{sampler} (star: the pick)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small")
    save(fig, path)
