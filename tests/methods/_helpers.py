"""What the shared-basis method tests share: a briefly trained adapter on the tiny BERT, its merge / unmerge /
save-load round trip, a base left as it was, and a folder whose seed does not match its stored bases refused
without touching anything."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import unipeft as up
from tests.interop._models import build, inputs, output
from tests.interop._parity import TOL, train_on


def trained_bert(make: Callable[[], up.AdapterConfig]) -> up.AdaptedModel:
    """make()'s adapter on the tiny BERT (built after torch.manual_seed(0)), three AdamW steps from batch
    seed 10 on mean(out^2) + mean(out); back in eval mode."""
    torch.manual_seed(0)
    return train_on(up.adapt(build("bert"), make()), "bert", 10)


def assert_merge_unmerge_and_reload(model: up.AdaptedModel, folder: Path, *, moved: float,
                                    load_tol: float = 0.0) -> None:
    """On BERT batch seed 99: the trained `model`'s output differs from the base's by more than `moved`; saved
    in `folder` and loaded onto a fresh base (after torch.manual_seed(123), so that the loaded adapter's own
    init draws other numbers) it gives the same output (exactly, or within atol = rtol = `load_tol`); merged,
    the same within TOL; unmerged again, within atol 1e-6."""
    batch = inputs("bert", seed=99)
    with torch.no_grad():
        before = output(model, batch)
        assert (before - output(build("bert"), batch)).abs().max() > moved, "training did not change the output"
    model.save_pretrained(folder)
    torch.manual_seed(123)  # the loaded adapter's own init draws other numbers
    loaded = up.AdaptedModel.from_pretrained(build("bert"), folder)
    with torch.no_grad():
        torch.testing.assert_close(output(loaded, batch), before, atol=load_tol, rtol=load_tol)
        model.merge()
        torch.testing.assert_close(output(model, batch), before, **TOL)
        model.unmerge()
        torch.testing.assert_close(output(model, batch), before, rtol=0, atol=1e-6)


def state_of(base: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of `base`'s state, for assert_untouched."""
    return {k: v.clone() for k, v in base.state_dict().items()}


def assert_untouched(base: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """`base` holds no delta and the same state as `state` (from state_of)."""
    assert not any(isinstance(m, up.Delta) for m in base.modules())
    assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items())


def assert_seed_mismatch_refused(folder: Path, cls: str, field: str) -> None:
    """With `field`=7 written into `folder`'s adapter_config.json (not the seed its stored bases came from):
    loading onto a fresh base is one AdapterLoadError naming `cls`.`field`=7 that leaves the base as it was
    (no delta, the same weights, the same output); loading into an adapted model fails naming the field and
    leaves its adapters and outputs as they were."""
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: 7}))
    base = build("bert")
    batch = inputs("bert", seed=5)
    with torch.no_grad():
        expected = output(base, batch)
    state = state_of(base)
    with pytest.raises(up.AdapterLoadError, match=rf"{cls}\.{field}=7"):
        up.AdaptedModel.from_pretrained(base, folder)
    assert_untouched(base, state)
    with torch.no_grad():
        torch.testing.assert_close(output(base, batch), expected, rtol=0, atol=0)
    # Into an adapted model: the failed load leaves its adapters and outputs as they were.
    host = up.adapt(build("bert"), up.LoraConfig(r=2, target_modules=["key"]))
    with torch.no_grad():
        host_out = output(host, batch)
    with pytest.raises(up.AdapterLoadError, match=field):
        host.load_adapter(folder, "other")
    assert list(host.peft_config) == ["default"] and not host.banks
    with torch.no_grad():
        torch.testing.assert_close(output(host, batch), host_out, rtol=0, atol=0)
