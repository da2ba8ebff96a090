"""LoftQ: init="loftq" on float bases and replace_lora_weights_loftq on bitsandbytes 4-bit bases.

PEFT's loftq_init moves the weight to "cuda" (or "xpu") unconditionally, so it cannot run on this
CPU machine (AssertionError: Torch not compiled with CUDA enabled); it is compared here with a
line-by-line CPU transcription of it that uses PEFT's own _low_rank_decomposition.

Error factors ||W - dequant(Q)|| / ||W - (dequant(Q) + sBA)||_F at r=8 on 256x256, measured with
bitsandbytes 0.50.2: Gaussian weight 1.062 (1 iter), 1.113 (2), 1.158 (4); Gaussian with four
outlier columns (x20) 1.195 (1 iter). For one iteration the factor is exactly 1/sqrt(1 - top-8
singular energy / total energy) of the NF4 residual, near-white noise here, hence small.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BitsAndBytesConfig, LlamaForCausalLM

import unipeft as up
from unipeft.core import layers
from unipeft.methods.lora.loftq import quantize_dequantize
from ..interop._models import save_tiny_llama

bnb = pytest.importorskip("bitsandbytes", reason="needs bitsandbytes==0.50.2 (the `test` extra)")
peft_loftq = pytest.importorskip("peft.utils.loftq_utils")


def weight(kind: str = "gauss", n: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, n, generator=g) * 0.02
    if kind == "outliers":
        w[:, :4] *= 20
    return w


def adapted_linear(w: torch.Tensor, r: int = 8, alpha: float = 16, bits: int = 4, iters: int = 1):
    lin = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
    cfg = up.LoraConfig(r=r, alpha=alpha, target_modules=["0"], init="loftq",
                        loftq_config={"loftq_bits": bits, "loftq_iter": iters})
    return up.adapt(nn.Sequential(lin), cfg)


def loftq_error(model, w: torch.Tensor) -> float:
    site = model.base_model[0]
    with torch.no_grad():
        return float((w - (site.base_layer.weight + site.deltas["default"].delta_weight()["weight"])).norm())


@pytest.mark.parametrize("kind, factor", [("gauss", 1.05), ("outliers", 1.17)])  # measured 1.062, 1.195
def test_loftq_beats_plain_quantization(kind, factor):
    w = weight(kind)
    plain = float((w - quantize_dequantize(w, 4)).norm())
    assert plain / loftq_error(adapted_linear(w), w) > factor


@pytest.mark.parametrize("bits", [4, 8])
def test_more_iterations_do_not_increase_the_error(bits):
    w = weight()
    errors = [loftq_error(adapted_linear(w, bits=bits, iters=t), w) for t in (1, 2, 3, 4)]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0]


def test_base_is_on_the_nf4_grid_and_quantizes_exactly():
    w = weight()
    base = adapted_linear(w).base_model[0].base_layer.weight.detach()
    q = bnb.nn.Params4bit(base.clone(), requires_grad=False, quant_type="nf4", blocksize=64,
                          compress_statistics=False).to("cpu")
    assert torch.equal(layers._dequantize(q), base)
    # Double quantization (8-bit absmax, as QLoRA's bnb_4bit_use_double_quant) re-rounds the block
    # scales, so it is not exact: measured max |err| 2.8e-4, relative Frobenius 2.2e-3.
    q = bnb.nn.Params4bit(base.clone(), requires_grad=False, quant_type="nf4", blocksize=64,
                          compress_statistics=True).to("cpu")
    d = layers._dequantize(q) - base
    assert 0 < d.norm() / base.norm() < 5e-3


def test_int8_base_quantizes_exactly():
    base = adapted_linear(weight(), bits=8).base_model[0].base_layer.weight.detach()
    q = bnb.nn.Int8Params(base.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
    assert torch.equal(layers._dequantize(q, q.SCB), base)


def test_scaling_is_accounted_for_and_unload_restores_the_base_exactly():
    w = weight()
    errs = []
    for alpha in (8, 32):  # s = 1 and s = 4 give the same s*BA
        model = adapted_linear(w, alpha=alpha)
        errs.append(loftq_error(model, w))
        lin = model.unload()[0]
        assert torch.equal(lin.weight, w)
    assert abs(errs[0] - errs[1]) < 1e-5


def _peft_loftq_on_cpu(weight, num_bits, reduced_rank, num_iter):
    """PEFT 0.21.2's loftq_init with compute_device="cpu" (its quantization and its SVD helper)."""
    weight = weight.to(torch.float32)
    res = weight.clone()
    for i in range(num_iter):
        if num_bits == 4:
            qweight = bnb.nn.Params4bit(res.to("cpu"), requires_grad=False, compress_statistics=False,
                                        quant_type="nf4").to("cpu")
            dequantized_weight = bnb.functional.dequantize_4bit(qweight.data, qweight.quant_state)
        else:
            qweight = bnb.nn.Int8Params(res.to("cpu"), requires_grad=False).to("cpu")
            dequantized_weight = bnb.functional.int8_vectorwise_dequant(qweight.data, qweight.SCB)
        res = weight - dequantized_weight
        out = peft_loftq._low_rank_decomposition(res, reduced_rank=reduced_rank)
        if i + 1 == num_iter:
            break
        res = weight - torch.mm(out["L"], out["R"])
    return dequantized_weight, out["R"], out["L"]


@pytest.mark.parametrize("bits, iters", [(4, 1), (4, 3), (8, 2)])
def test_matches_peft_loftq_formula(bits, iters):
    w = weight(n=128)
    model = adapted_linear(w, r=8, alpha=8, bits=bits, iters=iters)  # alpha = r: PEFT's B = L, A = R
    site = model.base_model[0]
    q, a, b = _peft_loftq_on_cpu(w, bits, 8, iters)
    d = site.deltas["default"]
    torch.testing.assert_close(site.base_layer.weight.detach(), q, rtol=0, atol=1e-6)
    torch.testing.assert_close(d.lora_A.weight.detach(), a, rtol=0, atol=1e-5)
    torch.testing.assert_close(d.lora_B.weight.detach(), b, rtol=0, atol=1e-5)


def test_config_round_trip_and_errors():
    cfg = up.LoraConfig(target_modules=["0"], init="loftq", loftq_config={"loftq_iter": 2})
    data = cfg.to_dict()
    assert data["init_lora_weights"] == "loftq" and data["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2}
    assert up.AdapterConfig.from_dict(data) == cfg
    import peft
    assert peft.LoraConfig(**{k: v for k, v in data.items() if k != "peft_type"}).loftq_config == data["loftq_config"]
    for bad in ({"loftq_bits": 3}, {"loftq_iter": 0}, {"bits": 4}):
        with pytest.raises(up.ConfigError, match="loftq_config"):
            up.LoraConfig(init="loftq", loftq_config=bad)
    with pytest.raises(up.ConfigError, match="set init='loftq'"):
        up.LoraConfig(loftq_config={"loftq_bits": 4})


# ---- quantized bases: replace_lora_weights_loftq -------------------------------------------------
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama"))


def nf4_llama(path):
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    return LlamaForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.float32).train()


LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_replace_lora_weights_loftq_on_a_4bit_base(llama_dir):
    from safetensors.torch import load_file

    original = load_file(str(llama_dir / "model.safetensors"))
    model = up.adapt(nf4_llama(llama_dir), up.LoraConfig(r=8, alpha=16, target_modules=LINEARS))
    packed = {s.path: s.base_layer.weight.data.clone() for s in model.sites()}
    done = up.replace_lora_weights_loftq(model, weights=llama_dir)
    assert sorted(done) == sorted(packed) and len(done) == 14
    for site in model.sites():
        w, deq = original[site.path + ".weight"], layers.dense_weight(site.base_layer)
        with torch.no_grad():
            fitted = (w - deq - site.deltas["default"].delta_weight()["weight"]).norm()
        s = torch.linalg.svdvals(w - deq)
        torch.testing.assert_close(fitted, s[8:].norm(), rtol=1e-4, atol=0)  # the rank-8 optimum
        assert torch.equal(site.base_layer.weight.data, packed[site.path])  # Q untouched
    # a state dict gives the same A, B; a callback returning False rolls a site back
    other = up.adapt(nf4_llama(llama_dir), up.LoraConfig(r=8, alpha=16, target_modules=LINEARS))
    first = "model.layers.0.self_attn.q_proj"
    keep = other.delta_at("default", first).lora_A.weight.detach().clone()
    done = up.replace_lora_weights_loftq(other, weights=original, callback=lambda m, path: path != first)
    assert first not in done and torch.equal(other.delta_at("default", first).lora_A.weight, keep)
    path = "model.layers.1.mlp.down_proj"
    assert torch.equal(other.delta_at("default", path).lora_B.weight, model.delta_at("default", path).lora_B.weight)


def test_init_loftq_on_a_4bit_base_points_to_replace_lora_weights_loftq(llama_dir):
    base = nf4_llama(llama_dir)
    with pytest.raises(up.ConfigError, match="replace_lora_weights_loftq"):
        up.adapt(base, up.LoraConfig(r=8, target_modules=LINEARS, init="loftq", loftq_config={"loftq_bits": 4}))
    assert not any("base_layer" in n for n, _ in base.named_modules())
    with pytest.raises(up.ConfigError, match="no LoRA on a quantized linear"):
        up.replace_lora_weights_loftq(up.adapt(nn.Sequential(nn.Linear(4, 4)), up.LoraConfig(target_modules=["0"])),
                                      weights={})
