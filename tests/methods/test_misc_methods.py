"""GLoRA, BEFT, AdaMSS and ShadowPEFT beyond PEFT parity: GLoRA against its formula written out (one adapter,
and two adapters adding their updates against the same base), BEFT's default targets and refused merge, ASA
under a real training loop (frozen subspaces stay put; its state restores the masks), and ShadowPEFT's
refusals and gradient checkpointing."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import unipeft as up


def _llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=48,
                                        max_position_embeddings=32)).eval()


def _bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=40, num_labels=3,
                                                    max_position_embeddings=32)).eval()


class Lin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(x)


def _glora_reference(fc: nn.Linear, delta, x: torch.Tensor) -> torch.Tensor:
    """F.linear(x, W + W*A + B, b + b*D + E + W @ C), the paths read off the delta's tensors."""
    w, b = fc.weight, fc.bias
    a = delta.glora_A.Xd @ delta.glora_A.Xu
    bb = delta.glora_B.Xd @ delta.glora_B.Xu
    c = delta.glora_C.X
    return F.linear(x, w + w * a + bb, b + b * delta.glora_D.X + delta.glora_E.X + (w @ c).squeeze(-1))


def test_glora_equals_its_formula_and_two_adapters_add_against_the_base():
    x = torch.randn(3, 6)
    cfg = up.GloraConfig(r=2, config_C="vector", config_D_E="vector", init_weights=False, target_modules=["fc"])
    model = up.adapt(Lin(), cfg, "a")
    model.add_adapter("b", cfg)
    fc = model.base_model.fc.base_layer
    da, db = model.delta_at("a", "fc"), model.delta_at("b", "fc")
    with torch.no_grad():
        base = F.linear(x, fc.weight, fc.bias)
        ref_a, ref_b = _glora_reference(fc, da, x), _glora_reference(fc, db, x)
        assert (ref_a - base).abs().max() > 1e-3
        torch.testing.assert_close(model(x), ref_a, rtol=1e-6, atol=1e-6)
        model.set_adapter(["a", "b"])
        torch.testing.assert_close(model(x), ref_a + ref_b - base, rtol=1e-6, atol=1e-6)
        model.set_adapter("a")
        model.merge()
        torch.testing.assert_close(model(x), ref_a, rtol=1e-5, atol=1e-5)


def test_beft_defaults_to_value_projections_and_refuses_a_merge_without_bias():
    model = up.adapt(_bert(), up.BeftConfig())
    assert sorted(s.path for s in model.sites()) == [f"bert.encoder.layer.{i}.attention.self.value" for i in (0, 1)]
    llama = up.adapt(_llama(), up.BeftConfig(init_weights=False))
    assert sorted(s.path.rsplit(".", 1)[-1] for s in llama.sites()) == ["v_proj"] * 3
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        before = llama(input_ids=ids).logits
    weights = {k: v.clone() for k, v in llama.base_model.state_dict().items()}
    with pytest.raises(up.MergeError, match="model.layers.0.self_attn.v_proj.*no bias"):
        llama.merge()
    assert llama.merged_adapters == []
    assert all(torch.equal(v, weights[k]) for k, v in llama.base_model.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(llama(input_ids=ids).logits, before, rtol=0, atol=0)


def _asa_config(**changes) -> up.AdamssConfig:
    fields = dict(r=8, num_subspaces=3, subspace_rank=2, init_weights=None, use_asa=True, init_warmup=0,
                  final_warmup=6, mask_interval=2, asa_target_subspaces=3,
                  target_modules=["query", "value", "intermediate.dense"])
    return up.AdamssConfig(**{**fields, **changes})


def _train_asa(model, steps: int, hooks=None):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    hooks = hooks or up.TrainingHooks(model, opt, max_steps=steps)
    snapshots = []
    for step in range(steps):
        hooks.step_begin()
        ids = torch.randint(1, 64, (4, 7), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids).logits.pow(2).mean().backward()
        hooks.before_optimizer_step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        hooks.step_end()
        snapshots.append({k: p.detach().clone() for k, p in model.named_parameters() if "adamss" in k})
    return hooks, snapshots


def _frozen(model) -> set[str]:
    return {f"{s.path}.{i}" for s in model.sites() for i, p in enumerate(s.deltas["default"].adamss_A)
            if not p.requires_grad}


def test_asa_freezes_subspaces_during_training_and_its_state_restores_the_masks():
    model = up.adapt(_bert(), _asa_config())
    model.set_adapter("default")
    hooks, snaps = _train_asa(model, 7)
    frozen = _frozen(model)
    total = sum(s.deltas["default"].num_subspaces for s in model.sites())
    assert 0 < len(frozen) < total
    for site in model.sites():  # a subspace frozen by the last mask (step 6) did not move afterwards
        for i, a in enumerate(site.deltas["default"].adamss_A):
            if f"{site.path}.{i}" in frozen:
                key = next(k for k, p in model.named_parameters() if p is a)
                assert torch.equal(snaps[-1][key], a.detach())
    state = hooks.callbacks.state_dict()
    fresh = up.adapt(_bert(), _asa_config())
    fresh.set_adapter("default")
    resumed = up.TrainingHooks(fresh, torch.optim.SGD(fresh.parameters(), lr=0.0), max_steps=1)
    resumed.callbacks.load_state_dict(state)
    resumed.step_begin()  # on_train_begin applies the restored masks
    assert _frozen(fresh) == frozen


@pytest.mark.parametrize("changes,field", [(dict(init_warmup=6, final_warmup=6), "init_warmup"),
                                           (dict(mask_interval=0), "mask_interval"),
                                           (dict(asa_target_subspaces=0), "asa_target_subspaces"),
                                           (dict(asa_schedule_exponent=0.0), "asa_schedule_exponent"),
                                           (dict(init_weights="svd"), "init_weights")])
def test_adamss_bad_asa_schedule_names_the_field(changes, field):
    with pytest.raises(up.ConfigError, match=rf"AdamssConfig\.{field}"):
        _asa_config(**changes)


def test_shadow_refuses_what_it_cannot_do():
    ids = torch.randint(1, 64, (2, 6))
    with pytest.raises(up.TargetError, match="consecutive"):
        up.adapt(_llama(), up.ShadowConfig(r=2, target_modules=["model.layers.0", "model.layers.2"]))
    with pytest.raises(up.TargetError, match="q_proj' is a Linear"):
        up.adapt(_llama(), up.ShadowConfig(r=2, target_modules=["model.layers.0", "q_proj"]))
    # Inside adapted blocks the inner modules are not separate targets: an entry naming one is refused too.
    adapted = up.adapt(_llama(), up.ShadowConfig(r=2))
    with pytest.raises(up.TargetError, match=r"\['q_proj'\] name no decoder block"):
        adapted.add_adapter("second", up.ShadowConfig(r=2, target_modules=["model.layers.0", "q_proj"]))
    assert sorted(adapted.peft_config) == ["default"]
    # Blocks holding another adapter's sites cannot be wrapped (core does not nest sites): refused, unchanged.
    lora = up.adapt(_llama(), up.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(up.TargetError, match="already hold adapted modules"):
        lora.add_adapter("shadow", up.ShadowConfig(r=2))
    assert sorted(lora.peft_config) == ["default"]
    lora.delete_adapter("default")
    with pytest.raises(up.ConfigError, match="task_type.*SEQ_CLS"):
        up.ShadowConfig(task_type="SEQ_CLS")
    with pytest.raises(up.ConfigError, match="shadow_model"):
        up.ShadowConfig(shadow_model="some/hub-id")
    model = up.adapt(_llama(), up.ShadowConfig(r=2, init_weights=False), "a")
    model.add_adapter("b", up.ShadowConfig(r=2, init_weights=False))
    model.set_adapter(["a", "b"])
    with pytest.raises(up.ConfigError, match="exactly one active shadow adapter"):
        model(input_ids=ids)
    model.set_adapter("a")
    with pytest.raises(up.MergeError, match="cannot be merged"):
        model.merge()
    with pytest.raises(up.ConfigError, match="mixed"):
        model(input_ids=ids, adapter_names=["a", "b"])


def test_shadow_gradients_are_the_same_with_gradient_checkpointing():
    """transformers re-runs only the block's forward on recomputation; the injection sits outside it."""
    ids = torch.randint(1, 64, (2, 6))
    grads = []
    for checkpointing in (False, True):
        base = _llama()
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = up.adapt(base, up.ShadowConfig(r=2, init_weights=False, shadow_dropout=0.0))
        model.set_adapter("default")
        model.train()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for key, grad in grads[0].items():
        torch.testing.assert_close(grads[1][key], grad, rtol=1e-5, atol=1e-6, msg=key)


def test_adamss_folder_on_other_base_weights_is_refused_naming_the_module(tmp_path):
    """The clustering comes from the base weights and is not in the file (as in PEFT): other weights give other
    subspace sizes, refused by the shape check before anything is written."""
    cfg = up.AdamssConfig(r=8, num_subspaces=3, subspace_rank=2, target_modules=["query"])
    up.adapt(_bert(0), cfg).save_pretrained(tmp_path)
    other = _bert(3)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(up.AdapterLoadError, match=r"attention\.self\.query: 'adamss_B\.\d' has shape"):
        up.AdaptedModel.from_pretrained(other, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    loaded = up.AdaptedModel.from_pretrained(_bert(0), tmp_path)  # the base it was made on: loads
    assert len(list(loaded.sites())) == 2
