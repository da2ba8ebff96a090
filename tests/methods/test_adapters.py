"""Bottleneck adapters (Houlsby, Pfeiffer, parallel, scaled parallel), MAM and SSF: formulas, placement, merge."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

import unipeft as up
from unipeft.methods.adapters import add_mam


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 10)
        self.norm = nn.LayerNorm(10)
        self.fc2 = nn.Linear(10, 4, bias=False)

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


def x_batch() -> torch.Tensor:
    return torch.randn(5, 6, generator=torch.Generator().manual_seed(2))


def _randomise(model, name="default"):
    with torch.no_grad():
        for site in model.sites():
            for p in (site.deltas[name].parameters() if name in site.deltas else []):
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(p.numel()))


@pytest.mark.parametrize("style, sequential, scale", [("houlsby", True, 1.0), ("pfeiffer", True, 1.0),
                                                      ("parallel", False, 1.0), ("scaled_parallel", False, 4.0)])
def test_bottleneck_formula(style, sequential, scale):
    base = Net()
    x = x_batch()
    h_in = base.fc1(x)
    model = up.adapt(base, up.BottleneckConfig(style=style, r=3, target_modules=["fc1"]))
    with torch.no_grad():
        torch.testing.assert_close(model(x), base.fc2(torch.relu(base.norm(h_in))), rtol=0, atol=0)  # identity
    _randomise(model)
    d = model.base_model.fc1.deltas["default"]
    src = h_in if sequential else x
    adapted_h = h_in + scale * d.adapter_up(torch.relu(d.adapter_down(src)))
    with torch.no_grad():
        expected = model.base_model.fc2(torch.relu(model.base_model.norm(adapted_h)))
        torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(up.MergeError, match="cannot be merged"):
        model.merge()


def test_houlsby_and_pfeiffer_placements_on_bert():
    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=24))
    houlsby = up.adapt(bert, up.BottleneckConfig(style="houlsby", r=4, target_modules=["output.dense"]))
    paths = sorted(s.path for s in houlsby.sites())
    assert len(paths) == 4 and sum("attention" in p for p in paths) == 2
    bert = houlsby.unload()
    pfeiffer = up.adapt(bert, up.BottleneckConfig(style="pfeiffer", r=4,
                                                  target_modules=r".*layer\.\d+\.output\.dense"))
    assert sorted(s.path for s in pfeiffer.sites()) == ["bert.encoder.layer.0.output.dense",
                                                        "bert.encoder.layer.1.output.dense"]


@pytest.mark.parametrize("kwargs, match", [({"style": "serial"}, "style"), ({"r": 0}, r"\br\b.*0"),
                                           ({"non_linearity": "elu"}, "non_linearity"),
                                           ({"style": "houlsby", "scaling": 2.0}, "scaling")])
def test_bottleneck_bad_config(kwargs, match):
    with pytest.raises(up.ConfigError, match=match):
        up.BottleneckConfig(target_modules=["fc1"], **kwargs)


def test_mam_is_prefix_plus_scaled_parallel_ffn_adapter(tmp_path):
    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32)).eval()
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_out = gpt(input_ids=ids).logits
    model = add_mam(gpt, "mam", up.PrefixTuningConfig(num_virtual_tokens=3), ffn_targets=["mlp.c_proj"], r=4)
    assert model.active_adapters == ["mam_prefix", "mam_ffn"]
    ffn = [s.deltas["mam_ffn"] for s in model.sites() if "mam_ffn" in s.deltas]
    assert len(ffn) == 2 and all(d.scale == 4.0 and not d.sequential for d in ffn)
    _randomise(model, "mam_ffn")
    with torch.no_grad():
        both = model(input_ids=ids).logits
        model.set_adapter("mam_prefix")
        prefix_only = model(input_ids=ids).logits
    assert (both - prefix_only).abs().max() > 1e-4 and (prefix_only - base_out).abs().max() > 1e-4
    trainable = {n.split(".deltas.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"mam_prefix"}
    model.set_adapter(["mam_prefix", "mam_ffn"])
    model.save_pretrained(tmp_path)
    fresh = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32)).eval()
    fresh.load_state_dict(model.unload().state_dict())
    loaded = up.AdaptedModel.from_pretrained(fresh, tmp_path / "mam_prefix", adapter_name="mam_prefix")
    loaded.load_adapter(tmp_path / "mam_ffn", "mam_ffn")
    loaded.set_adapter(["mam_prefix", "mam_ffn"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, both, rtol=0, atol=0)


def test_mam_failure_leaves_the_base_untouched():
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32))
    with pytest.raises(up.TargetError):
        add_mam(gpt, "mam", up.PrefixTuningConfig(num_virtual_tokens=3), ffn_targets=["no_such_module"])
    assert all(p.requires_grad for p in gpt.parameters())
    assert not any(isinstance(m, up.Delta) for m in gpt.modules())


# ---- SSF -------------------------------------------------------------------------------------
def test_ssf_scales_and_shifts_and_merges_into_weight_and_bias():
    base = Net()
    x = x_batch()
    model = up.adapt(base, up.SSFConfig(target_modules=["fc1", "norm"]))
    with torch.no_grad():
        ref = base.fc2(torch.relu(base.norm(base.fc1(x))))
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    _randomise(model)
    d1, dn = model.base_model.fc1.deltas["default"], model.base_model.norm.deltas["default"]
    with torch.no_grad():
        h = model.base_model.fc1.base_layer(x) * d1.ssf_scale + d1.ssf_shift
        h = model.base_model.norm.base_layer(h) * dn.ssf_scale + dn.ssf_shift
        expected = model.base_model.fc2(torch.relu(h))
        torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-5)


def test_ssf_refuses_a_layer_without_bias():
    with pytest.raises(up.TargetError, match="fc2"):
        up.adapt(Net(), up.SSFConfig(target_modules=["fc2"]))
