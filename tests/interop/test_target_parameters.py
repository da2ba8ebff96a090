"""LoRA on bare parameters (LoraConfig.target_parameters) of tiny mixture-of-experts models, against PEFT."""
from __future__ import annotations

import peft
import pytest
import torch
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

import unipeft as up
from unipeft.core.site import AdaptedSite

TOL = {"rtol": 1e-5, "atol": 1e-5}
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def build(kind: str, seed: int = 0):
    """A tiny seeded MoE causal LM: hidden 16, 4 experts (2 per token), 2 layers."""
    torch.manual_seed(seed)
    common = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  num_experts_per_tok=2, max_position_embeddings=32)
    if kind == "mixtral":
        return MixtralForCausalLM(MixtralConfig(intermediate_size=24, num_local_experts=4, **common)).eval()
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(moe_intermediate_size=24, num_experts=4, head_dim=8,
                                              **common)).eval()


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(seed))


def logits(model, seed: int = 1) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids(seed)).logits


def perturb(model, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in model.named_parameters() if "lora_" in n):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


KINDS = pytest.mark.parametrize("kind", ["mixtral", "qwen3moe"])


@KINDS
def test_peft_saved_folder_loads_with_identical_outputs(kind, tmp_path):
    pm = peft.get_peft_model(build(kind), peft.LoraConfig(r=2, lora_alpha=4, target_modules=[],
                                                          target_parameters=EXPERTS)).eval()
    perturb(pm)
    expected = logits(pm)
    assert (expected - logits(build(kind))).abs().max() > 1e-3  # the adapter does something
    pm.save_pretrained(tmp_path)
    ours = up.AdaptedModel.from_pretrained(build(kind), tmp_path)
    torch.testing.assert_close(logits(ours), expected, **TOL)
    # Per-expert layout and nesting order as PEFT's: same tensor under the same key.
    peft_state = load_file(str(tmp_path / "adapter_model.safetensors"))
    ours_state = ours.adapter_state_dict()
    assert ours_state.keys() == peft_state.keys()
    for k in peft_state:
        assert torch.equal(ours_state[k], peft_state[k]), k


@KINDS
def test_peft_loads_ours_with_no_missing_or_unexpected_keys(kind, tmp_path):
    torch.manual_seed(5)
    ours = up.adapt(build(kind), up.LoraConfig(r=2, alpha=4, target_parameters=EXPERTS))
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=0.05)
    for step in range(2):
        opt.zero_grad()
        ours(input_ids=ids(10 + step), labels=ids(10 + step)).loss.backward()
        opt.step()
    ours.eval().save_pretrained(tmp_path)
    assert (logits(ours) - logits(build(kind))).abs().max() > 1e-4  # training changed the output
    pm = peft.PeftModel.from_pretrained(build(kind), tmp_path).eval()
    result = set_peft_model_state_dict(pm, load_file(str(tmp_path / "adapter_model.safetensors")))
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora" in k]
    torch.testing.assert_close(logits(pm), logits(ours), **TOL)


def test_merge_unmerge_unload_and_only_lora_trains():
    base_out = logits(build("mixtral"))
    model = up.adapt(build("mixtral"), up.LoraConfig(r=3, alpha=6, target_parameters=["experts.gate_up_proj"]))
    sites = [s for s in model.sites()]
    assert [s.path for s in sites] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert all(isinstance(s, AdaptedSite) and s.deltas["default"].kind == "weight" for s in sites)
    torch.testing.assert_close(logits(model), base_out, rtol=0, atol=0)  # B = 0: the identity at init
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    perturb(model)
    out = logits(model)
    before = {n: p.detach().clone() for n, p in model.base_model.named_parameters() if ".deltas." not in n}
    model.merge()
    torch.testing.assert_close(logits(model), out, **TOL)
    gate = model.base_model.model.layers[0].mlp.experts.base_layer.gate_up_proj
    assert (gate - before["model.layers.0.mlp.experts.base_layer.gate_up_proj"]).abs().max() > 1e-3
    model.unmerge()
    for n, p in model.base_model.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)
    base = model.unload()
    assert not any(isinstance(m, (AdaptedSite, up.Delta)) for m in base.modules())
    torch.testing.assert_close(logits(base), base_out, rtol=0, atol=1e-6)


def test_merge_and_unload_equals_adapter():
    model = up.adapt(build("mixtral"), up.LoraConfig(r=2, alpha=4, target_parameters=EXPERTS))
    perturb(model)
    out = logits(model)
    torch.testing.assert_close(logits(model.merge_and_unload()), out, **TOL)


def test_two_dimensional_parameter_matches_peft(tmp_path):
    targets = ["self_attn.q_proj.weight"]
    pm = peft.get_peft_model(build("mixtral"), peft.LoraConfig(r=2, lora_alpha=4, target_modules=[],
                                                               target_parameters=targets)).eval()
    perturb(pm)
    pm.save_pretrained(tmp_path)
    ours = up.AdaptedModel.from_pretrained(build("mixtral"), tmp_path)
    torch.testing.assert_close(logits(ours), logits(pm), **TOL)


def test_parameters_next_to_modules():
    model = up.adapt(build("mixtral"), up.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=EXPERTS))
    kinds = {s.path.rsplit(".", 1)[-1]: s.deltas["default"].kind for s in model.sites()}
    assert kinds == {"q_proj": "output", "experts": "weight"}


def test_unknown_parameter_name_is_a_config_error_with_examples():
    model = build("mixtral")
    with pytest.raises(up.ConfigError, match=r"LoraConfig\.target_parameters: 'experts\.gate_proj'.*"
                                             r"model\.layers\.0\.mlp\.experts\.gate_up_proj"):
        up.adapt(model, up.LoraConfig(target_parameters=["experts.gate_up_proj", "experts.gate_proj"]))
    assert not any(isinstance(m, AdaptedSite) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("bad, match", [
    ({"target_parameters": "experts.gate_up_proj"}, "target_parameters: expected a list"),
    ({"target_parameters": EXPERTS, "dropout": 0.1}, r"LoraConfig\.dropout"),
    ({"target_parameters": EXPERTS, "use_dora": True}, "plain LoRA only"),
    ({"target_parameters": ["q_proj.weight"], "target_modules": ["q_proj"]}, "also selected by target_modules"),
])
def test_unsupported_options_are_refused(bad, match):
    with pytest.raises((up.ConfigError, up.TargetError), match=match):
        up.adapt(build("mixtral"), up.LoraConfig(**bad))


def test_loraplus_puts_the_parameter_targets_b_in_its_group():
    from unipeft.core.hooks import method_param_groups
    from unipeft.train.config import OptimizerConfig
    from unipeft.train.optim import param_groups

    model = up.adapt(build("mixtral"), up.LoraPlusConfig(r=2, target_parameters=EXPERTS, loraplus_lr_ratio=8))
    groups = param_groups(model, OptimizerConfig(lr=1e-3), method_param_groups(model))
    b = {id(p) for n, p in model.named_parameters() if ".lora_B." in n}
    assert len(b) == 4  # 2 layers x (gate_up_proj, down_proj)
    assert {id(p) for g in groups if g["lr"] == 8e-3 for p in g["params"]} == b
