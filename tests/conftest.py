"""Shared test set-up: offline, deterministic, single-threaded (tiny models run faster on 1 thread)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402  (after the environment is set)

# Tiny models: thread start-up costs more than it saves (about 10x slower with 2 threads here).
torch.set_num_threads(1)
