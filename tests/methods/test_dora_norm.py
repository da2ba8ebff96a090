"""DoRA's weight norm without forming B @ A: equal to the direct norm, cached until A, B or W change."""
from __future__ import annotations

import pytest
import torch

import unipeft as up
from unipeft.core import layers
from unipeft.methods.lora.variants import DoRA

from ..interop._models import build


def direct_norm(d) -> torch.Tensor:
    w = layers.dense_weight(d.base)
    return torch.linalg.norm(w + d.scaling * d.lora_B.weight @ d.lora_A.weight, dim=1)


@pytest.mark.parametrize("kind,target", [("bert", "query"), ("gpt2", "c_attn"), ("llama", "q_proj")])
def test_norm_equals_the_direct_one(kind, target):
    model = up.adapt(build(kind), up.LoraConfig(r=4, alpha=8, use_dora=True, target_modules=[target]))
    torch.manual_seed(0)
    for d in model.deltas("default"):
        with torch.no_grad():
            d.lora_B.weight.normal_(0, 0.5)
        got, want = DoRA.weight_norm(d), direct_norm(d)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_norm_is_cached_until_a_weight_changes():
    model = up.adapt(build("bert"), up.LoraConfig(r=4, use_dora=True, target_modules=["query"]))
    d = model.deltas("default")[0]
    first = DoRA.weight_norm(d)
    assert DoRA.weight_norm(d) is first  # nothing changed: the cached tensor
    with torch.no_grad():
        d.lora_B.weight.add_(0.3)  # an optimizer step changes B in place
    second = DoRA.weight_norm(d)
    assert second is not first and (second - direct_norm(d)).abs().max() < 1e-5 * second.max()
    with torch.no_grad():
        d.base.weight.mul_(2)  # e.g. another adapter merged into the base
    third = DoRA.weight_norm(d)
    assert (third - direct_norm(d)).abs().max() < 1e-5 * third.max()
