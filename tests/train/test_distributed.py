"""The same run on 2 CPU processes (torchrun, gloo) and on 1 process gives the same adapter."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from unipeft.train import config_from_dict, train_run

from ._helpers import adapter_tensors, summary, tiny_config, write_config

# Float sums of gradients happen in a different order (per-process partial sums, then the
# all-reduce), so results agree to rounding, not bit for bit. Adapter entries are O(1e-1).
TOLERANCE = 1e-5


def test_two_processes_match_one(tiny_bert, word_csv, tmp_path):
    # global batch 8: one process x 1 micro-batch of 8, vs 2 processes x 2 micro-batches of 2
    common = dict(max_steps=6, eval_every=3, save_every=3, log_every=1)
    one = tiny_config(tiny_bert, word_csv, tmp_path / "one", **common)
    two = tiny_config(tiny_bert, word_csv, tmp_path / "two", grad_accum=2, **common)
    config = write_config(tmp_path / "two.yaml", **two)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "unipeft.cli", "train", str(config), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("test accuracy") == 1  # only the main process prints
    train_run(config_from_dict(one), show_progress=False, log=lambda *_: None)

    s1, s2 = summary(tmp_path / "one"), summary(tmp_path / "two")
    assert (s1["world_size"], s2["world_size"], s2["backend"]) == (1, 2, "gloo")
    a, b = adapter_tensors(tmp_path / "one"), adapter_tensors(tmp_path / "two")
    assert a.keys() == b.keys()
    largest = max(float(t.abs().max()) for k, t in a.items() if "lora_B" in k)
    assert largest > 1e-2  # the adapter moved well beyond the tolerance
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=TOLERANCE, rtol=0)
    # metrics are computed over all processes: the same numbers as one process
    assert s2["test"]["accuracy"] == s1["test"]["accuracy"] and s2["test"]["examples"] == 15
    losses = [[json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
               if "split" not in json.loads(x)] for name in ("one", "two")]
    assert len(losses[0]) == len(losses[1]) == 6  # the logged loss is the global batch's, on any process count
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), atol=1e-5, rtol=0)
