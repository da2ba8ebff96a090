"""HiRA, SuperTuning and WaveFT beyond PEFT parity: the math of each update, mixed batches against one forward per
adapter, refused inputs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import unipeft as up
from unipeft.core.site import BASE_NAME

from ..interop._models import build, inputs, output


def _linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 6)).eval()


def _mixed_equals_per_adapter(model: up.AdaptedModel, batch: dict, rows: list[str]) -> None:
    """Row i of a mixed call equals row i of a forward with adapter rows[i] alone (or with none)."""
    expected = {}
    with torch.no_grad():
        for name in {r for r in rows if r != BASE_NAME}:
            model.set_adapter(name)
            expected[name] = output(model, batch)
        with model.disable_adapters():
            expected[BASE_NAME] = output(model, batch)
        mixed = model(**batch, adapter_names=rows)
    mixed = mixed if torch.is_tensor(mixed) else mixed.logits
    assert (expected["a"] - expected["b"]).abs().max() > 1e-4
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], expected[name][i], atol=1e-5, rtol=1e-5)


# ---- HiRA ------------------------------------------------------------------------------------
def test_hira_update_is_w0_times_low_rank_and_has_high_rank():
    model = up.adapt(_linear(), up.HiraConfig(r=1, init_weights=False, target_modules=["0"]))
    delta = model.deltas("default")[0]
    w0 = delta.base.weight.detach().clone()
    dw = delta.delta_weight()["weight"].detach()
    torch.testing.assert_close(dw, w0 * (delta.hira_B @ delta.hira_A).detach(), rtol=0, atol=0)
    assert torch.linalg.matrix_rank(dw) == 6  # rank-1 factors, full-rank update
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), x @ (w0 + dw).T + delta.base.bias, atol=1e-6, rtol=1e-6)


def test_hira_stacked_adapters_add_their_updates_of_the_same_base_weight():
    model = up.adapt(_linear(), up.HiraConfig(r=2, init_weights=False, target_modules=["0"]), "a")
    model.add_adapter("b", up.HiraConfig(r=3, init_weights=False, target_modules=["0"]))
    da, db = model.deltas("a")[0], model.deltas("b")[0]
    w0, bias = da.base.weight.detach().clone(), da.base.bias.detach()
    model.set_adapter(["a", "b"])
    x = torch.randn(4, 8)
    with torch.no_grad():
        both = w0 + w0 * (da.hira_B @ da.hira_A) + w0 * (db.hira_B @ db.hira_A)
        torch.testing.assert_close(model(x), x @ both.T + bias, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind,targets", [("bert", ["word_embeddings", "query", "intermediate.dense"]),
                                          ("conv", ["conv1", "conv2", "head"]),
                                          ("gpt2", ["c_attn", "c_fc"])])
def test_hira_mixed_batch_equals_one_forward_per_adapter(kind, targets):
    torch.manual_seed(3)
    model = up.adapt(build(kind), up.HiraConfig(r=2, init_weights=False, target_modules=targets), "a")
    model.add_adapter("b", up.HiraConfig(r=3, init_weights=False, target_modules=targets))
    model.eval()
    _mixed_equals_per_adapter(model, inputs(kind, seed=5), ["b", "a", BASE_NAME, "a"])


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_hira_default_inits_are_the_identity_and_random_init_is_not(init):
    kind, targets = "bert", ["word_embeddings", "query"]
    batch = inputs(kind)
    with torch.no_grad():
        base = output(build(kind), batch)
        same = output(up.adapt(build(kind), up.HiraConfig(r=2, init_weights=init, target_modules=targets)), batch)
        moved = output(up.adapt(build(kind), up.HiraConfig(r=2, init_weights=False, target_modules=targets)), batch)
    torch.testing.assert_close(same, base, rtol=0, atol=0)
    assert (moved - base).abs().max() > 1e-3


def test_hira_rank_pattern_is_refused_since_peft_builds_every_layer_with_r():
    with pytest.raises(up.ConfigError, match="rank_pattern"):
        up.AdapterConfig.from_dict({"peft_type": "HIRA", "r": 2, "rank_pattern": {"value": 4},
                                    "target_modules": ["value"]})
    from unipeft import compat
    with pytest.raises(up.ConfigError, match="rank_pattern"):
        compat.HiraConfig(r=2, rank_pattern={"value": 4}, target_modules=["value"])
    assert compat.HiraConfig(r=2, rank_pattern={}, target_modules=["value"]).r == 2


def test_hira_conv3d_matches_peft_both_ways(tmp_path):
    import peft

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv3d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv3d(3, 2, (1, 2, 2))).eval()
    x = torch.randn(2, 2, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    pm = peft.get_peft_model(net(), peft.HiraConfig(r=2, init_weights=False, target_modules=["0", "2"])).eval()
    pm.save_pretrained(tmp_path / "peft")
    ours = up.AdaptedModel.from_pretrained(net(), tmp_path / "peft").eval()
    with torch.no_grad():
        expected = pm(x)
        assert (expected - net()(x)).abs().max() > 1e-3
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
        ours.save_pretrained(tmp_path / "ours")
        back = peft.PeftModel.from_pretrained(net(), tmp_path / "ours").eval()
        torch.testing.assert_close(back(x), expected, atol=1e-5, rtol=1e-5)
        merged_peft, merged_ours = pm.merge_and_unload().state_dict(), ours.merge_and_unload().state_dict()
    for key, value in merged_peft.items():
        torch.testing.assert_close(merged_ours[key], value, atol=1e-5, rtol=1e-5)


def test_hira_grouped_conv_is_refused():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(up.TargetError, match="groups=2"):
        up.adapt(model, up.HiraConfig(r=2, target_modules=["0"]))
    assert not any(isinstance(m, up.Delta) for m in model.modules())


# ---- SuperTuning -------------------------------------------------------------------------------
@pytest.mark.parametrize("top", [True, False])
def test_supertuning_support_is_the_top_or_bottom_magnitudes_and_only_it_changes(top):
    model = up.adapt(_linear(), up.SupertuningConfig(sparsity=0.75, select_top=top, init_weights=False,
                                                     target_modules=["0"]))
    delta = model.deltas("default")[0]
    w0 = delta.base.weight.detach().clone()
    k = int(48 * 0.25)
    idx = delta.supertuning_indices.long()
    assert idx.numel() == k == delta.supertuning_values.numel() and idx.unique().numel() == k
    order = w0.abs().flatten().argsort(descending=top)
    assert set(idx.tolist()) == set(order[:k].tolist())
    dw = delta.delta_weight()["weight"].detach().flatten()
    assert torch.equal(dw[idx], delta.supertuning_values.detach())
    assert dw.count_nonzero() == k
    model.merge()
    changed = (delta.base.weight.detach() - w0).flatten().ne(0).nonzero().flatten()
    assert set(changed.tolist()) == set(idx.tolist())


def test_supertuning_supra_adds_scaled_lora_with_alpha_defaulting_to_2r():
    model = up.adapt(_linear(), up.SupertuningConfig(sparsity=0.9, r=2, init_weights=False, target_modules=["0"]))
    delta = model.deltas("default")[0]
    a, b = delta.supertuning_lora_A.weight.detach(), delta.supertuning_lora_B.weight.detach()
    assert delta.scaling == 2.0
    expected = delta.sparse_matrix().detach() + 2.0 * b @ a
    torch.testing.assert_close(delta.delta_weight()["weight"].detach(), expected, rtol=0, atol=0)
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), x @ (delta.base.weight + expected).T + delta.base.bias,
                                   atol=1e-6, rtol=1e-6)


def test_supertuning_without_saved_indices_reselects_them_from_the_base(tmp_path):
    from safetensors.torch import load_file
    cfg = up.SupertuningConfig(sparsity=0.8, init_weights=False, save_precomputed_indices=False, target_modules=["0"])
    model = up.adapt(_linear(0), cfg)
    model.save_pretrained(tmp_path)
    assert set(load_file(str(tmp_path / "adapter_model.safetensors"))) == {"base_model.model.0.supertuning_values"}
    x = torch.randn(3, 8)
    same = up.AdaptedModel.from_pretrained(_linear(0), tmp_path).eval()
    other = up.AdaptedModel.from_pretrained(_linear(1), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(same(x), model(x), rtol=0, atol=0)
    reselected = other.deltas("default")[0].supertuning_indices
    assert not torch.equal(reselected, model.deltas("default")[0].supertuning_indices)


def test_supertuning_bad_fields_and_files_are_refused(tmp_path):
    with pytest.raises(up.ConfigError, match="SupertuningConfig.lora_alpha"):
        up.SupertuningConfig(lora_alpha=4.0, target_modules=["0"])
    with pytest.raises(up.ConfigError, match="SupertuningConfig.sparsity"):
        up.SupertuningConfig(sparsity=1.0, target_modules=["0"])
    with pytest.raises(up.ConfigError, match="SupertuningConfig.r"):
        up.SupertuningConfig(r=0, target_modules=["0"])
    with pytest.raises(up.ConfigError, match=r"SupertuningConfig.sparsity.*'0'.*8x6|SupertuningConfig.sparsity.*6x8"):
        up.adapt(_linear(), up.SupertuningConfig(sparsity=0.99, target_modules=["0"]))
    from safetensors.torch import load_file, save_file
    up.adapt(_linear(), up.SupertuningConfig(sparsity=0.5, target_modules=["0"])).save_pretrained(tmp_path)
    path = str(tmp_path / "adapter_model.safetensors")
    tensors = load_file(path)
    tensors["base_model.model.0.supertuning_indices"][0] = 48
    save_file(tensors, path)
    with pytest.raises(up.AdapterLoadError, match="outside the 6x8 weight"):
        up.AdaptedModel.from_pretrained(_linear(), tmp_path)


def test_supertuning_mixed_batch_equals_one_forward_per_adapter():
    torch.manual_seed(4)
    model = up.adapt(build("bert"), up.SupertuningConfig(sparsity=0.9, init_weights=False, target_modules=["query"]),
                     "a")
    model.add_adapter("b", up.SupertuningConfig(sparsity=0.8, r=2, init_weights=False, select_top=False,
                                                target_modules=["query", "value"]))
    model.eval()
    _mixed_equals_per_adapter(model, inputs("bert", seed=6), ["a", BASE_NAME, "b", "b"])


# ---- WaveFT ------------------------------------------------------------------------------------
def test_waveft_daubechies_filters_and_inverse_transform_equal_peft_s():
    from peft.tuners.waveft.wavelet import _WAVELET_COEFFS
    from peft.tuners.waveft.waverec2d import waverec2d

    from unipeft.methods.spectral import _wavelets
    for n in range(1, 11):
        lo, hi = _wavelets.reconstruction_filters(f"db{n}")
        assert len(lo) == 2 * n and abs(sum(lo) - 2 ** 0.5) < 1e-12
        assert max(abs(a - b) for a, b in zip(lo, _WAVELET_COEFFS[f"db{n}"])) < 1e-10
        assert abs(sum(a * b for a, b in zip(lo, hi))) < 1e-12  # lowpass and highpass are orthogonal
        g = torch.Generator().manual_seed(n)
        bands = [torch.randn(12, 15, generator=g, dtype=torch.float64) for _ in range(4)]
        ours = _wavelets.idwt2(*bands, f"db{n}")
        assert ours.shape == (24 - 2 * n + 2, 30 - 2 * n + 2)
        torch.testing.assert_close(ours, waverec2d((bands[0], tuple(bands[1:])), f"db{n}"), rtol=1e-9, atol=1e-9)


def test_waveft_haar_coefficient_spreads_over_a_two_by_two_block():
    seen = set()
    for seed in range(12):
        model = up.adapt(_linear(), up.WaveFTConfig(n_frequency=1, scaling=3.0, random_loc_seed=seed,
                                                    init_weights=False, target_modules=["0"]))
        delta = model.deltas("default")[0]
        row, col = delta.indices[:, 0].tolist()
        c = float(delta.waveft_spectrum.detach()[0])
        # The 6x8 weight is its own padded grid (Haar loses no border): the sub-bands are 3x4 blocks.
        band_r, band_c, r, q = row // 3, col // 4, row % 3, col % 4
        seen.add((band_r, band_c))
        # Haar's highpass is (1, -1)/sqrt(2): the top-right band (PEFT's "horizontal") is highpass over rows,
        # the bottom-left one over columns, the bottom-right over both.
        signs = torch.ones(2, 2)
        if band_c:
            signs[1] *= -1
        if band_r:
            signs[:, 1] *= -1
        expected = torch.zeros(6, 8)
        expected[2 * r:2 * r + 2, 2 * q:2 * q + 2] = 0.5 * 3.0 * c * signs
        torch.testing.assert_close(delta.delta_weight()["weight"].detach(), expected, rtol=1e-6, atol=1e-7)
    assert len(seen) == 4  # every sub-band was hit


def test_waveft_proportional_counts_land_in_the_resolved_config_only():
    config = up.WaveFTConfig(n_frequency=20, proportional_parameters=True,
                             target_modules=["query", "intermediate.dense"])
    model = up.adapt(build("bert"), config)
    counts = {s.path: s.deltas["default"].waveft_spectrum.numel() for s in model.sites()}
    # 32x32 and 32x40 layers share 20 * 4 coefficients in proportion 1024 : 1280.
    assert set(counts.values()) == {round(1024 / 4608 * 80), round(1280 / 4608 * 80)}
    assert config.n_frequency_pattern == {}
    assert len(model.peft_config["default"].n_frequency_pattern) == 4


def test_waveft_bad_fields_are_refused():
    with pytest.raises(up.ConfigError, match="WaveFTConfig.wavelet_family.*db10.*'sym4'"):
        up.WaveFTConfig(wavelet_family="sym4", target_modules=["0"])
    with pytest.raises(up.ConfigError, match=r"WaveFTConfig.n_frequency.*'0'.*6x8.*49"):
        up.adapt(_linear(), up.WaveFTConfig(n_frequency=49, target_modules=["0"]))
    with pytest.raises(up.ConfigError, match="WaveFTConfig.bias"):
        up.WaveFTConfig(bias="all", target_modules=["0"])


@pytest.mark.parametrize("family", ["db1", "db5"])
def test_waveft_mixed_batch_equals_one_forward_per_adapter(family):
    torch.manual_seed(5)
    targets = ["query", "intermediate.dense"]
    model = up.adapt(build("bert"), up.WaveFTConfig(n_frequency=40, scaling=30.0, wavelet_family=family,
                                                    init_weights=False, target_modules=targets), "a")
    model.add_adapter("b", up.WaveFTConfig(n_frequency=60, scaling=30.0, random_loc_seed=1, init_weights=False,
                                           target_modules=targets))
    model.eval()
    _mixed_equals_per_adapter(model, inputs("bert", seed=7), [BASE_NAME, "b", "a", "b"])
