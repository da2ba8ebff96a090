"""End to end on the real MiniLM: `unipeft train` with DePT uses two learning rates and saves a loadable adapter."""
from __future__ import annotations

import pytest
import torch

import unipeft as up


@pytest.mark.slow
def test_dept_trains_on_minilm_with_two_learning_rates(tmp_path):
    from unipeft.train.callbacks import TrainerCallback
    from unipeft.train.config import config_from_dict
    from unipeft.train.run import train_run
    from unipeft.train.setup import build_parts

    seen = {}

    class Groups(TrainerCallback):
        def on_train_begin(self, ctx) -> None:
            seen["lrs"] = sorted(g["initial_lr"] if "initial_lr" in g else g["lr"] for g in ctx.optimizer.param_groups)
            names = {id(p): n for n, p in ctx.model.named_parameters()}
            seen["groups"] = {g.get("name", "?"): sorted(names[id(p)].rsplit(".", 1)[-1] for p in g["params"])
                              for g in ctx.optimizer.param_groups}

    cfg = config_from_dict({
        "model": "minilm", "task": "classification",
        "data": {"source": "fortunes", "categories": ["food", "love"], "max_per_category": 12, "max_length": 32},
        "method": {"name": "dept", "num_virtual_tokens": 4, "rank": 2, "max_length": 32,
                   "lr_embedding_update": 1e-4},
        "optimizer": {"lr": 3e-2, "groups": [{"params": "classifier", "lr": 1e-2}]},
        "max_steps": 2, "batch_size": 4, "threads": 1, "output_dir": str(tmp_path / "run"), "seed": 0})
    summary = train_run(cfg, show_progress=False, callbacks=[Groups()], log=lambda *a: None)
    assert summary["status"] == "complete" and summary["steps"] == 2
    assert seen["lrs"] == [1e-4, 1e-2, 3e-2]
    update = [v for v in seen["groups"].values() if "lora_embedding_A" in v]
    assert update == [["lora_embedding_A", "lora_embedding_B"]]
    # The saved adapter (prompt + update + head) reloads onto a fresh MiniLM and runs.
    parts = build_parts(cfg)
    base = parts.model.unload()
    loaded = up.AdaptedModel.from_pretrained(base, tmp_path / "run" / "adapter")
    assert isinstance(loaded.peft_config["default"], up.DeptConfig)
    ids = torch.tensor([[101, 2833, 2003, 2204, 102]])
    with torch.no_grad():
        out = loaded(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert out.shape == (1, 2) and torch.isfinite(out).all()
