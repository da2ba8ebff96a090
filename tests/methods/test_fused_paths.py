"""Fused site outputs against the plain path, for the methods that compute the site's output themselves or
reorder their products for speed: dense-update methods (x (W + dW)^T + b in one product), SuperTuning (its
support scattered into W, then LoRA), OFT (the input rotated while training), VeRA and TinyLoRA (the frozen
bases applied to activations). A no-op forward hook on each base layer forces the plain path."""
from __future__ import annotations

import pytest
import torch

import unipeft as up

from ..interop._models import build, inputs

TARGETS = ["query", "key", "value", "dense"]
CONFIGS = {
    "shira": lambda: up.ShiraConfig(r=2, random_seed=0, target_modules=TARGETS),
    "supertuning": lambda: up.SupertuningConfig(sparsity=0.9, r=2, target_modules=TARGETS),
    "fourierft": lambda: up.FourierFTConfig(n_frequency=40, target_modules=TARGETS),
    "oft": lambda: up.OFTConfig(oft_block_size=8, target_modules=TARGETS),
    "vera": lambda: up.VeraConfig(r=8, target_modules=TARGETS),
    "tinylora": lambda: up.TinyLoraConfig(r=4, u=8, target_modules=TARGETS),
}


def randomised(method: str) -> up.AdaptedModel:
    """The tiny BERT with `method`'s adapter whose parameters are drawn away from the identity."""
    model = up.adapt(build("bert"), CONFIGS[method]()).train()
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and "classifier" not in n:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def force_plain(model: up.AdaptedModel) -> list:
    handles = [site.base_layer.register_forward_hook(lambda *a: None) for site in model.sites()]
    model._ctx.version += 1  # re-resolve the sites
    return handles


def step(model, batch):
    model.zero_grad()
    torch.manual_seed(5)  # the same dropout masks on both paths
    out = model(**batch).logits
    out.pow(2).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_fused_equals_plain_outputs_and_gradients(method):
    model = randomised(method)
    batch = inputs("bert")
    out_f, grads_f = step(model, batch)
    force_plain(model)
    out_p, grads_p = step(model, batch)
    assert set(grads_f) == set(grads_p) and len(grads_p) > 2
    assert (out_f - build("bert")(**batch).logits).abs().max() > 1e-3, "the adapter does nothing"
    torch.testing.assert_close(out_f, out_p, atol=1e-6, rtol=1e-5)
    # fp32 rounding differs (W + dW is rounded once more; FourierFT's scaling 150 amplifies it): within
    # 5e-5 of each gradient's scale, where a wrong product would be off by its whole size.
    for n in grads_p:
        assert (grads_f[n] - grads_p[n]).abs().max() <= 5e-5 * grads_p[n].abs().max(), n


@pytest.mark.parametrize("method", ["oft", "shira", "supertuning"])
def test_fused_output_equals_merged_and_unmerge_restores(method):
    model = randomised(method).eval()
    batch = inputs("bert")
    with torch.no_grad():
        before = model(**batch).logits
        model.merge()
        merged = model(**batch).logits
        model.unmerge()
        after = model(**batch).logits
    torch.testing.assert_close(merged, before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)


def test_oft_takes_the_input_path_only_where_it_is_cheaper():
    """Training or few tokens: base(x R); many tokens without gradients: the base with W R^T (plain path)."""
    model = randomised("oft")
    delta = model.deltas("default")[0]
    x = torch.randn(2, 3, delta.base.in_features)
    assert delta.fused_call(x) is not None  # gradients wanted
    with torch.no_grad():
        assert delta.fused_call(x) is not None  # 6 tokens < out features (32)
        assert delta.fused_call(torch.randn(64, delta.base.in_features)) is None


def test_osf_training_form_equals_the_exact_form():
    """OSF's rank-2r training product against its exact two-product form (no gradient taken)."""
    model = up.adapt(build("bert"), up.OSFConfig(effective_rank=28, target_modules=["query", "value"])).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    batch = inputs("bert")
    with torch.no_grad():
        exact = model(**batch).logits
    trained = model(**batch).logits  # gradients wanted: the rank-2r form
    assert trained.requires_grad and (exact - build("bert")(**batch).logits).abs().max() > 1e-4
    torch.testing.assert_close(trained.detach(), exact, atol=1e-6, rtol=1e-5)
