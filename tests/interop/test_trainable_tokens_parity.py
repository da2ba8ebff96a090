"""PEFT parity of TrainableTokens: PEFT-trained folders load in unipeft with identical outputs (and, untied,
identical merged weights); our folders load in PEFT with its own keys, none missing or unexpected, and
identical outputs. GPT-2's tied lm_head follows the embedding's rows on both sides; PEFT adds it implicitly, unipeft
needs it named in target_modules (and PEFT needs it left out), so those two tests rewrite that one field."""
from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import unipeft as up

from ._models import VOCAB, build, inputs, output
from ._parity import (assert_our_folder_loads_in_peft, assert_outputs_match, assert_peft_folder_loads_alike,
                      assert_same_merge, fresh_pair, peft_loads_ours, train_on)

IDS = [3, 17, 40, VOCAB - 1]

CASES = {  # name: (model, PEFT config, whether the adapted weight is tied to another module)
    "llama-default-target": ("llama", lambda: peft.TrainableTokensConfig(token_indices=IDS), False),
    "bert-word-embeddings": ("bert", lambda: peft.TrainableTokensConfig(token_indices=IDS[:3],
                                                                        target_modules=["word_embeddings"]), False),
}


def _batch(kind: str, seed: int) -> dict:
    """A batch in which every row holds every chosen token."""
    batch = inputs(kind, seed=seed)
    batch["input_ids"][:, :len(IDS)] = torch.tensor(IDS)
    return batch


def _train(model, kind: str, seed: int):
    return train_on(model, kind, seed, batch=_batch)


def _assert_same_merge(pm, ours, tied: bool) -> None:
    if tied:  # PEFT writes the rows into the shared weight; unipeft's core refuses merges into tied weights
        with pytest.raises(up.MergeError, match="tied"):
            ours.merge_and_unload()
        return
    assert_same_merge(pm, ours)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_trained_folder_loads_with_identical_outputs_and_merge(case, tmp_path):
    kind, make, tied = CASES[case]
    pm, ours = assert_peft_folder_loads_alike(kind, make, tmp_path, moved=1e-4, batch=_batch, seed=None)
    _assert_same_merge(pm, ours, tied)


@pytest.mark.parametrize("case", sorted(CASES))
def test_our_folder_loads_in_peft_with_no_missing_or_unexpected_keys(case, tmp_path):
    kind, make, tied = CASES[case]
    pm, ours = assert_our_folder_loads_in_peft(kind, make, tmp_path, moved=1e-4, batch=_batch, seed=None)
    _assert_same_merge(pm, ours, tied)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fresh_rows_equal_peft_and_both_are_the_identity(case):
    kind, make, _ = CASES[case]
    pm, ours = fresh_pair(kind, make)
    theirs = [p for p in pm.parameters() if p.requires_grad]
    assert len(theirs) == 1
    mine = ours.adapter_state_dict()
    assert len(mine) == 1
    for key, value in mine.items():
        assert torch.equal(value, theirs[0].detach()), key
    batch = _batch(kind, seed=3)
    with torch.no_grad():
        base = output(build(kind), batch)
        torch.testing.assert_close(output(pm, batch), base, rtol=0, atol=0)
        torch.testing.assert_close(output(ours, batch), base, rtol=0, atol=0)


def test_peft_default_folder_on_a_tied_model_is_refused_naming_the_head(tmp_path):
    """PEFT adapts GPT-2's tied lm_head implicitly (its config names only transformer.wte): unipeft does not
    add targets on its own, so it refuses the folder instead of leaving the head on the old rows."""
    pm = peft.get_peft_model(build("gpt2"), peft.TrainableTokensConfig(token_indices=IDS))
    pm.save_pretrained(tmp_path)
    assert "base_model.model.lm_head.trainable_tokens_delta" in load_file(str(tmp_path / "adapter_model.safetensors"))
    base = build("gpt2")
    with pytest.raises(up.TargetError, match=r"tied to \['lm_head'\]"):
        up.AdaptedModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, up.Delta) for m in base.modules())


def _name_targets(folder, targets) -> None:
    """Rewrite the folder's target_modules (the one field in which the two sides name a tied head)."""
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "target_modules": targets}))


def test_peft_tied_folder_loads_with_identical_outputs_once_the_head_is_named(tmp_path):
    """PEFT's default on GPT-2 adapts wte and, implicitly, the tied lm_head; named explicitly, the same
    file (both keys) loads in unipeft, where the head follows the embedding's rows."""
    pm = _train(peft.get_peft_model(build("gpt2"), peft.TrainableTokensConfig(token_indices=IDS)), "gpt2", seed=10)
    pm.save_pretrained(tmp_path)
    _name_targets(tmp_path, ["transformer.wte", "lm_head"])
    ours = up.AdaptedModel.from_pretrained(build("gpt2"), tmp_path)
    assert_outputs_match(pm, ours, "gpt2", 99, moved=1e-4, batch=_batch)
    _assert_same_merge(pm, ours, tied=True)


def test_our_tied_folder_loads_in_peft_once_only_the_embedding_is_named(tmp_path):
    """PEFT ties the head itself when only the embedding is named (naming both nests its layers): so named,
    our file loads in PEFT with its own keys, none missing or unexpected, and identical outputs."""
    ours = _train(up.adapt(build("gpt2"), up.TrainableTokensConfig(token_indices=IDS,
                                                                   target_modules=["wte", "lm_head"])), "gpt2", seed=20)
    ours.save_pretrained(tmp_path / "ours")
    _name_targets(tmp_path / "ours", "transformer.wte")
    pm = peft_loads_ours("gpt2", lambda: peft.TrainableTokensConfig(token_indices=IDS), tmp_path / "ours",
                         tmp_path / "peft")
    assert_outputs_match(ours, pm, "gpt2", 98, moved=1e-4, batch=_batch)
