"""`unipeft compare` on the project's two default tasks: which method wins at which parameter budget.

    python -m benchmarks.compare --task fortunes [--seeds 3] [--steps 150] [--workers 1]
    python -m benchmarks.compare --task define   [--seeds 3] [--steps 40]

fortunes: MiniLM, examples/fortunes_lora.yaml, METHODS["fortunes"] (>= 10 methods, full fine-tuning among
them); define: SmolLM2, examples/smollm2_define.yaml, METHODS["define"] (>= 5). Every method's lr is chosen
on the validation split from GRID (declared here, the same for every method; `compare` flags a choice at the
grid's edge) and tested once per seed. The comparison's own compare.{md,json,png} are copied to
benchmarks/results/compare_<task>.*; the runs stay in runs/bench-compare-<task> so a rerun continues.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from .common import RESULTS

ROOT = Path(__file__).resolve().parent.parent
CONFIG = {"fortunes": ROOT / "examples" / "fortunes_lora.yaml", "define": ROOT / "examples" / "smollm2_define.yaml"}
METHODS = {
    "fortunes": "lora,loha,vera,ia3,bitfit,ln_tuning,ssf,bottleneck,prompt_tuning,sara,full",
    "define": "lora,ia3,ln_tuning,prompt_tuning,bitfit",
}
GRID = {"fortunes": "lr=3e-4,1e-3,3e-3,1e-2", "define": "lr=1e-4,1e-3,1e-2"}
EXTRA = {"fortunes": [], "define": ["--data.max_examples", "400"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(CONFIG), default="fortunes")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, help="max_steps of every run (default: 150 fortunes, 40 define)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--methods", help="override the declared method list (e.g. to try a subset)")
    a = p.parse_args()
    steps = a.steps or (150 if a.task == "fortunes" else 40)
    out = ROOT / "runs" / f"bench-compare-{a.task}"
    cmd = [sys.executable, "-m", "unipeft", "compare", str(CONFIG[a.task]), "--methods", a.methods or METHODS[a.task],
           "--seeds", str(a.seeds), "--grid", GRID[a.task], "--output", str(out), "--workers", str(a.workers),
           "--max_steps", str(steps), "--eval_every", str(max(1, steps // 3)), *EXTRA[a.task]]
    code = subprocess.call(cmd, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    if code:
        return code
    RESULTS.mkdir(exist_ok=True)
    for suffix in ("md", "json", "png"):
        shutil.copy(out / f"compare.{suffix}", RESULTS / f"compare_{a.task}.{suffix}")
    print(f"wrote {RESULTS}/compare_{a.task}.md, .json, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
