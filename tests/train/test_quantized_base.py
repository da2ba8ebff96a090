"""Quantized bases in runs: the `quantization` config section, the streamed loader (same packed
weights as transformers' from_pretrained), and training after an eval-mode forward."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("bitsandbytes")

import unipeft as up  # noqa: E402
from unipeft.core.errors import ConfigError  # noqa: E402
from unipeft.train.config import config_from_dict  # noqa: E402
from unipeft.train.quantize import QuantizationConfig, load_quantized, read_tensors  # noqa: E402

SPECS = {"nf4-dq": QuantizationConfig(bits=4), "fp4": QuantizationConfig(bits=4, type="fp4", double_quant=False),
         "int8": QuantizationConfig(bits=8, double_quant=True)}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    return path


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))


def test_read_tensors_equals_safetensors(llama_dir):
    from safetensors.torch import load_file

    ref = load_file(str(llama_dir / "model.safetensors"))
    got = dict(read_tensors(llama_dir / "model.safetensors"))
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)


@pytest.mark.parametrize("spec", list(SPECS))
def test_streamed_loader_packs_like_from_pretrained(llama_dir, spec):
    from transformers import AutoModelForCausalLM

    q = SPECS[spec]
    ours = load_quantized(llama_dir, AutoModelForCausalLM, q)
    ref = AutoModelForCausalLM.from_pretrained(str(llama_dir), quantization_config=q.bnb_config()).eval()
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    kind = "Linear8bitLt" if q.bits == 8 else "Linear4bit"
    assert type(ours.model.layers[0].mlp.down_proj).__name__ == kind
    flag = "is_loaded_in_4bit" if q.bits == 4 else "is_loaded_in_8bit"
    assert getattr(ours, flag) is True and getattr(ref, flag) is True
    assert ours.config.quantization_config.quant_method == "bitsandbytes"
    with torch.no_grad():
        assert torch.equal(ours(_ids()).logits, ref(_ids()).logits)


def test_lora_gradients_survive_an_eval_forward(llama_dir):
    """An eval-mode no-grad forward must not switch 4-bit layers to a kernel without backward."""
    from transformers import AutoModelForCausalLM

    def grads(eval_first: bool) -> dict[str, torch.Tensor]:
        base = load_quantized(llama_dir, AutoModelForCausalLM, QuantizationConfig(bits=4))
        torch.manual_seed(3)
        model = up.adapt(base, up.LoraConfig(r=4, target_modules=["q_proj"], init="gaussian"))
        for d in model.deltas("default"):
            torch.nn.init.normal_(d.lora_B.weight, std=0.1)
        if eval_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=_ids(5))
        model.train()
        ids = _ids()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, after_eval = grads(False), grads(True)
    assert plain.keys() == after_eval.keys() and len(plain) == 6
    first = [n for n in plain if "layers.0." in n]
    assert first and all(plain[n].abs().max() > 0 for n in first)  # gradients reach the first layer
    for name in plain:  # through every frozen 4-bit layer above it, eval forward or not
        assert torch.equal(plain[name], after_eval[name]), name


def test_run_config_quantization_section():
    cfg = config_from_dict({"model": "smollm2", "task": "causal_lm", "data": {"source": "wordnet"},
                            "quantization": {"bits": 4, "type": "nf4", "double_quant": True}})
    bnb = cfg.quantization.bnb_config()
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
    assert bnb.bnb_4bit_compute_dtype == torch.float32
    assert config_from_dict({"quantization": {"bits": 8}, "task": "causal_lm", "model": "smollm2",
                             "data": {"source": "wordnet"}}).quantization.bnb_config().load_in_8bit


@pytest.mark.parametrize("section, field", [
    ({"bits": 3}, "quantization.bits"),
    ({"bits": 4, "type": "int4"}, "quantization.type"),
    ({"bits": 8, "type": "fp4"}, "quantization.type"),
    ({"bits": 4, "compute_dtype": "float16"}, "quantization.compute_dtype"),
])
def test_bad_quantization_specs_name_the_field(section, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        config_from_dict({"model": "smollm2", "task": "causal_lm", "data": {"source": "wordnet"},
                          "quantization": section})


def test_quantization_needs_a_causal_lm():
    with pytest.raises(ConfigError, match="quantization: a quantized base"):
        config_from_dict({"quantization": {"bits": 4}})


def test_loader_refuses_a_folder_without_safetensors(tmp_path, llama_dir):
    from transformers import AutoModelForCausalLM

    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    with pytest.raises(ConfigError, match="no \\*.safetensors"):
        load_quantized(tmp_path, AutoModelForCausalLM, QuantizationConfig(bits=4))


def test_adapting_does_not_change_the_packed_weights(llama_dir):
    from transformers import AutoModelForCausalLM

    base = load_quantized(llama_dir, AutoModelForCausalLM, QuantizationConfig(bits=4))
    before = copy.deepcopy(base.state_dict())
    model = up.adapt(base, up.LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        model(input_ids=_ids())
    after = model.unload().state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
