"""AdapterHub methods PEFT lacks (Compacter/Compacter++, LoReFT/NoReFT/DiReFT, Adapter+, UniPELT): each
checked against an independent computation of its paper's formula, plus placement, save/load and errors.

AdapterHub's `adapters` package cannot be installed next to this transformers, so the references are
written here from the formulas (Kronecker sums with torch.kron, explicit position loops)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import unipeft as up
from unipeft.methods.adapterhub.reft import TransformerBlock


class Net(nn.Module):
    """Linear(8 -> 16) -> LayerNorm -> ReLU -> Linear(16 -> 4), on (B, T, 8) or (B, 8) inputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x))))

    def head(self, h):
        """The model after fc1, for references built from fc1's output."""
        return self.fc2(torch.relu(self.norm(h)))

    def tail(self, h):
        """The model after norm, for references built from norm's output."""
        return self.fc2(torch.relu(h))


FFN_OUTPUTS = ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"]


def seq_batch(t: int = 6) -> torch.Tensor:
    return torch.randn(3, t, 8, generator=torch.Generator().manual_seed(5))


def randomise(model, name="default", std=0.5):
    with torch.no_grad():
        for site in model.sites():
            for p in site.deltas[name].parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel() + 7)) * std)
        if name in model.banks:
            for p in model.banks[name].parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * std)


def bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=24)).eval()


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=1, intermediate_size=24)).eval()


def ids():
    return torch.randint(1, 50, (3, 7), generator=torch.Generator().manual_seed(4))


def round_trip(model, base, tmp_path, inputs):
    out = model(**inputs)
    out = out.logits if hasattr(out, "logits") else out
    model.save_pretrained(tmp_path)
    loaded = up.AdaptedModel.from_pretrained(base, tmp_path)
    got = loaded(**inputs)
    got = got.logits if hasattr(got, "logits") else got
    torch.testing.assert_close(got, out, rtol=0, atol=0)
    return loaded


# ---- Compacter ------------------------------------------------------------------------------
def phm_reference(layer, rule: torch.Tensor) -> torch.Tensor:
    """sum_i kron(A_i, B_i) with B_i = W_left_i W_right_i (or W_i): the (in, out) PHM matrix."""
    b = layer.W_left @ layer.W_right if layer.factorized else layer.W
    return sum(torch.kron(rule[i], b[i]) for i in range(rule.shape[0]))


@pytest.mark.parametrize("shared, fact_rule, fact_w", [(True, False, True), (False, True, False),
                                                       (True, True, True), (False, False, False)])
def test_compacter_is_h_plus_phm_bottleneck(shared, fact_rule, fact_w):
    base = Net()
    x = seq_batch()
    h = base.fc1(x)
    model = up.adapt(base, up.CompacterConfig(target_modules=["fc1"], reduction_factor=4, phm_dim=2, phm_rank=2,
                                              shared_phm_rule=shared, factorized_phm_rule=fact_rule,
                                              factorized_phm_W=fact_w))
    with torch.no_grad():
        torch.testing.assert_close(model(x=x), base.head(h), rtol=0, atol=0)  # up's last factor is zero
    randomise(model)
    d = model.base_model.fc1.deltas["default"]
    if shared:
        holder = model.banks["default"]
        assert not hasattr(d.adapter_down, "rules")
    else:
        holder = d.adapter_down.rules
        assert "default" not in model.banks and d.adapter_up.rules is not d.adapter_down.rules
    left, right = (holder.phm_rule_left, holder.phm_rule_right) if fact_rule else (None, None)
    rule = left @ right if fact_rule else holder.phm_rule
    up_rule = rule if shared else d.adapter_up.rules.rule()
    w_down, w_up = phm_reference(d.adapter_down, rule), phm_reference(d.adapter_up, up_rule)
    assert w_down.shape == (16, 4) and w_up.shape == (4, 16)
    expected_h = h + (F.gelu(h @ w_down + d.adapter_down.b) @ w_up + d.adapter_up.b)
    with torch.no_grad():
        torch.testing.assert_close(model(x=x), base.head(expected_h), rtol=1e-5, atol=1e-6)
    with pytest.raises(up.MergeError, match="cannot be merged"):
        model.merge()


def test_compacter_placements_share_one_rule_and_count_parameters():
    hou = up.adapt(bert(), up.CompacterConfig(reduction_factor=4, phm_dim=4))
    paths = sorted(s.path for s in hou.sites())
    assert paths == [f"bert.encoder.layer.{i}.{p}" for i in (0, 1) for p in ("attention.output.dense", "output.dense")]
    # per site: down W_left (4, 4, 1) + W_right (4, 1, 1) + b (4); up W_left (4, 1, 1) + W_right (4, 1, 4) + b (16)
    per_site = 16 + 4 + 4 + 4 + 16 + 16
    assert up.trainable_report(hou).trainable == 4 * per_site + 4 ** 3  # one shared (4, 4, 4) rule
    pp = up.adapt(bert(), up.CompacterPlusPlusConfig(reduction_factor=4, phm_dim=4))
    assert sorted(s.path for s in pp.sites()) == FFN_OUTPUTS


def test_compacter_save_load_with_fixed_rules(tmp_path):
    cfg = up.CompacterPlusPlusConfig(reduction_factor=4, phm_dim=2, learn_phm=False, init_weights="bert")
    model = up.adapt(bert(), cfg)
    assert not model.banks["default"].phm_rule.requires_grad  # a buffer: saved, never trained
    assert not all(d.identity_at_init for d in model.deltas("default"))
    loaded = round_trip(model, bert(), tmp_path, {"input_ids": ids()})
    assert isinstance(loaded.peft_config["default"], up.CompacterPlusPlusConfig)
    torch.testing.assert_close(loaded.banks["default"].phm_rule, model.banks["default"].phm_rule, rtol=0, atol=0)


def test_compacter_inits_follow_adapterhub():
    """Shared rules N(0, phm_init_range) (uniform: U(-1, 1)); a layer's own rules N(0, 0.01); Glorot B."""
    torch.manual_seed(0)
    shared = up.adapt(bert(), up.CompacterConfig(reduction_factor=2, phm_dim=4, init_weights="bert"))
    assert 5e-5 < shared.banks["default"].phm_rule.std() < 2e-4
    own = up.adapt(bert(), up.CompacterConfig(reduction_factor=2, phm_dim=4, shared_phm_rule=False,
                                              phm_c_init="uniform", factorized_phm_W=False))
    d = own.deltas("default")[0]
    assert d.adapter_down.rules.phm_rule.abs().max() <= 0.01 and d.adapter_down.rules.phm_rule.abs().max() > 0.005
    bound = (6 / (4 + 2)) ** 0.5  # xavier_uniform of each (16/4, 8/4) = (4, 2) block
    assert d.adapter_down.W.abs().max() <= bound and d.adapter_down.W.abs().max() > bound / 2
    assert not d.adapter_up.W.any()  # init_weights="identity": the up projection's factor is zero


@pytest.mark.parametrize("kwargs, error, match", [
    ({"phm_dim": 3}, up.TargetError, "phm_dim=3 must divide"),
    ({"reduction_factor": 32}, up.TargetError, "leaves no bottleneck"),
    ({"reduction_factor": 0}, up.ConfigError, "reduction_factor: expected a positive number"),
    ({"shared_W_phm": True}, up.ConfigError, "shared_W_phm=True is not supported"),
    ({"phm_c_init": "xavier"}, up.ConfigError, "phm_c_init"),
    ({"factorized_phm_rule": 1}, up.ConfigError, "factorized_phm_rule: expected True or False"),
    ({"hypercomplex_nonlinearity": "relu"}, up.ConfigError, "hypercomplex_nonlinearity"),
])
def test_compacter_bad_configs(kwargs, error, match):
    with pytest.raises(error, match=match):
        up.adapt(Net(), up.CompacterConfig(target_modules=["fc1"], **{"reduction_factor": 4, **kwargs}))


# ---- ReFT -----------------------------------------------------------------------------------
def reft_reference(h, unit, orth, subtract):
    """h + R^T (W h + b - R h) (without the subtraction for DiReFT), R = the unit's projection rows."""
    r_mat = unit.projection.weight
    if orth:
        torch.testing.assert_close(r_mat @ r_mat.T, torch.eye(r_mat.shape[0]), rtol=0, atol=1e-5)
    source = h @ unit.learned_source.weight.T + unit.learned_source.bias
    if subtract:
        source = source - h @ r_mat.T
    return h + source @ r_mat


@pytest.mark.parametrize("cls, orth, subtract", [(up.LoReftConfig, True, True), (up.NoReftConfig, False, True),
                                                 (up.DiReftConfig, False, False)])
@pytest.mark.parametrize("tied", [False, True])
def test_reft_edits_prefix_and_suffix_positions_only(cls, orth, subtract, tied):
    base = Net()
    x = seq_batch(6)
    h = base.norm(base.fc1(x))
    model = up.adapt(base, cls(target_modules=["norm"], r=3, prefix_positions=2, suffix_positions=1,
                               tied_weights=tied, dropout=0.0))
    d = model.base_model.norm.deltas["default"]
    assert len(d.units) == (1 if tied else 2)
    assert (cls().orthogonality, cls().subtract_projection) == (orth, subtract)
    if not orth:
        randomise(model)
    pref, suff = (d.units[0], d.units[0]) if tied else tuple(d.units)
    expected = h.clone()
    with torch.no_grad():
        for t in (0, 1):
            expected[:, t] = reft_reference(h[:, t], pref, orth, subtract)
        expected[:, 5] = reft_reference(h[:, 5], suff, orth, subtract)
        torch.testing.assert_close(model(x=x), base.tail(expected), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(x=x)[:, 2:5], base.tail(h)[:, 2:5], rtol=0, atol=0)  # untouched
        assert (model(x=x)[:, :2] - base.tail(h)[:, :2]).abs().max() > 1e-3
    with pytest.raises(up.MergeError):
        model.merge()


def test_reft_overlapping_positions_and_2d_outputs():
    """Sequences shorter than prefix + suffix: both read the original states, the suffix is written last;
    a (B, d) output is one position."""
    base = Net()
    x = seq_batch(2)
    h = base.norm(base.fc1(x))
    model = up.adapt(base, up.NoReftConfig(target_modules=["norm"], r=2, prefix_positions=2, suffix_positions=1,
                                           dropout=0.0))
    randomise(model)
    pref, suff = model.base_model.norm.deltas["default"].units
    with torch.no_grad():
        expected = torch.stack([reft_reference(h[:, 0], pref, False, True),
                                reft_reference(h[:, 1], suff, False, True)], 1)
        torch.testing.assert_close(model(x=x), base.tail(expected), rtol=1e-5, atol=1e-6)
        flat = x[:, 0]
        h_flat = base.norm.base_layer(base.fc1(flat))
        torch.testing.assert_close(model(x=flat), base.tail(reft_reference(h_flat, suff, False, True)),
                                   rtol=1e-5, atol=1e-6)


def test_loreft_on_llama_blocks_equals_hooked_reference(tmp_path):
    model = up.adapt(llama(), up.LoReftConfig(layers=[1], r=2, prefix_positions=1, suffix_positions=2, dropout=0.0))
    assert [s.path for s in model.sites()] == ["model.layers.1"]
    assert isinstance(model.base_model.model.layers[1].base_layer, TransformerBlock)
    assert model.peft_config["default"].hidden_size == 16
    pref, suff = model.base_model.model.layers[1].deltas["default"].units
    reference = llama()

    def hook(module, args, out):
        new = out.clone()
        new[:, :1] = reft_reference(out[:, :1], pref, True, True)
        new[:, -2:] = reft_reference(out[:, -2:], suff, True, True)
        return new

    reference.model.layers[1].register_forward_hook(hook)
    batch = {"input_ids": ids()}
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=1e-5, atol=1e-5)
    loaded = round_trip(model, llama(), tmp_path, batch)
    assert loaded.peft_config["default"].layers == [1]


def test_reft_default_sites_are_every_block():
    model = up.adapt(bert(), up.DiReftConfig())
    assert [s.path for s in model.sites()] == ["bert.encoder.layer.0", "bert.encoder.layer.1"]


@pytest.mark.parametrize("kwargs, error, match", [
    ({"prefix_positions": 0, "suffix_positions": 0}, up.ConfigError, "both 0"),
    ({"layers": [0], "target_modules": ["norm"]}, up.ConfigError, "give one of them"),
    ({"layers": [-1]}, up.ConfigError, "layers: expected 'all' or a non-empty list"),
    ({"layers": "some"}, up.ConfigError, "layers: expected"),
    ({"r": 17}, up.TargetError, "r=17 exceeds the width 16"),
    ({"non_linearity": "softmax"}, up.ConfigError, "non_linearity"),
    ({"dropout": 1.0}, up.ConfigError, "dropout"),
])
def test_reft_bad_configs(kwargs, error, match):
    with pytest.raises(error, match=match):
        up.adapt(Net(), up.LoReftConfig(**{"target_modules": ["norm"], **kwargs}))


# ---- Adapter+ -------------------------------------------------------------------------------
def test_adapterplus_init_formula_and_stochastic_depth():
    base = Net().eval()
    x = seq_batch()
    h = base.fc1(x)
    model = up.adapt(base, up.AdapterPlusConfig(target_modules=["fc1"], reduction_factor=4, stochastic_depth=0.5))
    d = model.base_model.fc1.deltas["default"]
    for lin in (d.adapter_down, d.adapter_up):  # Houlsby init
        assert lin.weight.abs().max() <= 0.02 and 0.004 < lin.weight.std() < 0.02 and not lin.bias.any()
    assert torch.equal(d.scaling, torch.ones(16))
    randomise(model)
    branch = d.scaling * (F.gelu(h @ d.adapter_down.weight.T + d.adapter_down.bias) @ d.adapter_up.weight.T
                          + d.adapter_up.bias)
    with torch.no_grad():
        torch.testing.assert_close(model(x=x), base.head(h + branch), rtol=1e-5, atol=1e-6)  # eval: no drop
        model.train()
        torch.manual_seed(0)
        out = model(x=x)
    for row in range(3):  # each example keeps the whole branch (scaled by 1/(1-p)) or drops it
        kept = torch.allclose(out[row], base.head(h + 2 * branch)[row], atol=1e-5)
        dropped = torch.allclose(out[row], base.head(h)[row], atol=1e-6)
        assert kept != dropped


def test_adapterplus_placement_identity_option_and_round_trip(tmp_path):
    model = up.adapt(bert(), up.AdapterPlusConfig(reduction_factor=4, stochastic_depth=0.0, init_weights="identity"))
    assert sorted(s.path for s in model.sites()) == FFN_OUTPUTS
    batch = {"input_ids": ids()}
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, bert()(**batch).logits, rtol=0, atol=0)
    randomise(model)
    round_trip(model, bert(), tmp_path, batch)


@pytest.mark.parametrize("kwargs, match", [({"scaling": "row"}, "scaling"), ({"scaling": 0}, "non-zero"),
                                           ({"stochastic_depth": 1.0}, "stochastic_depth"),
                                           ({"reduction_factor": -2}, "reduction_factor"),
                                           ({"init_weights": "bert"}, "init_weights")])
def test_adapterplus_bad_configs(kwargs, match):
    with pytest.raises(up.ConfigError, match=match):
        up.AdapterPlusConfig(target_modules=["fc1"], **kwargs)


# ---- UniPELT --------------------------------------------------------------------------------
def gate_reference(gate, h):
    g = torch.sigmoid(h @ gate.weight.T + gate.bias)  # (B, T, 1)
    return g.mean(dim=1, keepdim=True)


def test_unipelt_gated_lora_and_gated_adapter_formulas():
    base = Net()
    x = seq_batch()
    plain = base(x)
    cfg = up.UniPELTConfig(target_modules=["fc1", "fc2"], adapter_modules=["fc1"], r=2, reduction_factor=4)
    model = up.adapt(base, cfg)
    ada, lora = model.base_model.fc1.deltas["default"], model.base_model.fc2.deltas["default"]
    assert type(ada).__name__ == "GatedAdapterDelta" and type(lora).__name__ == "GatedLoraDelta"
    with torch.no_grad():
        torch.testing.assert_close(model(x=x), plain, rtol=0, atol=0)
    randomise(model)
    with torch.no_grad():
        h = base.fc1.base_layer(x)
        h = h + gate_reference(ada.gate, h) * (torch.relu(h @ ada.adapter_down.weight.T + ada.adapter_down.bias)
                                               @ ada.adapter_up.weight.T + ada.adapter_up.bias)
        z = torch.relu(base.norm(h))
        expected = base.fc2.base_layer(z) + gate_reference(lora.gate, z) * (z @ lora.lora_A.T @ lora.lora_B.T)
        torch.testing.assert_close(model(x=x), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(up.MergeError):
        model.merge()


def test_unipelt_default_roles_on_bert_and_round_trip(tmp_path):
    model = up.adapt(bert(), up.UniPELTConfig(r=2, reduction_factor=4))
    roles = {s.path.split("layer.0.")[-1]: type(s.deltas["default"]).__name__
             for s in model.sites() if "layer.0." in s.path}
    assert roles == {"attention.self.query": "GatedLoraDelta", "attention.self.value": "GatedLoraDelta",
                     "output.dense": "GatedAdapterDelta"}
    randomise(model, std=0.3)
    loaded = round_trip(model, bert(), tmp_path, {"input_ids": ids()})
    assert not any(p.requires_grad for d in loaded.deltas("default") for p in d.parameters())
    bert_init = up.adapt(bert(), up.UniPELTConfig(r=2, reduction_factor=4, init_weights="bert"))
    assert not all(d.identity_at_init for d in bert_init.deltas("default"))


def test_unipelt_with_ungated_prefix_as_second_active_adapter():
    """unipeft's (ungated) prefix tuning as a second active adapter beside UniPELT (UniPELT's own gated prefix,
    `prefix_length`, is tested in test_unipelt_prefix.py)."""
    model = up.adapt(bert(), up.UniPELTConfig(r=2, reduction_factor=4))
    randomise(model, std=0.3)
    batch = {"input_ids": ids(), "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    with torch.no_grad():
        alone = model(**batch).logits
    model.add_adapter("prefix", up.PrefixTuningConfig(num_virtual_tokens=4, task_type="SEQ_CLS"))
    model.set_adapter(["default", "prefix"])
    with torch.no_grad():
        both = model(**batch).logits
    assert (both - alone).abs().max() > 1e-4
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    gated = {id(p) for d in model.deltas("default") for p in d.parameters()}
    assert gated < trainable and len(trainable) > len(gated)


@pytest.mark.parametrize("kwargs, match", [({"reduction_factor": 0}, "reduction_factor"), ({"r": 0}, r"\br\b"),
                                           ({"non_linearity": "elu"}, "non_linearity"),
                                           ({"adapter_modules": 3}, "adapter_modules")])
def test_unipelt_bad_configs(kwargs, match):
    with pytest.raises(up.ConfigError, match=match):
        up.UniPELTConfig(**kwargs)


def test_capabilities_are_declared_honestly():
    rows = {r["method"]: r for r in up.capability_table()}
    for name in ("compacter", "compacter_pp", "loreft", "noreft", "direft", "adapterplus", "unipelt"):
        assert not rows[name]["mergeable"] and not rows[name]["peft_compatible"] and rows[name]["mixed_batch"]
    assert not rows["loreft"]["identity_at_init"] and not rows["adapterplus"]["identity_at_init"]
    assert rows["compacter"]["identity_at_init"] and rows["unipelt"]["identity_at_init"]
