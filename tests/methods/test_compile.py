"""torch.compile on adapted models: no graph break, compiled == eager (inference and a training step),
one compile; LoRA adapters hot-swapped into a compiled model without recompiling (methods/lora/hotswap.py)."""
from __future__ import annotations

import peft
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import unipeft as up

from ..interop._models import build, inputs, output

TOL = dict(atol=1e-5, rtol=1e-5)


def randomise(model, seed: int) -> nn.Module:
    """Non-zero A and B (a fresh B is zero, which would hide a wrong scaling or a swap that did nothing)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    return model


def lora(kind: str, r: int = 4, alpha: float = 8, seed: int = 0, targets="all-linear", **kw) -> up.AdaptedModel:
    return randomise(up.adapt(build(kind), up.LoraConfig(r=r, alpha=alpha, target_modules=targets, **kw)), seed)


def no_dropout(model: nn.Module) -> nn.Module:
    """The base models' own dropout off, so eager and compiled training steps are comparable."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


# ---- tracing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_no_graph_break_with_lora_on_every_linear(kind, mode):
    model = getattr(lora(kind, dropout=0.1), mode)()
    explained = torch._dynamo.explain(model)(**inputs(kind))
    assert explained.graph_break_count == 0, [str(b.reason)[:300] for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("config", [
    up.LoraConfig(r=4, target_modules=["query", "value"], use_dora=True),
    up.LoraConfig(r=4, target_modules=["word_embeddings", "query"], use_rslora=True),
    up.IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]),
], ids=["dora", "lora-embedding", "ia3"])
def test_no_graph_break_for_other_deltas(config):
    model = randomise(up.adapt(build("bert"), config), 0).train()
    explained = torch._dynamo.explain(model)(**inputs("bert"))
    assert explained.graph_break_count == 0, [str(b.reason)[:300] for b in explained.break_reasons]


# ---- compiled == eager -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_compiled_inference_equals_eager_and_compiles_once(kind):
    model, batch = lora(kind).eval(), inputs(kind)
    with torch.no_grad():
        want = model(**batch).logits
        compiled = torch.compile(model)
        for _ in range(3):
            got = compiled(**batch).logits
        torch.testing.assert_close(got, want, **TOL)
        model(**batch)  # an eager call in between refreshes the sites' caches: not a reason to recompile
        compiled(**batch)
    assert graphs() == 1


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_compiled_training_step_gives_eager_loss_and_gradients(kind):
    model, batch = no_dropout(lora(kind, seed=3)).train(), inputs(kind)

    def step(m):
        model.zero_grad(set_to_none=True)
        loss = m(**batch).logits.pow(2).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    step(model)  # the first eager call teaches the fused path its groups; the second uses them
    loss_e, grads_e = step(model)
    compiled = torch.compile(model)
    step(compiled)
    loss_c, grads_c = step(compiled)
    assert graphs() == 1
    torch.testing.assert_close(loss_c, loss_e, **TOL)
    assert set(grads_c) == set(grads_e) and grads_e and all("lora_" in n for n in grads_e)
    for n in grads_e:  # fp32 summation order differs: within 1e-5 of each gradient's scale
        assert (grads_c[n] - grads_e[n]).abs().max() <= 1e-5 * grads_e[n].abs().max(), n


# ---- hot-swapping -----------------------------------------------------------------------------
def save(tmp_path, name: str, kind: str = "bert", **kw):
    lora(kind, **kw).save_pretrained(tmp_path / name)
    return tmp_path / name


def loaded_output(kind: str, directory) -> torch.Tensor:
    """What the eager model gives with the adapter in `directory` loaded the ordinary way."""
    model = up.AdaptedModel.from_pretrained(build(kind), directory).eval()
    with torch.no_grad():
        return model(**inputs(kind)).logits


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_hotswap_into_compiled_model_does_not_recompile(tmp_path, kind):
    dirs = {"a": save(tmp_path, "a", kind, r=4, alpha=8, seed=1),
            "b": save(tmp_path, "b", kind, r=8, alpha=3, seed=2),
            "c": save(tmp_path, "c", kind, r=2, alpha=5, seed=3, use_rslora=True)}
    want = {name: loaded_output(kind, d) for name, d in dirs.items()}
    model, batch = up.AdaptedModel.from_pretrained(build(kind), dirs["a"]).eval(), inputs(kind)
    up.prepare_hotswap(model, max_rank=8)
    compiled = torch.compile(model)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        torch.testing.assert_close(compiled(**batch).logits, want["a"], **TOL)
        for name in ("b", "c", "a"):
            up.hotswap_adapter(compiled, dirs[name])
            torch.testing.assert_close(compiled(**batch).logits, want[name], **TOL)
    assert graphs() == 1
    # The swapped-in adapter saves and reloads as itself (zero-padded, alpha restated), in unipeft and PEFT.
    up.hotswap_adapter(model, dirs["b"])
    model.save_pretrained(tmp_path / "again")
    torch.testing.assert_close(loaded_output(kind, tmp_path / "again"), want["b"], **TOL)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(build(kind), tmp_path / "again").eval()(**batch).logits
    torch.testing.assert_close(theirs, want["b"], **TOL)


@pytest.mark.parametrize("kind,targets", [("bert", "all-linear"), ("gpt2", "all-linear"),
                                          ("bert", ["word_embeddings", "query"]), ("conv", ["conv1", "conv2", "head"])])
def test_padding_leaves_outputs_and_gradients_unchanged(kind, targets):
    model, batch = no_dropout(lora(kind, r=3, targets=targets, seed=4)).train(), inputs(kind)

    def step():
        for _ in range(2):  # the second call runs the fused path's learned groups
            model.zero_grad(set_to_none=True)
            out = output(model, batch)
            out.pow(2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    out0, grads0 = step()
    up.prepare_hotswap(model, max_rank=8)
    sites = [d for s in model.sites() for d in s.deltas.values()]
    assert all(d.r == 8 and isinstance(d.scaling, torch.Tensor) for d in sites)
    assert all(p.shape[0] == 8 if "_A" in n else p.shape[1] == 8 for n, p in model.named_parameters() if "lora_" in n)
    assert not any("scaling" in k for k in model.adapter_state_dict())  # files keep PEFT's keys
    out1, grads1 = step()
    torch.testing.assert_close(out1, out0, atol=1e-6, rtol=1e-6)
    for n, g in grads1.items():  # the padded rank components get no gradient: they stay zero
        dim = 0 if "_A" in n else 1
        torch.testing.assert_close(g.narrow(dim, 0, 3), grads0[n], atol=1e-6, rtol=1e-5)
        assert not g.narrow(dim, 3, 5).any(), n


# ---- refusals: a clear error, nothing changed ---------------------------------------------------
def snapshot(model) -> tuple:
    return ({k: v.clone() for k, v in model.state_dict().items()}, model.peft_config["default"],
            [float(d.scaling) for s in model.sites() for d in s.deltas.values()])


def assert_unchanged(model, snap) -> None:
    state, config, scalings = snap
    now = model.state_dict()
    assert set(now) == set(state) and all(torch.equal(now[k], v) for k, v in state.items())
    assert model.peft_config["default"] is config
    assert [float(d.scaling) for s in model.sites() for d in s.deltas.values()] == scalings


def test_hotswap_refusals_name_the_problem_and_change_nothing(tmp_path):
    model = lora("bert", r=4, alpha=8, seed=1, targets=["query", "value"]).eval()
    good = save(tmp_path, "good", r=4, alpha=2, seed=2, targets=["query", "value"])
    with pytest.raises(up.ConfigError, match="was not prepared.*prepare_hotswap"):
        up.hotswap_adapter(model, good)
    with pytest.raises(up.ConfigError, match="max_rank=2 is below the rank.*has rank 4"):
        up.prepare_hotswap(model, max_rank=2)
    with pytest.raises(up.ConfigError, match="before torch.compile"):
        up.prepare_hotswap(torch.compile(model), max_rank=8)
    up.prepare_hotswap(model, max_rank=8)
    snap = snapshot(model)
    cases = {
        "fewer": (save(tmp_path, "fewer", targets=["query"]),
                  up.AdapterLoadError, r"lacks modules adapter 'default' targets: \[.*value"),
        "more": (save(tmp_path, "more", targets=["query", "value", "key"]),
                 up.AdapterLoadError, r"targets modules adapter 'default' does not: \[.*key"),
        "rank": (save(tmp_path, "rank", r=16, targets=["query", "value"]),
                 up.AdapterLoadError, r"query: 'lora_A.weight' has rank 16 but the model was prepared for max_rank=8"),
        "ia3": (_saved(tmp_path, "ia3", up.IA3Config(target_modules=["query", "value"], feedforward_modules=[])),
                up.ConfigError, "is IA3Config.*only a LoRA adapter"),
        "dora": (_saved(tmp_path, "dora", up.LoraConfig(r=4, target_modules=["query", "value"], use_dora=True)),
                 up.ConfigError, "'dora' variant"),
        "dropout": (save(tmp_path, "dropout", targets=["query", "value"], dropout=0.1),
                    up.ConfigError, "dropout=0.1 but adapter 'default' has dropout=0.0"),
    }
    for name, (directory, error, message) in cases.items():
        with pytest.raises(error, match=message):
            up.hotswap_adapter(model, directory)
        assert_unchanged(model, snap)
    # A misfit at the last site only: the sites before it must not have been written either.
    config, tensors = up.core.state.read_adapter(good)
    last = sorted(k for k in tensors if "lora_B" in k)[-1]
    tensors[last] = torch.zeros(tensors[last].shape[0], 9)
    with pytest.raises(up.AdapterLoadError, match="rank 9 but the model was prepared for max_rank=8"):
        up.hotswap_adapter_from_state(model, config, tensors)
    assert_unchanged(model, snap)
    up.hotswap_adapter(model, good)  # and a fitting one still goes in
    torch.testing.assert_close(output(model, inputs("bert")), loaded_output("bert", good), **TOL)


def _saved(tmp_path, name: str, config) -> object:
    randomise(up.adapt(build("bert"), config), 5).save_pretrained(tmp_path / name)
    return tmp_path / name


def test_non_lora_adapter_cannot_be_prepared():
    model = up.adapt(build("bert"), up.IA3Config(target_modules=["query", "value"], feedforward_modules=[]))
    with pytest.raises(up.ConfigError, match="only LoRA adapters can be hot-swapped"):
        up.prepare_hotswap(model, max_rank=8)


def test_peft_names_in_compat(tmp_path):
    from unipeft.compat import PeftModel, hotswap_adapter, prepare_model_for_compiled_hotswap

    first, second = save(tmp_path, "first", r=2, alpha=4, seed=1), save(tmp_path, "second", r=6, alpha=6, seed=2)
    model = PeftModel.from_pretrained(build("bert"), str(first)).eval()
    prepare_model_for_compiled_hotswap(model, target_rank=6)
    hotswap_adapter(model, str(second), adapter_name="default")
    torch.testing.assert_close(output(model, inputs("bert")), loaded_output("bert", second), **TOL)
