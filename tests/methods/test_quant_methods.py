"""PEQA, L4Q and 1-bit LoRA (methods/quant/): their math on real layers, with measured numbers.

Quantized layers are real bitsandbytes 0.50.2 NF4 / int8 linears on the CPU, built as in
tests/core/test_layers.py. Figures in comments were measured here (CPU, float32):

* PEQA, exact path (float32 absmax / SCB rescaled): stored merged weight vs diag(g) W 7.5e-9 (NF4)
  and 1.5e-8 (int8); merged vs unmerged training-mode output 2.4e-7. Double-quantized NF4 goes
  through the requantizing write: 1.8e-4 (bound: half the NF4 code gap x absmax x g).
* L4Q: merged output equals the unmerged QAT output bit for bit.
* 1-bit LoRA, rank 8 on a 64x64 linear: 136 tensor bytes vs 4096 for fp32 LoRA (30.1x).
"""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import unipeft as up
from unipeft.core import layers

from ..core.test_layers import half_gap, linear, packed_state, quant4, quant8, same_packed

MAKERS = {"nf4": lambda lin: quant4(lin, "nf4", compress=False), "int8": quant8}


def quantized_mlp(kind: str) -> nn.Sequential:
    """16 -> 64 -> quantized 64 -> 32, in training mode (CPU: the dense dequantized matmul)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), MAKERS[kind](linear(64, 32, seed=1))).train()


def peqa_model(kind: str):
    """(model, its quantized layer, the PEQA-adapted model)."""
    model = quantized_mlp(kind)
    q = model[2]
    return model, q, up.adapt(model, up.PeqaConfig(target_modules=["2"]))


def peqa_delta(adapted) -> up.Delta:
    return adapted.base_model[2].deltas["default"]


# ---- PEQA --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", MAKERS)
def test_peqa_identity_at_init_and_only_g_trains(kind):
    model = quantized_mlp(kind)
    x = torch.randn(8, 16)
    with torch.no_grad():
        base = model(x)
    q = model[2]
    saved = packed_state(q)
    adapted = up.adapt(model, up.PeqaConfig(target_modules=["2"]))
    with torch.no_grad():
        assert torch.equal(adapted(x), base)
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable == ["base_model.2.deltas.default.peqa_scale"]
    opt = torch.optim.Adam([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        loss = (adapted(x) - 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert same_packed(q, saved), "the packed base weight changed during training"
    assert (peqa_delta(adapted).peqa_scale - 1).abs().max() > 1e-3


@pytest.mark.parametrize("kind", MAKERS)
def test_peqa_forward_is_row_scaled_dequantized_weight(kind):
    model, q, adapted = peqa_model(kind)
    g = torch.linspace(0.5, 1.5, 32)
    with torch.no_grad():
        peqa_delta(adapted).peqa_scale.copy_(g)
        x = torch.randn(8, 16)
        h = model[1](model[0](x))
        expected = h @ (g[:, None] * layers.dense_weight(q)).T + q.bias
        torch.testing.assert_close(adapted(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind, stored_bound", [("nf4", 2e-8), ("int8", 3e-8)])  # measured 7.5e-9, 1.5e-8
def test_peqa_merge_rescales_the_stored_scales_and_unmerge_restores_them(kind, stored_bound):
    model, q, adapted = peqa_model(kind)
    x = torch.randn(8, 16)
    torch.manual_seed(3)
    with torch.no_grad():
        saved = packed_state(q)
        w = layers.dense_weight(q)
        g = torch.empty(32).uniform_(0.8, 1.2)
        peqa_delta(adapted).peqa_scale.copy_(g)
        unmerged = adapted(x)
        adapted.merge()
        data, scales = packed_state(q)
        assert torch.equal(data, saved[0]), "merging must leave the packed codes untouched"
        rows = scales.view(32, -1) / saved[1].view(32, -1)
        torch.testing.assert_close(rows, g[:, None].expand_as(rows), rtol=1e-6, atol=0)
        err = up.peqa_merge_errors(adapted)["2"]
        assert err <= stored_bound
        assert (layers.dense_weight(q) - g[:, None] * w).abs().max() <= stored_bound
        # |merged - unmerged| <= err * ||h||_1 per row, plus float32 matmul rounding (measured 2.4e-7)
        assert (adapted(x) - unmerged).abs().max() <= 1e-6
        adapted.unmerge()
        assert same_packed(q, saved)
        assert torch.equal(adapted(x), unmerged)


def test_peqa_double_quantized_merge_requantizes_and_reports_the_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), quant4(linear(64, 32, seed=1), "nf4", compress=True))
    q = model[2]
    adapted = up.adapt(model.train(), up.PeqaConfig(target_modules=["2"]))
    with torch.no_grad():
        saved, w = packed_state(q), layers.dense_weight(q)
        g = torch.empty(32).uniform_(0.8, 1.2)
        peqa_delta(adapted).peqa_scale.copy_(g)
        adapted.merge()
        err = up.peqa_merge_errors(adapted)["2"]
        exact = g[:, None] * w
        assert err == (layers.dense_weight(q) - exact).abs().max()
        # requantization: half the widest NF4 gap times the block's absmax, 1% for the nested absmax
        assert 1e-5 < err <= half_gap("nf4") * exact.abs().max() * 1.01  # measured 1.8e-4
        adapted.unmerge()
        assert same_packed(q, saved)


@pytest.mark.parametrize("kind", MAKERS)
def test_peqa_save_load_round_trip(kind, tmp_path):
    model, q, adapted = peqa_model(kind)
    with torch.no_grad():
        peqa_delta(adapted).peqa_scale.uniform_(0.8, 1.2)
    x = torch.randn(8, 16)
    with torch.no_grad():
        out = adapted(x)
    adapted.save_pretrained(tmp_path)
    assert list(load_file(str(tmp_path / "adapter_model.safetensors"))) == ["base_model.model.2.peqa_scale"]
    loaded = up.AdaptedModel.from_pretrained(quantized_mlp(kind), tmp_path)
    assert torch.equal(peqa_delta(loaded).peqa_scale, peqa_delta(adapted).peqa_scale)
    with torch.no_grad():
        assert torch.equal(loaded.train()(x), out)


@pytest.mark.parametrize("kind", MAKERS)
def test_peqa_learns_a_row_scaling_target(kind):
    model, q, adapted = peqa_model(kind)
    torch.manual_seed(5)
    g_true = torch.empty(32).uniform_(0.6, 1.4)
    x = torch.randn(256, 16)
    with torch.no_grad():
        h = model[1](model[0](x))
        y = h @ (g_true[:, None] * layers.dense_weight(q)).T + q.bias
    opt = torch.optim.Adam([peqa_delta(adapted).peqa_scale], lr=0.02)
    losses = []
    for _ in range(150):
        loss = (adapted(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 100, (losses[0], losses[-1])
    assert (peqa_delta(adapted).peqa_scale - g_true).abs().max() < 0.05


# ---- L4Q ---------------------------------------------------------------------------------------
def l4q_model(bits: int = 4, group_size: int = 16):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 8))
    adapted = up.adapt(model, up.L4QConfig(target_modules=["0"], r=4, alpha=8, bits=bits,
                                           group_size=group_size))
    return model, adapted, adapted.base_model[0].deltas["default"]


def minmax_quantized(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Independent reference: per-group min-max uniform asymmetric quantization of `w`."""
    g = w.reshape(w.shape[0], -1, group_size)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s = (hi - lo) / (2 ** bits - 1)
    return (torch.clamp(torch.round((g - lo) / s), 0, 2 ** bits - 1) * s + lo).reshape(w.shape)


@pytest.mark.parametrize("bits", [4, 3])
def test_l4q_forward_at_init_is_the_fake_quantized_base(bits):
    model, adapted, delta = l4q_model(bits)
    x = torch.randn(5, 64)
    lin = adapted.base_model[0].base_layer
    with torch.no_grad():
        expected = x @ minmax_quantized(lin.weight, bits, 16).T + lin.bias
        got = adapted.base_model[0](x)
        assert (got - expected).abs().max() <= 1e-6
        assert (got - lin(x)).abs().max() > 1e-3  # and not the float base


def test_l4q_gradients_reach_a_b_and_the_quantizer():
    model, adapted, delta = l4q_model()
    x = torch.randn(16, 64)
    adapted(x).pow(2).sum().backward()  # B = 0: A's gradient is 0, B's is not
    for name in ("lora_B", "quant_scale", "quant_offset"):
        assert getattr(delta, name).grad.abs().max() > 0, name
    with torch.no_grad():
        delta.lora_B.normal_(0, 0.05)
    delta.zero_grad()
    adapted(x).pow(2).sum().backward()
    for name in ("lora_A", "lora_B", "quant_scale", "quant_offset"):
        assert getattr(delta, name).grad.abs().max() > 0, name


def test_l4q_merge_is_exact_and_quantized():
    model, adapted, delta = l4q_model(bits=4, group_size=16)
    torch.manual_seed(2)
    with torch.no_grad():
        delta.lora_B.normal_(0, 0.05)
        delta.quant_scale.mul_(1.1)
        x = torch.randn(7, 64)
        unmerged = adapted(x)
        lin = adapted.base_model[0].base_layer
        w0 = lin.weight.detach().clone()
        state = up.l4q_quantized_state(adapted)["0"]
        adapted.merge()
        assert torch.equal(adapted(x), unmerged)  # measured: bit-identical
        merged = lin.weight.detach().reshape(48, 4, 16)
        levels = max(len(torch.unique(merged[i, j])) for i in range(48) for j in range(4))
        assert levels <= 2 ** 4
        with pytest.raises(up.ConfigError, match="merged"):
            up.l4q_quantized_state(adapted)
        idx = torch.arange(64) // 16
        rebuilt = state["codes"].float() * state["scale"][:, idx] + state["offset"][:, idx]
        assert torch.equal(rebuilt, lin.weight) and state["codes"].max() <= 15
        adapted.unmerge()
        assert (lin.weight - w0).abs().max() <= 1e-6
        plain = up.l4q_merge_and_unload(adapted)
        assert isinstance(plain[0], nn.Linear) and torch.equal(plain(x), unmerged)


def test_l4q_ragged_group_and_save_load(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 6))  # 24 inputs, groups of 16: a short last group of 8
    adapted = up.adapt(model, up.L4QConfig(target_modules=["0"], r=2, group_size=16))
    delta = adapted.base_model[0].deltas["default"]
    assert delta.quant_scale.shape == (6, 2)
    with torch.no_grad():
        delta.lora_B.normal_(0, 0.1)
        x = torch.randn(3, 24)
        out = adapted(x)
    adapted.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = up.AdaptedModel.from_pretrained(nn.Sequential(nn.Linear(24, 6)), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
    with pytest.raises(up.ConfigError, match="bits"):
        up.L4QConfig(bits=1)


# ---- 1-bit LoRA --------------------------------------------------------------------------------
def test_onebit_storage_is_about_32x_smaller_than_fp32_lora(tmp_path):
    sizes = {}
    for name, cfg in (("lora", up.LoraConfig(target_modules=["0"], r=8)),
                      ("onebit", up.OneBitLoraConfig(target_modules=["0"], r=8))):
        torch.manual_seed(0)
        adapted = up.adapt(nn.Sequential(nn.Linear(64, 64)), cfg)
        adapted.save_pretrained(tmp_path / name)
        sizes[name] = (up.adapter_storage_bytes(adapted),
                       os.path.getsize(tmp_path / name / "adapter_model.safetensors"))
    assert sizes["lora"][0] == 4 * 8 * (64 + 64) == 4096
    assert sizes["onebit"][0] == 8 * (64 + 64) // 8 + 2 * 4 == 136  # sign bits + two fp32 scales
    assert sizes["lora"][0] / sizes["onebit"][0] > 30  # 30.1x
    # The whole file, safetensors header included (measured: 4256 vs 504 bytes, 8.4x at this size)
    assert sizes["lora"][1] / sizes["onebit"][1] > 7


def onebit_model(granularity: str = "matrix"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
    cfg = up.OneBitLoraConfig(target_modules=["0", "2"], r=4, alpha=4, scale_granularity=granularity)
    return model, up.adapt(model, cfg)


@pytest.mark.parametrize("granularity", ["matrix", "row"])
def test_onebit_identity_forward_and_exact_round_trip(granularity, tmp_path):
    model, adapted = onebit_model(granularity)
    x = torch.randn(6, 20)
    with torch.no_grad():
        base = adapted.base_model[2].base_layer(torch.relu(adapted.base_model[0].base_layer(x)))
        assert torch.equal(adapted(x), base)  # latent B = 0: alpha(B) = 0, Q(B) = 0
        delta = adapted.base_model[0].deltas["default"]
        for site in adapted.sites():
            site.deltas["default"].lora_B.normal_(0, 0.1)
        a = delta.lora_A
        alpha = a.abs().mean(1, keepdim=True) if granularity == "row" else a.abs().mean()
        qa = torch.where(a >= 0, alpha, -alpha)
        torch.testing.assert_close(delta.quantized(a), qa, rtol=1e-6, atol=0)
        assert len(torch.unique(delta.quantized(a).abs())) == (4 if granularity == "row" else 1)
        out = adapted(x)
    adapted.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert tensors["base_model.model.0.lora_A.signs"].dtype == torch.uint8
    assert tensors["base_model.model.0.lora_A.signs"].shape == (4, 3)  # 20 bits per row -> 3 bytes
    assert tensors["base_model.model.0.lora_B.scale"].shape == ((32,) if granularity == "row" else (1,))
    with torch.no_grad():
        assert torch.equal(adapted(x), out), "saving (snapping the latents) changed the output"
    loaded = up.AdaptedModel.from_pretrained(nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4)),
                                             tmp_path)
    loaded.base_model.load_state_dict(adapted.base_model.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
    for s_site, l_site in zip(adapted.sites(), loaded.sites()):
        for k in ("lora_A", "lora_B"):
            assert torch.equal(getattr(s_site.deltas["default"], k), getattr(l_site.deltas["default"], k))


def test_onebit_trains_on_a_toy_task():
    model, adapted = onebit_model()
    torch.manual_seed(7)
    x = torch.randn(256, 20)
    with torch.no_grad():
        y = nn.Linear(20, 4)(x)
    params = [p for p in adapted.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-3)
    losses = []
    for _ in range(200):
        loss = (adapted(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 4, (losses[0], losses[-1])  # measured 0.413 -> 0.088 (4.7x)
    with torch.no_grad():
        out = adapted(x)
        adapted.merge()
        torch.testing.assert_close(adapted(x), out, rtol=1e-5, atol=1e-5)
