"""What the PEFT parity tests share: the loss on a model's output, a few AdamW steps on it, PEFT loading a
folder with its report of keys, and merged weights compared key by key."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import peft
import torch
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

TOL = dict(atol=1e-5, rtol=1e-5)


def output_loss(out: torch.Tensor) -> torch.Tensor:
    """mean(out^2) + mean(out): moves every output, so no trained parameter stays at its init."""
    out = out.float()
    return (out ** 2).mean() + out.mean()


def train_steps(model: nn.Module, run: Callable[[nn.Module, int], torch.Tensor], seed: int, steps: int = 3,
                train_mode: bool = False) -> nn.Module:
    """`steps` AdamW steps (lr 0.05) on output_loss(run(model, seed + step)); the model comes back in eval
    mode. `train_mode`: step in training mode (dropout active) instead of the model's current mode."""
    if train_mode:
        model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step in range(steps):
        opt.zero_grad()
        output_loss(run(model, seed + step)).backward()
        opt.step()
    return model.eval()


def peft_load_report(base: nn.Module, folder: Path):
    """PEFT loads `folder` onto `base`: (model, warnings about keys, unexpected keys, missing keys)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(base, folder).eval()
    noisy = [str(w.message) for w in caught if any(s in str(w.message) for s in ("missing", "nexpected"))]
    result = set_peft_model_state_dict(pm, load_file(str(Path(folder) / "adapter_model.safetensors")))
    return pm, noisy, set(result.unexpected_keys), set(result.missing_keys)


def assert_same_merge(pm, ours) -> dict[str, torch.Tensor]:
    """PEFT's and our merge_and_unload give the same weights (TOL); returns PEFT's merged state."""
    merged_peft = pm.merge_and_unload().state_dict()
    merged_ours = ours.merge_and_unload().state_dict()
    assert merged_peft.keys() == merged_ours.keys()
    for key in merged_peft:
        torch.testing.assert_close(merged_ours[key], merged_peft[key], **TOL, msg=f"merged {key}")
    return merged_peft
