"""TrainableTokens: only the chosen embedding rows train, a fresh adapter is the identity, merges and files
are exact, bad indices are refused naming the field, and a tied LM head follows the embedding's rows."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import unipeft as up
from unipeft.core.state import WEIGHTS_NAME

from ..interop._models import VOCAB, build, inputs, output

IDS = [3, 17, 40, VOCAB - 1]
EMBED = {"llama": "model.embed_tokens", "bert": "bert.embeddings.word_embeddings", "gpt2": "transformer.wte"}


def _cfg(**fields) -> up.TrainableTokensConfig:
    return up.TrainableTokensConfig(**{"token_indices": IDS, **fields})


def _batch(kind: str, seed: int = 1) -> dict:
    """A batch in which every row holds every chosen token (so each of them matters)."""
    batch = inputs(kind, seed=seed)
    batch["input_ids"][:, :len(IDS)] = torch.tensor(IDS)
    return batch


def _run(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return output(model, batch)


def _delta(adapted, path: str, name: str = "default"):
    return adapted.delta_at(name, path)


def _perturb_rows(adapted, name: str = "default", seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for delta in adapted.deltas(name):
            for p in delta.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


def _with_rows(kind: str, path: str, indices: list[int], rows: torch.Tensor):
    """Reference: the plain base model with those embedding rows written in (tied heads see them too)."""
    model = build(kind)
    with torch.no_grad():
        model.get_submodule(path).weight[torch.tensor(indices)] = rows.detach()
    return model


def _trainable(adapted) -> dict[str, torch.Tensor]:
    return {n: p for n, p in adapted.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_default_target_is_the_input_embedding_and_a_fresh_adapter_is_the_identity(kind):
    base_out = _run(build(kind), _batch(kind))
    adapted = up.adapt(build(kind), _cfg())
    assert [s.path for s in adapted.sites()] == [EMBED[kind]]  # not the position / token-type embeddings
    torch.testing.assert_close(_run(adapted, _batch(kind)), base_out, rtol=0, atol=0)
    delta = _delta(adapted, EMBED[kind])
    assert torch.equal(delta.rows, delta.base.weight[IDS])
    trainable = _trainable(adapted)
    assert [tuple(p.shape) for p in trainable.values()] == [(len(IDS), delta.base.weight.shape[1])]
    assert all(n.endswith("trainable_tokens_delta") for n in trainable)


def test_training_changes_only_the_chosen_rows():
    adapted = up.adapt(build("llama"), _cfg())
    delta = _delta(adapted, EMBED["llama"])
    weight_before = delta.base.weight.detach().clone()
    opt = torch.optim.AdamW(list(_trainable(adapted).values()), lr=0.05)
    for step in range(3):
        opt.zero_grad()
        output(adapted, _batch("llama", seed=10 + step)).pow(2).mean().backward()
        opt.step()
    assert torch.equal(delta.base.weight, weight_before), "the frozen embedding changed"
    assert delta.base.weight.grad is None
    effective = delta.weight_overrides({"weight": delta.base.weight})["weight"]
    others = [i for i in range(VOCAB) if i not in IDS]
    assert torch.equal(effective[others], weight_before[others])
    assert (effective[IDS] - weight_before[IDS]).abs().amax(dim=1).gt(0).all(), "a chosen row did not train"
    torch.testing.assert_close(effective[IDS], delta.rows.detach(), rtol=0, atol=0)


def test_merged_equals_unmerged_and_unmerge_restores_the_rows():
    adapted = up.adapt(build("llama"), _cfg())
    _perturb_rows(adapted)
    delta = _delta(adapted, EMBED["llama"])
    dw = delta.delta_weight()["weight"]
    others = [i for i in range(VOCAB) if i not in IDS]
    assert not dw[others].any() and dw[IDS].abs().amin(dim=1).gt(0).all()
    batch, before = _batch("llama"), delta.base.weight.detach().clone()
    out = _run(adapted, batch)
    adapted.merge()
    torch.testing.assert_close(_run(adapted, batch), out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(delta.base.weight[IDS], delta.rows.detach(), rtol=1e-6, atol=1e-6)
    assert torch.equal(delta.base.weight[others], before[others])
    adapted.unmerge()
    torch.testing.assert_close(delta.base.weight, before, rtol=1e-6, atol=1e-6)
    reference = _run(_with_rows("llama", EMBED["llama"], IDS, delta.rows), batch)
    torch.testing.assert_close(_run(adapted.merge_and_unload(), batch), reference, rtol=1e-5, atol=1e-5)


def test_save_load_is_exact_with_peft_key_and_fields(tmp_path):
    adapted = up.adapt(build("llama"), _cfg())
    _perturb_rows(adapted)
    adapted.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    assert list(tensors) == ["base_model.model.model.embed_tokens.trainable_tokens_delta"]
    assert tuple(tensors[next(iter(tensors))].shape) == (len(IDS), 32)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "TRAINABLE_TOKENS" and saved["token_indices"] == IDS
    assert saved["init_weights"] is True
    assert not {"exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save"} & set(saved)
    loaded = up.AdaptedModel.from_pretrained(build("llama"), tmp_path)
    batch = _batch("llama")
    torch.testing.assert_close(_run(loaded, batch), _run(adapted, batch), rtol=0, atol=0)
    assert torch.equal(_delta(loaded, EMBED["llama"]).rows, _delta(adapted, EMBED["llama"]).rows)


def test_a_loaded_adapter_sets_the_trained_rows_on_any_base(tmp_path):
    """The file holds the rows themselves: on a base with other weights they are exactly the saved ones."""
    adapted = up.adapt(build("llama"), _cfg())
    _perturb_rows(adapted)
    adapted.save_pretrained(tmp_path)
    rows = _delta(adapted, EMBED["llama"]).rows.detach()
    loaded = up.AdaptedModel.from_pretrained(build("llama", seed=7), tmp_path)
    delta = _delta(loaded, EMBED["llama"])
    assert torch.equal(delta.weight_overrides({"weight": delta.base.weight})["weight"][IDS], rows)
    batch = _batch("llama")
    other = build("llama", seed=7)
    with torch.no_grad():
        other.model.embed_tokens.weight[IDS] = rows
    torch.testing.assert_close(_run(loaded, batch), _run(other, batch), rtol=1e-6, atol=1e-6)
    assert (_run(loaded, batch) - _run(build("llama", seed=7), batch)).abs().max() > 1e-4


def test_init_weights_false_starts_from_random_rows():
    torch.manual_seed(0)
    adapted = up.adapt(build("llama"), _cfg(init_weights=False))
    delta = _delta(adapted, EMBED["llama"])
    assert (delta.rows - delta.base.weight[IDS]).abs().amin(dim=1).gt(1e-3).all()
    assert (_run(adapted, _batch("llama")) - _run(build("llama"), _batch("llama"))).abs().max() > 1e-4


@pytest.mark.parametrize("value", [[-1], [3, 3], [1.0], [True], "3", None])
def test_bad_token_indices_raise_config_error_naming_the_field(value):
    with pytest.raises(up.ConfigError, match=r"TrainableTokensConfig\.token_indices: expected a list of distinct"):
        up.TrainableTokensConfig(token_indices=value)


def test_empty_or_out_of_range_indices_are_refused_and_leave_the_model_untouched():
    model = build("llama")
    types = [(p, type(m)) for p, m in model.named_modules()]
    with pytest.raises(up.ConfigError, match=r"token_indices: expected at least one token index"):
        up.adapt(model, up.TrainableTokensConfig())  # PEFT's default, valid as a config
    with pytest.raises(up.TargetError, match=rf"\[{VOCAB}\] are out of range for 'model.embed_tokens', "
                                             rf"which has {VOCAB} rows"):
        up.adapt(model, _cfg(token_indices=[1, VOCAB]))
    assert [(p, type(m)) for p, m in model.named_modules()] == types
    assert all(p.requires_grad for p in model.parameters())


def test_a_linear_with_a_bias_is_refused():
    with pytest.raises(up.TargetError, match=r"'classifier' is a Linear with a bias"):
        up.adapt(build("bert"), _cfg(token_indices=[1], target_modules=["classifier"]))


@pytest.mark.parametrize("targets, other", [(None, "lm_head"), (["lm_head"], "transformer.wte")])
def test_one_of_two_tied_modules_alone_is_refused_naming_the_other(targets, other):
    model = build("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    with pytest.raises(up.TargetError, match=rf"tied to \['{other}'\].*add"):
        up.adapt(model, _cfg(target_modules=targets))
    assert not any(isinstance(m, up.Delta) for m in model.modules())


def test_a_tied_head_follows_the_embedding_rows(tmp_path):
    adapted = up.adapt(build("gpt2"), _cfg(target_modules=["wte", "lm_head"]))
    batch = _batch("gpt2")
    torch.testing.assert_close(_run(adapted, batch), _run(build("gpt2"), batch), rtol=0, atol=0)
    wte, head = _delta(adapted, "transformer.wte"), _delta(adapted, "lm_head")
    assert head.rows is wte.rows and len(_trainable(adapted)) == 1, "the tied rows are one trained tensor"
    _perturb_rows(adapted)
    reference = _run(_with_rows("gpt2", "transformer.wte", IDS, wte.rows), batch)  # the tie carries the rows
    torch.testing.assert_close(_run(adapted, batch), reference, rtol=1e-5, atol=1e-5)
    adapted.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    assert sorted(tensors) == ["base_model.model.lm_head.trainable_tokens_delta",
                               "base_model.model.transformer.wte.trainable_tokens_delta"]
    assert all(torch.equal(t, wte.rows.detach()) for t in tensors.values())
    loaded = up.AdaptedModel.from_pretrained(build("gpt2"), tmp_path)
    torch.testing.assert_close(_run(loaded, batch), _run(adapted, batch), rtol=0, atol=0)
    with pytest.raises(up.MergeError, match="tied"):  # core refuses merges into a tied weight
        adapted.merge()
    torch.testing.assert_close(_run(adapted, batch), reference, rtol=1e-5, atol=1e-5)


def test_two_adapters_on_disjoint_tokens_apply_both():
    adapted = up.adapt(build("llama"), _cfg(token_indices=IDS[:2]), "a")
    adapted.add_adapter("b", _cfg(token_indices=IDS[2:]))
    _perturb_rows(adapted, "a", seed=1)
    _perturb_rows(adapted, "b", seed=2)
    adapted.set_adapter(["a", "b"])
    rows = torch.cat([_delta(adapted, EMBED["llama"], n).rows.detach() for n in ("a", "b")])
    batch = _batch("llama")
    reference = _run(_with_rows("llama", EMBED["llama"], IDS, rows), batch)
    torch.testing.assert_close(_run(adapted, batch), reference, rtol=1e-5, atol=1e-5)
    mixed = _run(adapted, {**batch, "adapter_names": ["a", "b", "a", "b"]})
    adapted.set_adapter("a")
    only_a = _run(adapted, batch)
    torch.testing.assert_close(mixed[0::2], only_a[0::2], rtol=1e-5, atol=1e-5)
