"""LoRA extraction from a full fine-tune: exact at the true rank (unipeft and PEFT), Eckart-Young below it."""
import json
import math

import pytest
import torch
from peft import PeftModel
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import unipeft as up
from unipeft.compress.extract import extract_lora
from unipeft.core.errors import ConfigError

TRUE_RANK = 3


def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def pair():
    """(base, tuned): every linear but lm_head, and the input embedding, moved by an exact rank-3 update."""
    base, tuned = tiny(), tiny()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for path, m in tuned.named_modules():
            if isinstance(m, torch.nn.Linear) and path != "lm_head":
                o, i = m.weight.shape
                m.weight += 0.05 * torch.randn(o, TRUE_RANK, generator=g) @ torch.randn(TRUE_RANK, i, generator=g)
        emb = tuned.model.embed_tokens.weight
        emb += 0.05 * torch.randn(emb.shape[0], TRUE_RANK, generator=g) @ torch.randn(TRUE_RANK, emb.shape[1], generator=g)
    return base, tuned


IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))


def _peft_check(folder, ids):
    """PEFT loads the folder with no missing LoRA key and no unexpected key; its logits for `ids`."""
    model = PeftModel.from_pretrained(tiny(), str(folder))
    result = set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
    assert result.unexpected_keys == []
    assert [k for k in result.missing_keys if "lora_" in k] == []
    with torch.no_grad():
        return model(input_ids=ids).logits


def _up_logits(folder, ids):
    with torch.no_grad():
        return up.AdaptedModel.from_pretrained(tiny(), folder)(input_ids=ids).logits


def test_true_rank_reproduces_the_tuned_model_in_unipeft_and_peft(pair, tmp_path):
    base, tuned = pair
    summary = extract_lora(base, tuned, tmp_path / "x", TRUE_RANK, include_embeddings=True, progress=False)
    with torch.no_grad():
        want = tuned(input_ids=IDS).logits
        assert (base(input_ids=IDS).logits - want).abs().max() > 1e-2  # the task vector matters
    assert (_up_logits(tmp_path / "x", IDS) - want).abs().max() < 1e-5
    assert (_peft_check(tmp_path / "x", IDS) - want).abs().max() < 1e-5
    cfg = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"]) == ("LORA", 3, 3, {})
    assert summary["skipped"] == {"lm_head": "zero task vector"}
    assert summary["changed_not_extracted"] == []
    assert len(summary["layers"]) == 15  # 14 projections + the embedding
    assert all(v["rel_error"] < 1e-6 for v in summary["layers"].values())
    tensors = load_file(str(tmp_path / "x" / "adapter_model.safetensors"))
    assert summary["total_params"] == sum(t.numel() for t in tensors.values())
    assert summary["bytes"] == (tmp_path / "x" / "adapter_model.safetensors").stat().st_size
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (3, 64)
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (32, 3)


def test_lower_rank_error_is_the_eckart_young_optimum(pair, tmp_path):
    base, tuned = pair
    summary = extract_lora(base, tuned, tmp_path / "x", 2, target_modules=["q_proj", "down_proj"], progress=False)
    tensors = load_file(str(tmp_path / "x" / "adapter_model.safetensors"))
    assert sorted(summary["layers"]) == [f"model.layers.{i}.{m}" for i in (0, 1)
                                         for m in ("mlp.down_proj", "self_attn.q_proj")]
    for path, info in summary["layers"].items():
        wb = base.get_submodule(path).weight.detach().double()
        task = tuned.get_submodule(path).weight.detach().double() - wb
        s = torch.linalg.svdvals(task)
        optimum = math.sqrt(float((s[2:] ** 2).sum()))
        a = tensors[f"base_model.model.{path}.lora_A.weight"].double()
        b = tensors[f"base_model.model.{path}.lora_B.weight"].double()
        achieved = float((task - b @ a).norm())
        assert achieved == pytest.approx(optimum, rel=1e-5)
        assert info["fro_error"] == pytest.approx(optimum, rel=1e-5)
        assert info["rel_error"] == pytest.approx(optimum / float(task.norm()), rel=1e-5)
        assert optimum > 1e-3  # the discarded third direction is real
    assert "model.layers.0.self_attn.k_proj.weight" in summary["changed_not_extracted"]


def test_folders_give_the_same_adapter_as_modules(pair, tmp_path):
    base, tuned = pair
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    extract_lora(base, tuned, tmp_path / "m", 2, progress=False)
    summary = extract_lora(tmp_path / "base", str(tmp_path / "tuned"), tmp_path / "f", 2, progress=False)
    a = load_file(str(tmp_path / "m" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "f" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((tmp_path / "f" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tmp_path / "base") and len(summary["layers"]) == 14


def test_min_fro_fraction_lowers_ranks_through_rank_pattern(pair, tmp_path):
    base, tuned = pair
    summary = extract_lora(base, tuned, tmp_path / "x", 8, min_fro_fraction=0.999999, progress=False)
    assert {v["rank"] for v in summary["layers"].values()} == {TRUE_RANK}
    cfg = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and set(cfg["rank_pattern"].values()) == {3} and set(cfg["alpha_pattern"].values()) == {3}
    # The embedding's change is not in this adapter: compare with a tuned copy whose embedding is the base's.
    tuned_no_emb = tiny()
    tuned_no_emb.load_state_dict({**tuned.state_dict(), "model.embed_tokens.weight": base.model.embed_tokens.weight})
    with torch.no_grad():
        want = tuned_no_emb(input_ids=IDS).logits
    assert (_up_logits(tmp_path / "x", IDS) - want).abs().max() < 1e-5
    assert (_peft_check(tmp_path / "x", IDS) - want).abs().max() < 1e-5


@pytest.mark.parametrize("kwargs,match", [({"rank": 0}, "rank must be a positive integer"),
                                          ({"rank": 2, "min_fro_fraction": 1.5}, "min_fro_fraction"),
                                          ({"rank": 2, "target_modules": ["nothing"]}, "selects no Linear")])
def test_bad_arguments_write_nothing(pair, tmp_path, kwargs, match):
    base, tuned = pair
    with pytest.raises(ConfigError, match=match):
        extract_lora(base, tuned, tmp_path / "x", progress=False, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_identical_models_have_nothing_to_extract(pair, tmp_path):
    base, _ = pair
    with pytest.raises(ConfigError, match="zero task vector"):
        extract_lora(base, tiny(), tmp_path / "x", 2, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_gpt2_conv1d_layers_are_extracted_exactly(tmp_path):
    """GPT-2 stores its projections transposed (Conv1D): the folder says fan_in_fan_out and both libraries agree."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4)).eval()

    base, tuned = gpt2(), gpt2()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for path, m in tuned.named_modules():
            if type(m).__name__ == "Conv1D":
                i, o = m.weight.shape
                m.weight += 0.05 * torch.randn(i, 2, generator=g) @ torch.randn(2, o, generator=g)
    summary = extract_lora(base, tuned, tmp_path / "x", 2, progress=False)
    assert len(summary["layers"]) == 8 and summary["skipped"] == {"lm_head": "zero task vector"}
    assert json.loads((tmp_path / "x" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with torch.no_grad():
        want = tuned(input_ids=IDS).logits
        got = up.AdaptedModel.from_pretrained(gpt2(), tmp_path / "x")(input_ids=IDS).logits
        peft_model = PeftModel.from_pretrained(gpt2(), str(tmp_path / "x"))
        result = set_peft_model_state_dict(peft_model, load_file(str(tmp_path / "x" / "adapter_model.safetensors")))
        assert result.unexpected_keys == []
        theirs = peft_model(input_ids=IDS).logits
    assert (got - want).abs().max() < 1e-5 and (theirs - want).abs().max() < 1e-5
