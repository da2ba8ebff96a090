"""core/layers.py on real layers: geometry, dense views, quantized write-back and exact restores.

The quantized layers are real bitsandbytes 4-bit (NF4/FP4) and 8-bit linears on the CPU. Bounds
are derived, not fitted (the numbers in comments were measured with bitsandbytes 0.50.2 here):

* 4-bit: an entry is rounded to the nearest code value times its block's absmax, so its error is
  at most half the widest gap of the code (NF4 0.1519, FP4 0.1667) times that absmax, with 1%
  slack for the 8-bit-quantized (nested) absmax. Measured max |err| at 32x64: NF4 0.0190, FP4 0.0208.
* 8-bit: rows are cast to fp16, then rounded to steps of absmax/127: error <= SCB/254 + 2^-11 |w|.
  Measured max |err|: 5.1e-4.
* Merging writes Q(V), V = W + dW, with |Q(V) - V| <= e = requantization_error(layer, V); the
  unmerged output is h @ V.T + b, so the merged one differs by at most e * ||h||_1 per row.
* Eval-mode kernels: Linear4bit on an AVX512-BF16 CPU repacks its weight and runs in bf16 (input,
  absmax and output each rounded: <= 3 * 2^-9 * |h| @ |W|.T); Linear8bitLt rounds the input rows to
  int8 steps of absmax/127 and computes in fp16 (<= rowmax|h|/254 * ||W_k||_1 + 2^-10 |h| @ |W|.T).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import unipeft as up
from unipeft.core import layers

try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf
except ImportError as exc:  # a hard failure: these tests must never skip silently
    raise ImportError("tests/core/test_layers.py needs bitsandbytes==0.50.2 (in the `test` extra): "
                      "pip install -e '.[test]'  (or: bash scripts/setup.sh test)") from exc

NESTED_SLACK = 1.01  # the nested absmax is itself 8-bit quantized


def linear(n_in: int = 64, n_out: int = 32, seed: int = 0) -> nn.Linear:
    """A float linear with torch's default init (entries uniform in +-1/sqrt(n_in))."""
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out)


def quant4(lin: nn.Linear, quant_type: str = "nf4", compress: bool = True, blocksize: int = 64,
           dtype=torch.float32) -> nn.Module:
    """`lin` as a bitsandbytes Linear4bit (quantized by the move to the CPU)."""
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=True, quant_type=quant_type,
                          compute_dtype=torch.float32, compress_statistics=compress)
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone().to(dtype), requires_grad=False, quant_type=quant_type,
                                 compress_statistics=compress, blocksize=blocksize)
    q.bias = nn.Parameter(lin.bias.data.clone())
    return q.to("cpu")


def quant8(lin: nn.Linear) -> nn.Module:
    """`lin` as a bitsandbytes Linear8bitLt holding int8 weights."""
    q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, has_fp16_weights=False)
    q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    q.bias = nn.Parameter(lin.bias.data.clone())
    return q.to("cpu")


MAKERS = {"nf4": lambda lin: quant4(lin, "nf4"), "fp4": lambda lin: quant4(lin, "fp4"), "int8": quant8}


def half_gap(quant_type: str) -> float:
    """Half the widest gap between consecutive values of a 4-bit code."""
    return float(bf.get_4bit_type(quant_type, device="cpu").sort().values.diff().max()) / 2


def packed_state(q: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored weight tensor, its scales) cloned: absmax for 4-bit, the row absmax SCB for 8-bit."""
    w = q.weight
    if getattr(w, "quant_state", None) is not None:
        return w.data.clone(), w.quant_state.absmax.clone()
    scb = w.SCB if w.SCB is not None else q.state.SCB  # forward moves SCB to q.state
    return w.data.clone(), scb.clone()


def same_packed(q: nn.Module, saved: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """True when q's stored weight and scales equal `saved` bit for bit."""
    data, scales = packed_state(q)
    return torch.equal(data, saved[0]) and torch.equal(scales, saved[1])


def kernel_bound(q: nn.Module, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """How far q's forward may be from h @ w.T + b (0 for the float training-mode paths)."""
    if q.training:
        return torch.zeros(())
    scale = h.abs() @ w.abs().T
    if layers.geometry(q).kind == "quantized" and getattr(q.weight, "quant_state", None) is not None:
        return 3 * 2 ** -9 * scale
    rowmax = h.abs().max(dim=-1, keepdim=True).values
    return rowmax / 254 * w.abs().sum(1) + 2 ** -10 * scale


# ---- 1. geometry ---------------------------------------------------------------------------
@pytest.mark.parametrize("make, expected", [
    (lambda: nn.Linear(5, 3), (5, 3, "linear", ())),
    (lambda: Conv1D(3, 5), (5, 3, "transposed", ())),  # Conv1D(nf=out, nx=in), weight (in, out)
    (lambda: nn.Conv1d(4, 6, 3), (4, 6, "conv", (3,))),
    (lambda: nn.Conv2d(4, 6, (3, 2)), (4, 6, "conv", (3, 2))),
    (lambda: nn.Embedding(10, 7), (10, 7, "embedding", ())),
    (lambda: quant4(linear(64, 32)), (64, 32, "quantized", ())),
    (lambda: quant4(linear(64, 32), "fp4"), (64, 32, "quantized", ())),
    (lambda: quant8(linear(64, 32)), (64, 32, "quantized", ())),
    (lambda: bnb.nn.LinearNF4(64, 32), (64, 32, "quantized", ())),
], ids=["linear", "conv1d_gpt2", "conv1d", "conv2d", "embedding", "nf4", "fp4", "int8", "LinearNF4"])
def test_geometry(make, expected):
    geo = layers.geometry(make())
    assert (geo.in_features, geo.out_features, geo.kind, geo.kernel_size) == expected
    assert geo.is_matrix == (expected[2] in ("linear", "transposed", "quantized"))


@pytest.mark.parametrize("module", [nn.ReLU(), nn.LayerNorm(4), nn.Sequential(nn.Linear(2, 2))],
                         ids=["relu", "layernorm", "sequential"])
def test_geometry_refuses_other_modules(module):
    with pytest.raises(up.TargetError, match=f"no layer geometry for a {type(module).__name__}"):
        layers.geometry(module)


def test_dense_weight_and_param_layout():
    conv = Conv1D(3, 5)
    dense = layers.dense_weight(conv)
    assert dense.shape == (3, 5) and torch.equal(dense, conv.weight.T)
    assert torch.equal(layers.to_param_layout(conv, dense), conv.weight)
    lin = nn.Linear(5, 3)
    assert layers.dense_weight(lin) is lin.weight
    assert torch.equal(layers.to_param_layout(lin, layers.dense_weight(lin)), lin.weight)
    x = torch.randn(4, 5)
    torch.testing.assert_close(conv(x), x @ dense.T + conv.bias, rtol=0, atol=1e-6)
    assert [layers.is_transposed(m) for m in (conv, lin)] == [True, False]
    assert [layers.is_quantized(m) for m in (conv, lin, quant4(linear()), quant8(linear()))] == [False, False,
                                                                                                True, True]


# ---- 2. dense views of quantized layers ---------------------------------------------------------
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress", [True, False], ids=["nested", "plain"])
def test_4bit_dense_weight_is_within_the_code_bound(quant_type, compress):
    lin = linear()
    q = quant4(lin, quant_type, compress)
    w, dense = lin.weight.detach(), layers.dense_weight(q)
    assert dense.shape == (32, 64) and dense.dtype == torch.float32
    block_absmax = w.reshape(-1, 64).abs().amax(1, keepdim=True)
    err = (dense - w).abs().reshape(-1, 64)
    assert (err <= half_gap(quant_type) * block_absmax * NESTED_SLACK + 1e-7).all()
    assert 0.015 < err.max() < 0.021  # measured: NF4 0.0190, FP4 0.0208 (absmax 1/8 here)


def test_8bit_dense_weight_is_within_half_an_int8_step():
    lin = linear()
    q = quant8(lin)
    w, dense = lin.weight.detach(), layers.dense_weight(q)
    scb = q.weight.SCB
    assert (dense - w).abs().le(scb[:, None] / 254 + 2 ** -11 * w.abs() + 1e-7).all()
    assert (dense - w).abs().max() < 5.2e-4  # measured 5.08e-4
    q(torch.randn(2, 64))  # the first forward moves SCB from the weight into q.state
    assert q.weight.SCB is None and torch.equal(layers.dense_weight(q), dense)


@pytest.mark.parametrize("kind", MAKERS)
def test_training_mode_forward_is_the_dense_matmul(kind):
    lin = linear()
    q = MAKERS[kind](lin).train()
    x = torch.randn(7, 64)
    with torch.no_grad():
        # bitsandbytes' CPU training path dequantizes as dense_weight does: equal to rounding.
        torch.testing.assert_close(q(x), x @ layers.dense_weight(q).T + lin.bias, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", MAKERS)
def test_eval_mode_forward_is_within_the_kernel_bound(kind):
    lin = linear()
    q = MAKERS[kind](lin)
    before = layers.dense_weight(q)
    q.eval()
    x = torch.randn(7, 64)
    with torch.no_grad():
        y = q(x)  # Linear4bit on an AVX512-BF16 CPU repacks its weight here
        dense = layers.dense_weight(q)
        # Repacking rounds the absmax to bf16: every entry moves by at most 2^-9 relative.
        assert ((dense - before).abs() <= 2 ** -9 * before.abs() + 1e-9).all()
        assert ((y - (x @ dense.T + lin.bias)).abs() <= kernel_bound(q, x, dense) + 1e-6).all()


def test_cpu_packed_4bit_weight_reads_and_writes():
    """The AVX512-BF16 layout Linear4bit.forward converts to (done here directly, on any CPU)."""
    lin = linear()
    q = quant4(lin)
    before = layers.dense_weight(q)
    q.weight.data, _ = bf._convert_weight_packed_for_cpu(q.weight.data, q.weight.quant_state)
    assert q.weight.quant_state.packing_format_for_cpu and q.weight.data.shape == (32, 32)
    snap, saved = layers.snapshot_param(q, "weight"), packed_state(q)
    dense = layers.dense_weight(q)
    assert ((dense - before).abs() <= 2 ** -9 * before.abs() + 1e-9).all()
    assert same_packed(q, saved), "reading the packed weight modified it"
    value = dense + 0.01
    e = layers.requantization_error(q, value)
    layers.write_param(q, "weight", value)
    assert q.weight.quant_state.dtype == torch.float32 and q.weight.quant_state.nested  # as quantized first
    assert 0 < (layers.dense_weight(q) - value).abs().max() <= e
    layers.restore_param(q, "weight", snap)
    assert same_packed(q, saved) and torch.equal(layers.dense_weight(q), dense)


# ---- 3. write_param / requantization_error / snapshots ------------------------------------------
@pytest.mark.parametrize("kind", MAKERS)
def test_write_param_stores_within_the_requantization_error(kind):
    q = MAKERS[kind](linear())
    torch.manual_seed(1)
    value = layers.dense_weight(q) + 0.01 * torch.randn(32, 64)
    e = layers.requantization_error(q, value)
    assert e > 0
    bound = value.abs().max() * (half_gap(kind) * NESTED_SLACK if kind != "int8" else 1 / 254 + 2 ** -11)
    assert e <= bound
    layers.write_param(q, "weight", value)
    assert (layers.dense_weight(q) - value).abs().max() == e  # the same requantization, deterministic
    assert layers.param_value(q, "weight").shape == (32, 64)


@pytest.mark.parametrize("compress, blocksize, dtype", [(True, 64, torch.float32), (False, 128, torch.float32),
                                                        (True, 64, torch.bfloat16)])
def test_write_param_keeps_the_4bit_settings(compress, blocksize, dtype):
    q = quant4(linear(), "fp4", compress, blocksize, dtype)
    old = q.weight
    layers.write_param(q, "weight", layers.dense_weight(q) * 0.5)
    new = q.weight
    assert new is not old and isinstance(new, bnb.nn.Params4bit) and not new.requires_grad
    for attr in ("quant_type", "blocksize", "dtype", "nested", "shape"):
        assert getattr(new.quant_state, attr) == getattr(old.quant_state, attr), attr
    assert (new.compress_statistics, new.quant_storage, new.data.dtype) == (compress, torch.uint8, torch.uint8)
    assert q.quant_state is new.quant_state


def test_write_param_on_float_layers_is_exact():
    lin, conv = nn.Linear(5, 3), Conv1D(3, 5)
    value = torch.randn(3, 5)
    assert layers.requantization_error(lin, value) == 0.0
    layers.write_param(lin, "weight", value)
    assert torch.equal(lin.weight, value)
    layers.write_param(conv, "weight", layers.to_param_layout(conv, value))
    assert torch.equal(layers.dense_weight(conv), value)
    before = lin.bias.detach().clone()
    snap = layers.snapshot_param(lin, "bias")
    layers.write_param(lin, "bias", torch.zeros(3))
    assert lin.bias.abs().sum() == 0
    layers.restore_param(lin, "bias", snap)
    assert torch.equal(lin.bias, before) and before.abs().sum() > 0


@pytest.mark.parametrize("kind", MAKERS)
def test_snapshot_restore_is_bit_exact_across_forwards(kind):
    q = MAKERS[kind](linear())
    x = torch.randn(3, 64)
    with torch.no_grad():
        y = q(x)
        saved, snap = packed_state(q), layers.snapshot_param(q, "weight")
        layers.write_param(q, "weight", layers.dense_weight(q) + 0.05)
        assert not torch.equal(q(x), y)
        layers.restore_param(q, "weight", snap)
        assert same_packed(q, saved) and torch.equal(q(x), y)
        assert same_packed(q, saved)  # and the next forward (8-bit: reads the restored scales) keeps it


# ---- 4./6. LoRA and DoRA on a quantized base, through the public API ------------------------------
def quantized_mlp(kind: str) -> nn.Sequential:
    """16 -> 64 -> quantized 64 -> 32: the model's output is the quantized layer's output."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), MAKERS[kind](linear(64, 32, seed=1)))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_lora_on_a_quantized_base_merges_unmerges_and_unloads(kind, mode, dora):
    model = quantized_mlp(kind)
    getattr(model, mode)()
    q = model[2]
    torch.manual_seed(2)
    x = torch.randn(8, 16)
    with torch.no_grad():
        h = model[1](model[0](x))  # the quantized layer's input
        before = model(x)  # eval: may repack a 4-bit weight for the CPU inference kernel
        adapted = up.adapt(model, up.LoraConfig(r=4, target_modules=["2"], use_dora=dora))
        getattr(adapted, mode)()
        site = adapted.base_model[2]
        assert site.base_layer is q
        saved = packed_state(q)  # adapting keeps (or puts back) the standard layout: no repacking later
        with adapted.disable_adapter():
            base = adapted(x)
        assert ((base - before).abs() <= kernel_bound(q, h, layers.dense_weight(q)) + 1e-6).all()
        y0 = adapted(x)
        if dora:  # m / ||W + s BA|| is 1 only up to rounding
            torch.testing.assert_close(y0, base, rtol=0, atol=1e-5)
        else:  # B = 0
            assert torch.equal(y0, base)
        delta = site.deltas["default"]
        delta.lora_B.weight.normal_(0, 0.05)
        y_unmerged = adapted(x)
        assert (y_unmerged - base).abs().max() > 1e-2, "the perturbed adapter should change the output"
        dense = layers.param_value(q, "weight")
        value = dense + delta.delta_weight()["weight"]
        e = layers.requantization_error(q, value)
        adapted.merge()
        assert adapted.merged_adapters == ["default"] and not same_packed(q, saved)
        merged_dense = layers.dense_weight(q)  # before a forward (which may repack it, see above)
        assert (merged_dense - value).abs().max() <= e
        y_merged = adapted(x)
        # merged - unmerged = h @ (Q(V) - V).T (+ each eval kernel's own error)
        bound = e * h.abs().sum(-1, keepdim=True) + kernel_bound(q, h, dense) + kernel_bound(q, h, merged_dense)
        assert ((y_merged - y_unmerged).abs() <= bound + 1e-5).all()
        assert e * h.abs().sum(-1).max() < 2.0  # measured merge gaps: 4-bit ~0.022, int8 ~0.001
        adapted.unmerge()
        assert adapted.merged_adapters == [] and same_packed(q, saved)
        assert torch.equal(adapted(x), y_unmerged)
        with adapted.disable_adapter():
            assert torch.equal(adapted(x), base)
        adapted.merge()
        plain = adapted.unload()  # undoes the merge
        assert plain is model and plain[2] is q and same_packed(q, saved)
        assert torch.equal(plain(x), base)
        assert same_packed(q, saved)


def test_two_merged_adapters_unmerge_to_the_original_packed_weight():
    model = quantized_mlp("nf4")
    q = model[2]
    x = torch.randn(4, 16)
    with torch.no_grad():
        base, saved = model(x), packed_state(q)
        adapted = up.adapt(model, up.LoraConfig(r=2, target_modules=["2"]))
        adapted.add_adapter("other", up.LoraConfig(r=3, target_modules=["2"], use_dora=True))
        for name in ("default", "other"):
            adapted.base_model[2].deltas[name].lora_B.weight.normal_(0, 0.05)
        adapted.set_adapter(["default", "other"])
        adapted.merge()
        assert adapted.merged_adapters == ["default", "other"] and not same_packed(q, saved)
        adapted.unmerge()
        assert same_packed(q, saved)
        assert torch.equal(adapted.unload()(x), base)


def test_lora_trains_on_a_4bit_base_without_touching_it():
    model = quantized_mlp("nf4").train()
    q = model[2]
    saved = packed_state(q)
    adapted = up.adapt(model, up.LoraConfig(r=4, target_modules=["2"]))
    delta = adapted.base_model[2].deltas["default"]
    trainable = sorted(n for n, p in adapted.named_parameters() if p.requires_grad)
    assert trainable == ["base_model.2.deltas.default.lora_A.weight", "base_model.2.deltas.default.lora_B.weight"]
    adapted(torch.randn(8, 16)).pow(2).sum().backward()
    assert delta.lora_B.weight.grad.abs().sum() > 0 and q.weight.grad is None
    assert same_packed(q, saved)


# ---- 5. methods without quantized_base are refused ------------------------------------------------
@pytest.mark.parametrize("make_config", [lambda: up.SptConfig(target_modules=["2"])], ids=["spt"])
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_methods_without_quantized_base_refuse_quantized_targets(make_config, kind):
    config = make_config()
    name = type(config).__name__
    spec = next(r for r in up.capability_table() if r["peft_type"] == config.peft_type)
    assert spec["quantized_base"] is False
    model = quantized_mlp(kind)
    q = model[2]
    x = torch.randn(4, 16)
    with torch.no_grad():
        base, saved = model(x), packed_state(q)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = list(model.named_modules())
    with pytest.raises(up.TargetError, match=rf"{name}: .*does not support quantized base layers, but '2' is a "
                                             rf"{type(q).__name__}"):
        up.adapt(model, config)
    assert list(model.named_modules()) == modules and model[2] is q
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert same_packed(q, saved)
    with torch.no_grad():
        assert torch.equal(model(x), base)
