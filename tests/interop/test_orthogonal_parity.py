"""PEFT parity of the orthogonal methods (OFT with the Neumann and exact Cayley maps, shared blocks,
COFT and embeddings; BOFT by block size / count, on Conv2d, and with two butterfly factors; HRA with
and without Gram-Schmidt, on Conv2d): PEFT-trained folders load in unipeft with identical outputs
and merged weights; our folders load in PEFT with no missing or unexpected keys and identical
outputs."""
from __future__ import annotations

import peft
import peft.tuners.boft.layer as boft_layer
import pytest
import torch
from torch import nn

import unipeft as up

from ._models import build, inputs
from ._parity import (assert_our_folder_loads_in_peft, assert_outputs_match, assert_same_merge, ours_trained,
                      peft_loads_ours, peft_trained)

QV = ["query", "value", "intermediate.dense"]  # all read 32 features in the tiny BERT

CASES = {
    "oft-neumann": ("bert", lambda: peft.OFTConfig(oft_block_size=8, target_modules=QV)),
    "oft-exact-shared": ("llama", lambda: peft.OFTConfig(r=4, oft_block_size=0, use_cayley_neumann=False,
                                                         block_share=True, target_modules=["q_proj", "down_proj"])),
    "oft-coft": ("bert", lambda: peft.OFTConfig(oft_block_size=4, coft=True, eps=0.3, use_cayley_neumann=False,
                                                target_modules=QV)),
    "oft-neumann-3-terms": ("llama", lambda: peft.OFTConfig(oft_block_size=16, num_cayley_neumann_terms=3,
                                                            target_modules=["v_proj", "gate_proj"])),
    "oft-embedding": ("bert", lambda: peft.OFTConfig(oft_block_size=8, target_modules=["word_embeddings", "query"])),
    "oft-conv1x1": ("conv1x1", lambda: peft.OFTConfig(oft_block_size=2, target_modules=["mix", "head"])),
    "boft-size": ("bert", lambda: peft.BOFTConfig(boft_block_size=4, target_modules=QV)),
    "boft-num": ("llama", lambda: peft.BOFTConfig(boft_block_size=0, boft_block_num=4,
                                                  target_modules=["q_proj", "down_proj"])),
    "boft-conv": ("conv", lambda: peft.BOFTConfig(boft_block_size=2, target_modules=["conv2", "head"])),
    "hra": ("bert", lambda: peft.HRAConfig(r=4, target_modules=QV)),
    "hra-gs": ("llama", lambda: peft.HRAConfig(r=3, apply_GS=True, target_modules=["q_proj", "down_proj"])),
    "hra-conv": ("conv", lambda: peft.HRAConfig(r=2, target_modules=["conv2", "head"])),
}


class Conv1x1Net(nn.Module):
    """A 1x1 Conv2d (the kernel for which PEFT's unmerged OFT forward equals its merge) and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.mix = nn.Conv2d(6, 8, 1)
        self.head = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):  # x: (B, 3, 16)
        h = torch.relu(self.conv(x.view(x.shape[0], 3, 4, 4)))
        return self.head(torch.relu(self.mix(h)).flatten(1))


def _build(kind: str):
    if kind == "conv1x1":
        torch.manual_seed(0)
        return Conv1x1Net().eval()
    return build(kind)


def _inputs(kind: str, seed: int):
    return inputs("conv" if kind == "conv1x1" else kind, seed=seed)


class _BlockDiagKernel:
    """Stands in for PEFT's CUDA block-diagonal extension (forward/backward in plain torch), so PEFT
    builds more than one butterfly factor on CPU."""

    @staticmethod
    def forward(x):
        return [torch.stack([torch.block_diag(*blocks) for blocks in x])]

    @staticmethod
    def backward(grad, x):
        n, d, h, _ = x.shape
        return [torch.stack([torch.stack([g[i * h:(i + 1) * h, i * h:(i + 1) * h] for i in range(d)]) for g in grad])]


@pytest.fixture(autouse=True)
def _no_cuda_build(monkeypatch):
    """PEFT's BOFT tries to compile a CUDA kernel on first use; False = "not available" (one factor)."""
    monkeypatch.setattr(boft_layer, "_FBD_CUDA", False)


def _peft_trained_folder_matches(kind, make, tmp_path, factor_check=None):
    pm, ours = peft_trained(kind, make, tmp_path, base=_build, batch=_inputs)
    if factor_check is not None:
        factor_check(ours)
    assert_outputs_match(pm, ours, kind, 99, moved=1e-4, base=_build, batch=_inputs)
    assert_same_merge(pm, ours, base=_build(kind))


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_trained_folder_loads_with_identical_outputs_and_merge(case, tmp_path):
    kind, make = CASES[case]
    _peft_trained_folder_matches(kind, make, tmp_path)


@pytest.mark.parametrize("case", sorted(CASES))
def test_our_folder_loads_in_peft_with_no_missing_or_unexpected_keys(case, tmp_path):
    kind, make = CASES[case]
    assert up.AdapterConfig.from_dict(make().to_dict()).peft_type == make().peft_type
    assert_our_folder_loads_in_peft(kind, make, tmp_path, moved=1e-4, base=_build, batch=_inputs)


def _two_factors(model):
    deltas = model.deltas("default")
    assert deltas and all(d.boft_R.shape[0] == 2 for d in deltas)


def test_boft_two_butterfly_factors_match_peft_both_ways(monkeypatch, tmp_path):
    """With a block-diagonal kernel available PEFT builds two butterfly factors; both sides agree."""
    monkeypatch.setattr(boft_layer, "_FBD_CUDA", _BlockDiagKernel())
    make = lambda: peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=QV)  # noqa: E731
    _peft_trained_folder_matches("bert", make, tmp_path / "from_peft", factor_check=_two_factors)
    ours = ours_trained("bert", make, tmp_path / "ours")
    _two_factors(ours)
    pm = peft_loads_ours("bert", make, tmp_path / "ours", tmp_path / "peft")
    assert_outputs_match(ours, pm, "bert", 98, moved=None)


def test_hra_default_init_equals_peft_init_for_one_seed():
    """Built right after the same seeded model, both sides draw the same paired Kaiming columns."""
    pm = peft.get_peft_model(build("bert"), peft.HRAConfig(r=4, target_modules=["query"]))
    ours = up.adapt(build("bert"), up.HRAConfig(r=4, target_modules=["query"]))
    theirs = {n.replace(".default", ""): p for n, p in pm.named_parameters() if "hra_u" in n}
    mine = {f"base_model.model.{s.path}.hra_u": s.deltas["default"].hra_u for s in ours.sites()}
    assert theirs.keys() == mine.keys()
    for key in theirs:
        assert torch.equal(theirs[key], mine[key]), key
