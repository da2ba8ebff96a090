"""Composition blocks (core/compose.py): each block equals the forwards it stands for, nesting is checked up
front, and a refused block changes nothing."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import unipeft as up
from unipeft.core.errors import ConfigError, MergeError


def _perturb(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for site in model.sites():
            if name in site.deltas:
                for p in site.deltas[name].parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _tokenwise():
    """Position-wise layers on (batch, tokens, features): a Split is exact at every site."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))


def _two(base, config_b=None, targets=("0", "2")):
    model = up.adapt(base, up.LoraConfig(r=2, target_modules=list(targets)), "a")
    model.add_adapter("b", config_b or up.LoraConfig(r=3, target_modules=list(targets)))
    _perturb(model, "a", 1)
    _perturb(model, "b", 2)
    model.eval()
    return model


def _alone(model, name, x):
    model.set_adapter(name)
    with torch.no_grad():
        return model(x)


def _under(model, block, x):
    model.set_adapter(block)
    with torch.no_grad():
        return model(x)


X = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(3))


def test_stack_is_the_plain_list_and_clears_with_a_name():
    model = _two(_tokenwise())
    model.set_adapter(["a", "b"])
    with torch.no_grad():
        listed = model(X)
    torch.testing.assert_close(_under(model, up.Stack("a", "b"), X), listed, rtol=0, atol=0)
    model.set_adapter(up.Average("a", "b"))
    assert model._ctx.composition is not None
    model.set_adapter("a")
    assert model._ctx.composition is None and model.active_adapters == ["a"]


def test_batch_split_and_parallel_equal_one_forward_per_adapter():
    model = _two(_tokenwise(), up.IA3Config(target_modules=["0", "2"], feedforward_modules=["2"]))
    out_a, out_b = _alone(model, "a", X), _alone(model, "b", X)
    split = _under(model, up.BatchSplit("a", "b", batch_sizes=[1, 3]), X)
    torch.testing.assert_close(split, torch.cat([out_a[:1], out_b[1:]]), rtol=1e-6, atol=1e-6)
    par = _under(model, up.Parallel("a", "b"), X)
    assert par.shape == (8, 6, 8)
    torch.testing.assert_close(par, torch.cat([out_a, out_b]), rtol=1e-6, atol=1e-6)
    assert (out_a - out_b).abs().max() > 1e-2  # the two branches differ


def test_split_sends_token_ranges_through_different_adapters_and_stacks():
    model = _two(_tokenwise())
    out_a, out_b = _alone(model, "a", X), _alone(model, "b", X)
    torch.testing.assert_close(_under(model, up.Split("a", "b", splits=[2]), X),
                               torch.cat([out_a[:, :2], out_b[:, 2:]], 1), rtol=1e-6, atol=1e-6)
    model.set_adapter(["a", "b"])
    with torch.no_grad():
        both = model(X)
    torch.testing.assert_close(_under(model, up.Split(up.Stack("a", "b"), "a", splits=[4, 2]), X),
                               torch.cat([both[:, :4], out_a[:, 4:]], 1), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="do not fit the 6 tokens"):
        _under(model, up.Split("a", "b", splits=[4, 4]), X)


def test_average_weights_the_adapters_site_outputs():
    base = nn.Sequential(nn.Linear(8, 8))
    model = _two(base, targets=("0",))
    with torch.no_grad():
        plain = model.base_model[0].base_layer(X)
    out_a, out_b = _alone(model, "a", X), _alone(model, "b", X)
    got = _under(model, up.Average("a", "b", weights=[3, 1]), X)
    torch.testing.assert_close(got, plain + 0.75 * (out_a - plain) + 0.25 * (out_b - plain), rtol=1e-6, atol=1e-6)
    raw = _under(model, up.Average("a", "b", weights=[1, 1], normalize_weights=False), X)
    torch.testing.assert_close(raw, out_a + out_b - plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(_under(model, up.Average("a", "a"), X), out_a, rtol=1e-6, atol=1e-6)


def test_parallel_trains_both_branches_and_nothing_else():
    model = _two(_tokenwise())
    model.train()
    model.set_adapter(up.Parallel("a", "b"))
    model(X).pow(2).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert any(".a." in n or n.endswith(".a") or "['a']" in n or "deltas.a" in n for n in grads)
    assert any("deltas.b" in n for n in grads) and any("deltas.a" in n for n in grads)
    assert all("deltas." in n for n in grads)
    assert all(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("make, message", [
    (lambda: up.Stack(up.Split("a", "b", splits=[1])), "Stack cannot hold Split"),
    (lambda: up.Split(up.Parallel("a", "b"), "a", splits=[1]), "Split cannot hold Parallel"),
    (lambda: up.BatchSplit(up.Parallel("a"), batch_sizes=[1]), "BatchSplit cannot hold Parallel"),
    (lambda: up.Average(up.Average("a", "b"), "a"), "Average cannot hold Average"),
    (lambda: up.Split("a", splits=[1]), "at least 2 children"),
    (lambda: up.Split("a", "b", splits=[0]), "positive integers"),
    (lambda: up.Average("a", "b", weights=[1]), "expected 2 finite numbers"),
    (lambda: up.Average("a", "b", weights=[1, -1]), "sum to 0"),
    (lambda: up.BatchSplit("a", "b", batch_sizes=[2]), "expected 2 positive integers"),
    (lambda: up.Parallel(), "at least one adapter"),
])
def test_bad_blocks_are_refused_when_built(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_refused_blocks_leave_the_active_set_unchanged():
    model = _two(_tokenwise())
    model.set_adapter("a")
    with pytest.raises(ConfigError, match="no adapter named 'zz'"):
        model.set_adapter(up.Parallel("a", "zz"))
    assert model.active_adapters == ["a"] and model._ctx.composition is None
    model.set_adapter(up.BatchSplit("a", "b", batch_sizes=[2, 1]))
    with pytest.raises(ValueError, match="sum to 3 but the batch has 4 rows"):
        model(X)
    with pytest.raises(ConfigError, match="adapter_names cannot be combined"):
        model(X, adapter_names=["a"] * 4)
    with pytest.raises(MergeError, match="BatchSplit block"):
        model.merge()
    model.set_adapter("a")
    model.merge()
    with pytest.raises(MergeError, match="unmerge"):
        model.set_adapter(up.Average("a", "b"))


def test_prompt_adapters_and_base_editing_inits_are_refused_in_blocks():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32))
    model = up.adapt(bert, up.LoraConfig(r=2, target_modules=["query"]), "a")
    model.add_adapter("p", up.PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ConfigError, match="acts on the model's inputs"):
        model.set_adapter(up.Average("a", "p"))
    model.add_adapter("pissa", up.LoraConfig(r=2, target_modules=["value"], init="pissa"))
    with pytest.raises(ConfigError, match="edits the shared base weights"):
        model.set_adapter(up.BatchSplit("a", "pissa", batch_sizes=[1, 1]))
    ids = torch.randint(0, 50, (2, 5))
    _perturb(model, "a", 1)
    model.eval()
    model.set_adapter(up.Parallel("a", up.Stack("a")))
    with torch.no_grad():
        out = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(out[:2], out[2:], rtol=1e-6, atol=1e-6)
