"""The no-training reference: the base model evaluated as loaded (zero-shot for a causal LM; for a
classifier the freshly initialised head, which is seeded like every run's), on validation and test."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..search.config import SearchPlan
from ..search.memory import peak_mib, reset_peak


def baseline_run(plan: SearchPlan, seed: int) -> dict[str, Any]:
    """Metrics of the untrained model under `seed`; cached in <output_dir>/baseline-seed<seed>.json."""
    path = Path(plan.search.output_dir) / f"baseline-seed{seed}.json"
    if path.is_file():
        return json.loads(path.read_text())
    from ..train.config import config_from_dict
    from ..train.evaluate import evaluate
    from ..train.setup import build_parts
    data = {**plan.run, "method": {"name": "full"}, "seed": seed, "output_dir": str(path.parent / "baseline")}
    cfg = config_from_dict(data, f"{plan.source} (no-training baseline)")
    started, mark = time.perf_counter(), reset_peak()
    parts = build_parts(cfg)
    parts.model.eval()
    out = {"seed": seed, "trainable_params": 0,
           "total_params": sum(p.numel() for p in parts.model.parameters())}
    for split in ("valid", "test"):
        encoded = parts.encode(split)
        out[split] = evaluate(parts.model, encoded, cfg.task, cfg.eval_batch_size, parts.pad_id,
                              len(parts.label_names)) if len(encoded) else {}
    out.update(seconds=time.perf_counter() - started, peak_mib=peak_mib(mark))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    tmp.replace(path)
    return out
