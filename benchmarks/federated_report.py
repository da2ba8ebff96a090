"""Summary, claims, markdown and PNG of benchmarks/federated.py's runs (every figure from those runs).

Per setting (strategy x partition, and the centralised run): the lr chosen on seed 0's validation score, test
accuracy after the last round (mean and standard error over seeds), the per-round test curve (mean over
seeds), bytes each client sent and received per round, and the first round whose test accuracy reaches 95% of
the centralised mean (per seed). Claims are judged on per-seed paired differences at Dirichlet(0.1): a claim
holds when mean - 2 SE > 0, does not hold when mean + 2 SE < 0, and is within noise otherwise.
"""
from __future__ import annotations

import statistics

from .lora_family_report import HOLDS, FAILS, judge, mean_se

FEW_KB = 16 * 1024  # FedKSeed's claim: a few KB per client per round, up and down together


def _runs(rows: list[dict], chosen: dict) -> dict[str, list[dict]]:
    out = {}
    for name, lr in chosen.items():
        strategy, part = name.split("/")
        out[name] = sorted((r for r in rows if r["strategy"] == strategy and r["partition"] == part and r["lr"] == lr),
                           key=lambda r: r["seed"])
    return out


def _first_reach(run: dict, target: float) -> int | None:
    return next((r["round"] for r in run["rounds"] if (r.get("test_accuracy") or 0) >= target and r["round"] > 0),
                None)


def summarise(rows: list[dict], chosen: dict) -> dict:
    runs = _runs(rows, chosen)
    central = statistics.fmean(r["test_accuracy"] for r in runs["centralised/all"])
    target = 0.95 * central
    table = {}
    for name, rs in runs.items():
        m, se = mean_se([r["test_accuracy"] for r in rs])
        entry = {"lr": chosen[name], "seeds": len(rs), "test_mean": m, "test_se": se,
                 "valid_mean": statistics.fmean(r["valid_accuracy"] for r in rs),
                 "seconds": statistics.median(r["seconds"] for r in rs)}
        if not name.startswith("centralised"):
            n = len(rs[0]["rounds"])
            entry["curve"] = [statistics.fmean(r["rounds"][i]["test_accuracy"] for r in rs) for i in range(n)]
            entry["up_bytes"] = statistics.median(r["up_bytes"] for r in rs)
            entry["down_bytes"] = statistics.median(r["down_bytes"] for r in rs)
            entry["rounds_to_95"] = [_first_reach(r, target) for r in rs]
        table[name] = entry
    claims = {}
    for other in ("ffa_lora", "lora_fair", "fedavg_exact"):
        a, b = runs.get(f"{other}/dir0.1"), runs.get("fedavg/dir0.1")
        if a and b:
            by = {r["seed"]: r["test_accuracy"] for r in b}
            diffs = [r["test_accuracy"] - by[r["seed"]] for r in a if r["seed"] in by]
            claims[f"{other} beats naive FedAvg-LoRA at Dirichlet(0.1)"] = {**judge(diffs), "unit": "test accuracy"}
    if "fedkseed/dir0.1" in table and "fedavg/dir0.1" in table:
        k, f = table["fedkseed/dir0.1"], table["fedavg/dir0.1"]
        per_round = k["up_bytes"] + k["down_bytes"]
        claims["FedKSeed sends a few KB per client per round"] = {
            "mean": per_round, "band": [per_round, per_round], "seeds": k["seeds"], "unit": "bytes up + down",
            "verdict": HOLDS if per_round <= FEW_KB else FAILS, "target": f"<= {FEW_KB}",
            "vs_fedavg": (f["up_bytes"] + f["down_bytes"]) / per_round}
    return {"table": table, "claims": claims, "chosen": chosen, "centralised_test": central, "target_95": target,
            "runs": rows}


def markdown(res: dict) -> str:
    t = res["table"]
    lines = [f"# Federated LoRA on fortunes: {res['clients']} clients, {res['rounds']} rounds x {res['local_steps']} "
             f"local steps ({res['rounds'] * res['clients'] * res['local_steps']} steps of 16 in all)", "",
             f"Centralised (`unipeft train`, same steps, whole training split): test "
             f"{res['centralised_test']:.3f}; 95% of it: {res['target_95']:.3f}. lr chosen on seed 0's validation "
             f"from {res['grids']}; {res['seeds']} seeds. {res['runs_trained']} runs trained, {res['runs_reused']} "
             f"reused, {res['seconds']:.0f} s.", "",
             "| strategy | partition | lr | test (mean ± se) | up KB/client/round | down KB | rounds to 95% (per seed) "
             "| s/run |", "|---|---|---|---|---|---|---|---|"]
    grids = res["grids"]
    for name, e in t.items():
        strategy, part = name.split("/")
        g = grids["fedkseed" if strategy == "fedkseed" else "centralised" if strategy == "centralised" else "lora"]
        edge = " (grid edge)" if e["lr"] in (min(g), max(g)) else ""
        up = f"{e['up_bytes'] / 1024:.1f}" if "up_bytes" in e else "-"
        down = f"{e['down_bytes'] / 1024:.1f}" if "down_bytes" in e else "-"
        reach = ", ".join("-" if x is None else str(x) for x in e.get("rounds_to_95", [])) or "-"
        lines.append(f"| {strategy} | {part} | {e['lr']:g}{edge} | {e['test_mean']:.3f} ± {e['test_se']:.3f} | {up} | "
                     f"{down} | {reach} | {e['seconds']:.0f} |")
    lines += ["", "'-' in rounds to 95%: not reached within the rounds run.", "", "## Claims", "",
              "| claim | value | band (mean ± 2 se) | seeds | verdict |", "|---|---|---|---|---|"]
    for name, c in res["claims"].items():
        lines.append(f"| {name} | {c['mean']:.4g} {c['unit']} | [{c['band'][0]:.4g}, {c['band'][1]:.4g}] | "
                     f"{c['seeds']} | {c['verdict']} |")
    k = res["claims"].get("FedKSeed sends a few KB per client per round")
    if k:
        lines += ["", f"FedAvg-LoRA moves {k['vs_fedavg']:.0f}x the bytes of FedKSeed per client per round."]
    return "\n".join(lines) + "\n"


def plot(res: dict, path) -> None:
    from .plots import bars, curves, panels, save
    t = res["table"]
    parts = sorted({n.split("/")[1] for n in t if not n.startswith("centralised")})
    fig, axes = panels(len(parts) + 1, "Federated LoRA on fortunes (test accuracy per round, mean over seeds)")
    for ax, part in zip(axes, parts):
        series = {n.split("/")[0]: (range(len(e["curve"])), e["curve"]) for n, e in t.items() if n.endswith("/" + part)}
        curves(ax, series, title=part, xlabel="round", ylabel="test accuracy")
        ax.axhline(res["centralised_test"], color="k", lw=1, label="centralised")
        ax.axhline(res["target_95"], color="k", lw=1, ls="--", label="95% of centralised")
        ax.legend(fontsize="x-small")
    names = [n for n in t if n.endswith("/" + parts[-1])]
    bars(axes[-1], [n.split("/")[0] for n in names], {"KB per client per round (up)": [t[n]["up_bytes"] / 1024
                                                                                        for n in names]},
         title="communication", ylabel="KB (log)", value_format="{:.1f}", rotate=True)
    axes[-1].set_yscale("log")
    save(fig, path)
