"""What a search leaves: the Pareto front as a table (pareto.md), every trial as a plot (pareto.png) and JSON
(pareto.json), and each front member as a runnable run config (front/trial-NNNN.yaml)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml


def trial_rows(study) -> list[dict[str, Any]]:
    """One row per trial: number, state, parameters, objective values (or the last intermediate), error."""
    names = study.user_attrs.get("objectives") or [f"objective_{i}" for i in range(len(study.directions))]
    rows = []
    for t in study.get_trials(deepcopy=False):
        # a trial started after the budget was spent (workers racing) is failed by the runner: not an error
        state = "SURPLUS" if "surplus" in t.user_attrs else t.state.name
        row = {"trial": t.number, "state": state, "params": dict(t.params),
               "trainable_params": t.user_attrs.get("trainable_params")}
        if t.values is not None:
            row.update(dict(zip(names, t.values)))
        inter = t.user_attrs.get("intermediate") or {}
        if inter:
            row["last_intermediate"] = inter[max(inter, key=int)]
        if "error" in t.user_attrs:
            row["error"] = t.user_attrs["error"]
        rows.append(row)
    return rows


def front(study) -> list:
    if len(study.directions) == 1:
        done = [t for t in study.get_trials(deepcopy=False) if t.values is not None]
        return [study.best_trial] if done else []
    return sorted(study.best_trials, key=lambda t: t.values)


def write_report(study, output_dir: str | Path) -> dict[str, Any]:
    """pareto.md / .png / .json and front/*.yaml under output_dir; returns the JSON payload."""
    out = Path(output_dir)
    (out / "front").mkdir(parents=True, exist_ok=True)
    names = study.user_attrs.get("objectives") or [f"objective_{i}" for i in range(len(study.directions))]
    best = front(study)
    for t in best:
        (out / "front" / f"trial-{t.number:04d}.yaml").write_text(
            yaml.safe_dump(t.user_attrs["run_config"], sort_keys=False))
    rows = trial_rows(study)
    payload = {"study": study.study_name, "objectives": names,
               "directions": [d.name.lower() for d in study.directions],
               "front": [t.number for t in best], "trials": rows}
    (out / "pareto.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    (out / "pareto.md").write_text(markdown(payload))
    plot(payload, out / "pareto.png")
    return payload


def markdown(payload: dict[str, Any]) -> str:
    names = payload["objectives"]
    states = {}
    for r in payload["trials"]:
        states[r["state"]] = states.get(r["state"], 0) + 1
    lines = [f"# Search `{payload['study']}`: Pareto front", "",
             "Trials: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())), "",
             "| trial | " + " | ".join(names) + " | parameters | run config |",
             "|---|" + "---|" * len(names) + "---|---|"]
    by = {r["trial"]: r for r in payload["trials"]}
    for number in payload["front"]:
        r = by[number]
        vals = " | ".join(f"{r[n]:.4g}" for n in names)
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        lines.append(f"| {number} | {vals} | {params} | front/trial-{number:04d}.yaml |")
    failed = [r for r in payload["trials"] if r["state"] == "FAIL" and r.get("error")]
    if failed:
        lines += ["", "Failed trials:", ""] + [f"- trial {r['trial']}: {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


def plot(payload: dict[str, Any], path: Path) -> None:
    """Trainable parameters (log) against the first validation objective: every trial, the front joined."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    names = payload["objectives"]
    quality = next((n for n in names if n.startswith("valid_")), names[0])
    fig = Figure(figsize=(6.5, 4.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    style = {"COMPLETE": ("o", "C0", "complete"), "PRUNED": ("x", "C7", "pruned (last score)")}
    for state, (marker, colour, label) in style.items():
        pts = [(r["trainable_params"], r.get(quality, r.get("last_intermediate"))) for r in payload["trials"]
               if r["state"] == state and r.get("trainable_params")]
        pts = [p for p in pts if p[1] is not None]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, color=colour, label=label, s=22)
    by = {r["trial"]: r for r in payload["trials"]}
    pts = sorted((by[n]["trainable_params"], by[n][quality]) for n in payload["front"] if by[n].get("trainable_params"))
    if pts:
        ax.plot(*zip(*pts), "-o", color="C3", label="Pareto front", ms=5)
        for n in payload["front"]:
            if by[n].get("trainable_params"):
                ax.annotate(f"#{n}", (by[n]["trainable_params"], by[n][quality]), fontsize="x-small",
                            xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(quality.replace("_", " "))
    ax.set_title(f"search {payload['study']}: every trial")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path)
