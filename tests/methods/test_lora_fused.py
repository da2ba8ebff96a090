"""The fused LoRA linear (methods/lora/fused.py) against the plain path: outputs, gradients, groups, dropout."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import unipeft as up
from unipeft.methods.lora import fused

from ..interop._models import build, inputs


def set_fused(model, on: bool) -> None:
    for site in model.sites():
        for d in site.deltas.values():
            d.fuses = on and d.variant.fusable
    model._ctx.version += 1  # re-resolve sites and re-learn groups


def randomise_b(model, seed: int = 1) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)


def step(model, batch, seed: int = 5):
    """Two forward/backward passes (the first one teaches the groups); the second's logits and grads."""
    for _ in range(2):
        model.zero_grad()
        torch.manual_seed(seed)
        out = model(**batch).logits
        out.pow(2).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind,targets", [("bert", ["query", "key", "value", "dense"]), ("gpt2", ["c_attn", "c_proj", "c_fc"]),
                                          ("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"])])
def test_fused_equals_plain_in_train_mode(kind, targets):
    model = up.adapt(build(kind), up.LoraConfig(r=4, alpha=8, target_modules=targets)).train()
    randomise_b(model)
    batch = inputs(kind)
    out_f, grads_f = step(model, batch)
    set_fused(model, False)
    out_p, grads_p = step(model, batch)
    assert set(grads_f) == set(grads_p) and all("lora_" in n for n in grads_f)
    torch.testing.assert_close(out_f, out_p, atol=1e-6, rtol=1e-5)
    for n in grads_p:  # fp32 summation order differs: within 1e-5 of each gradient's scale
        assert (grads_f[n] - grads_p[n]).abs().max() <= 1e-5 * grads_p[n].abs().max(), n


def test_groups_are_the_sites_that_share_an_input():
    model = up.adapt(build("bert"), up.LoraConfig(r=4, target_modules=["query", "key", "value", "dense"])).train()
    step(model, inputs("bert"))
    groups = model._ctx.scratch["lora.groups"]
    found = {tuple(m.delta.path.rsplit(".", 1)[-1] for m in g.members) for g in groups.group_of.values()}
    assert found == {("query", "key", "value")}  # per layer; the dense layers each have their own input
    assert len({id(g) for g in groups.group_of.values()}) == 2  # two layers
    gpt2 = up.adapt(build("gpt2"), up.LoraConfig(r=4, target_modules=["c_attn", "c_fc"])).train()
    step(gpt2, inputs("gpt2"))
    assert not gpt2._ctx.scratch["lora.groups"].group_of  # c_attn is already one fused matrix


class Shared(nn.Module):
    """q, k, v on one input, or k on a different tensor when asked (as in cross-attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(6, 5), nn.Linear(6, 5), nn.Linear(6, 5, bias=False)

    def forward(self, x, other=None, inplace=False):
        q = self.q(x)
        if inplace:
            x.mul_(2)  # changes the input after the group computed k and v from it
        k = self.k(x if other is None else other)
        return q + k * 2 + self.v(x) * 3


def test_a_member_given_another_tensor_is_computed_alone():
    torch.manual_seed(0)
    base = Shared()
    model = up.adapt(base, up.LoraConfig(r=2, target_modules=["q", "k", "v"]))
    randomise_b(model)
    x, other = torch.randn(4, 6), torch.randn(4, 6)
    model(x), model(x)  # learn: q, k, v share x
    assert len({id(g) for g in model._ctx.scratch["lora.groups"].group_of.values()}) == 1
    got = model(x, other)
    set_fused(model, False)
    torch.testing.assert_close(got, model(x, other), atol=1e-6, rtol=1e-6)


def test_an_input_changed_in_place_is_not_served_from_the_group():
    torch.manual_seed(0)
    model = up.adapt(Shared(), up.LoraConfig(r=2, target_modules=["q", "k", "v"]))
    randomise_b(model)
    x = torch.randn(4, 6)
    model(x.clone()), model(x.clone())
    y = x.clone()
    got = model(y, inplace=True)
    set_fused(model, False)
    torch.testing.assert_close(got, model(x.clone(), inplace=True), atol=1e-6, rtol=1e-6)


def test_keep_mask_probability_and_resolution():
    torch.manual_seed(0)
    for p in (0.1, 0.5, 0.05):
        m = fused.keep_mask(torch.Size((1000, 1001)), p, torch.device("cpu"))  # odd size: lanes are sliced
        expected = 1 - round(p * fused.LANES) / fused.LANES
        assert abs(m.float().mean().item() - expected) < 2e-3  # binomial sd ~ 5e-4
    # the four 16-bit lanes of one 64-bit draw are independent of each other
    m = fused.keep_mask(torch.Size((250000, 4)), 0.5, torch.device("cpu")).float()
    corr = torch.corrcoef(m.T)
    assert (corr - torch.eye(4)).abs().max() < 0.01


def test_dropout_shares_one_mask_per_group_and_matches_its_formula():
    torch.manual_seed(0)
    model = up.adapt(Shared(), up.LoraConfig(r=2, dropout=0.3, target_modules=["q", "k", "v"])).train()
    randomise_b(model)
    x = torch.randn(4, 6, requires_grad=True)
    model(x), model(x)
    torch.manual_seed(7)
    out = model(x)
    out.sum().backward()
    torch.manual_seed(7)
    mask = fused.keep_mask(torch.Size((4, 6)), 0.3, x.device)  # the one mask the group drew
    assert 0 < mask.float().mean() < 1
    x_ref = x.detach().clone().requires_grad_(True)
    xd = x_ref * mask / (1 - 0.3)
    ref = 0
    for name, weight in (("q", 1), ("k", 2), ("v", 3)):
        d = model.delta_at("default", name)
        ref = ref + weight * (d.base(x_ref) + d.scaling * xd @ d.lora_A.weight.T @ d.lora_B.weight.T)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    ref.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=1e-6)


def test_plain_path_for_other_dtypes_and_hooks():
    torch.manual_seed(0)
    model = up.adapt(Shared(), up.LoraConfig(r=2, target_modules=["q", "k", "v"]))
    d = model.delta_at("default", "q")
    assert d.fused_call(torch.randn(3, 6, dtype=torch.float64)) is None
    handle = d.base.register_forward_hook(lambda *a: None)
    assert d.fused_call(torch.randn(3, 6)) is None
    handle.remove()
    assert d.fused_call(torch.randn(3, 6)) is not None
    dora = up.adapt(Shared(), up.LoraConfig(r=2, use_dora=True, target_modules=["q"]))
    assert not dora.delta_at("default", "q").fuses


def test_bf16_autocast_takes_the_plain_path_with_the_same_result():
    """Autocast chooses a dtype per op; the fused function's own GEMMs would mix bf16 and fp32."""
    model = up.adapt(build("llama"), up.LoraConfig(r=4, alpha=8, target_modules="all-linear")).train()
    randomise_b(model)
    batch = inputs("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_a, grads_a = step(model, batch)
        set_fused(model, False)
        out_p, grads_p = step(model, batch)
    assert out_a.dtype == torch.bfloat16 and torch.equal(out_a, out_p)
    assert set(grads_a) == set(grads_p) and all(torch.equal(grads_a[n], grads_p[n]) for n in grads_p)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_recomputes_what_the_forward_did(reentrant):
    base = build("bert").train()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model = up.adapt(base, up.LoraConfig(r=4, dropout=0.1, target_modules=["query", "key", "value"])).train()
    randomise_b(model)
    batch = inputs("bert")
    if reentrant:  # the reentrant variant needs an input that requires grad to build a graph at all
        model.base_model.enable_input_require_grads()
    out_f, grads_f = step(model, batch)  # step 1 learns the groups, step 2 runs them, both checkpointed
    for _ in range(2):
        out_f2, grads_f2 = step(model, batch)
        torch.testing.assert_close(out_f2, out_f, atol=0, rtol=0)  # same seed, same masks, same result
    assert model._ctx.scratch["lora.groups"].ready
    assert all(g.abs().sum() > 0 for g in grads_f.values())


def test_mixed_batch_stacks_follow_weight_changes():
    model = up.adapt(build("bert"), up.LoraConfig(r=4, target_modules=["query", "value"]))
    model.add_adapter("other", up.LoraConfig(r=4, alpha=16, target_modules=["query", "value"]))
    randomise_b(model)
    model.eval()
    batch = inputs("bert")
    names = ["other", "default", "other", "default"]

    def per_row():
        rows = []
        for i, name in enumerate(names):
            model.set_adapter(name)
            rows.append(model(input_ids=batch["input_ids"][i:i + 1]).logits)
        return torch.cat(rows)

    with torch.no_grad():
        first = model(**batch, adapter_names=names).logits
        torch.testing.assert_close(first, per_row(), atol=1e-5, rtol=1e-5)
        for d in model.deltas("other"):
            d.lora_B.weight.mul_(3)  # in place: the cached stacks must notice
        second = model(**batch, adapter_names=names).logits
        assert (second - first).abs().max() > 1e-3
        torch.testing.assert_close(second, per_row(), atol=1e-5, rtol=1e-5)


def test_mixed_batch_in_training_with_dropout_uses_the_batched_path():
    torch.manual_seed(0)
    model = up.adapt(Shared(), up.LoraConfig(r=2, dropout=0.25, target_modules=["q", "k", "v"]))
    model.add_adapter("other", up.LoraConfig(r=2, alpha=6, dropout=0.25, target_modules=["q", "k", "v"]))
    randomise_b(model)
    model.train()
    x = torch.randn(4, 6)
    names = ["other", "default", "default", "other"]
    torch.manual_seed(3)
    out = model(x, adapter_names=names)
    out.sum().backward()
    torch.manual_seed(3)
    masks = [fused.keep_mask(x.shape, 0.25, x.device) for _ in "qkv"]  # one per site, in call order
    ref = []
    for i, name in enumerate(names):
        row = 0
        for (site, weight), mask in zip((("q", 1), ("k", 2), ("v", 3)), masks):
            d = model.delta_at(name, site)
            xd = x[i:i + 1] * mask[i:i + 1] / 0.75
            row = row + weight * (d.base(x[i:i + 1]) + d.scaling * xd @ d.lora_A.weight.T @ d.lora_B.weight.T)
        ref.append(row)
    torch.testing.assert_close(out, torch.cat(ref), atol=1e-6, rtol=1e-6)
    assert model.delta_at("default", "k").lora_B.weight.grad.abs().sum() > 0


def test_module_conversions_still_work_on_lora_layers():
    """nn.Module.to / .double walk every submodule through Module._apply: no LoRA class may shadow it."""
    model = up.adapt(build("bert"), up.LoraConfig(r=4, target_modules=["query", "value"]))
    randomise_b(model)
    model.eval()
    batch = inputs("bert")
    with torch.no_grad():
        ref = model(**batch).logits.double()
        model.double()
        assert all(p.dtype == torch.float64 for p in model.parameters())
        torch.testing.assert_close(model(**batch).logits, ref, atol=1e-5, rtol=1e-5)
