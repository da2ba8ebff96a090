"""QLoRA parity with PEFT on a bitsandbytes-quantized tiny Llama (CPU), and gradient checkpointing.

Both libraries wrap the same quantized layers (loaded from the same safetensors file with the
same BitsAndBytesConfig: identical packed weights) and compute base(x) + s * B(A(x)) with the same
kernels, so outputs are compared exactly (measured max |diff| 0 here); the tolerance 1e-6 only
covers a different summation order. Models stay in training mode with no dropout (an eval-mode
CPU Linear4bit forward repacks its weight into a layout the training path cannot use).
"""
from __future__ import annotations

import pytest
import torch
from transformers import BitsAndBytesConfig, LlamaForCausalLM

import unipeft as up
from unipeft.core import layers
from ._models import save_tiny_llama

pytest.importorskip("bitsandbytes", reason="needs bitsandbytes==0.50.2 (the `test` extra)")
peft = pytest.importorskip("peft")

KINDS = {
    "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32),
    "int8": BitsAndBytesConfig(load_in_8bit=True),
}
TOL = 1e-6
BATCH = {"input_ids": torch.randint(1, 96, (3, 9), generator=torch.Generator().manual_seed(1))}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama"))


def load(path, kind: str) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(path, quantization_config=KINDS[kind], dtype=torch.float32).train()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**BATCH).logits


def packed(model) -> dict[str, torch.Tensor]:
    return {p.replace(".base_layer", ""): m.weight.data.clone() for p, m in model.named_modules()
            if layers.is_quantized(m)}


@pytest.mark.parametrize("kind", KINDS)
def test_peft_qlora_adapter_loads_into_unipeft(kind, llama_dir, tmp_path):
    torch.manual_seed(3)
    pm = peft.get_peft_model(load(llama_dir, kind), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # non-zero B
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    assert sum(isinstance(m, peft.tuners.lora.bnb.Linear4bit if kind == "nf4" else peft.tuners.lora.bnb.Linear8bitLt)
               for m in pm.modules()) == 14
    expected = logits(pm)
    assert (logits(load(llama_dir, kind)) - expected).abs().max() > 1e-3  # the adapter does something
    pm.save_pretrained(tmp_path)
    ours = up.AdaptedModel.from_pretrained(load(llama_dir, kind), tmp_path)
    assert len(list(ours.sites())) == 14
    assert (logits(ours) - expected).abs().max() <= TOL


@pytest.mark.parametrize("kind", KINDS)
def test_unipeft_qlora_adapter_loads_into_peft(kind, llama_dir, tmp_path):
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ours = up.adapt(load(llama_dir, kind), up.LoraConfig(r=4, alpha=8, target_modules=names))
    torch.manual_seed(4)
    with torch.no_grad():
        for d in ours.deltas("default"):
            d.lora_B.weight.normal_(0, 0.1)
    expected = logits(ours)
    base = load(llama_dir, "nf4" if kind == "nf4" else "int8")
    with torch.no_grad():
        assert (base(**BATCH).logits - expected).abs().max() > 1e-3  # the adapter does something
    ours.save_pretrained(tmp_path)
    pm = peft.PeftModel.from_pretrained(base, tmp_path)
    pm.train()
    assert (logits(pm) - expected).abs().max() <= TOL


def _grads(model) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(**BATCH, labels=BATCH["input_ids"]).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_on_a_quantized_base(kind, llama_dir):
    cfg = up.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    plain = up.adapt(load(llama_dir, kind), cfg)
    ckpt_base = load(llama_dir, kind)
    ckpt_base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt = up.adapt(ckpt_base, cfg)
    torch.manual_seed(5)
    with torch.no_grad():  # the same A and (non-zero) B in both
        for a, b in zip(plain.deltas("default"), ckpt.deltas("default")):
            b.lora_A.weight.copy_(a.lora_A.weight)
            b.lora_B.weight.copy_(a.lora_B.weight.normal_(0, 0.1))
    saved = packed(ckpt_base)
    g_plain, g_ckpt = _grads(plain), _grads(ckpt)
    assert g_plain.keys() == g_ckpt.keys() and len(g_plain) == 12
    for n in g_plain:
        assert (g_plain[n] - g_ckpt[n]).abs().max() <= TOL, n
        assert g_plain[n].abs().sum() > 0, n
    opt = torch.optim.AdamW([p for p in ckpt.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        _grads(ckpt)
        opt.step()
    after = packed(ckpt_base)
    assert saved.keys() == after.keys() and all(torch.equal(saved[k], after[k]) for k in saved)
