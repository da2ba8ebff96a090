"""The spectral package (FourierFT, C3A, SHiRA, MiSS): identity at init where declared, merged equals
unmerged, exact save/load with PEFT's key names, only adapter tensors train, seeded locations and masks
regenerate equal, and bad configs fail naming the field and the module, leaving the model unchanged."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import unipeft as up
from unipeft.methods.spectral.c3a import block_circulant_apply, circulant_matrix
from unipeft.methods.spectral.fourierft import spectral_locations
from unipeft.methods.spectral.shira import random_mask
from tests.interop._models import build, inputs, output

# In the tiny BERT: query/value 32x32, intermediate.dense 32 -> 40, (attention.)output.dense 32/40 -> 32.
TARGETS = ["query", "value", "intermediate.dense", "output.dense"]
TOL = dict(atol=1e-5, rtol=1e-5)

CONFIGS = {
    "fourierft": lambda: up.FourierFTConfig(n_frequency=48, scaling=20.0, target_modules=TARGETS),
    "fourierft-zero": lambda: up.FourierFTConfig(n_frequency=48, scaling=20.0, init_weights=True,
                                                 n_frequency_pattern={"query": 16}, target_modules=TARGETS),
    "c3a": lambda: up.C3AConfig(block_size=8, target_modules=TARGETS),
    "c3a-zero": lambda: up.C3AConfig(block_size=8, init_weights=True, block_size_pattern={"query": 16},
                                     target_modules=TARGETS),
    "shira": lambda: up.ShiraConfig(r=2, random_seed=11, target_modules=TARGETS),
    "miss": lambda: up.MissConfig(r=4, target_modules=TARGETS),
    "miss-padded": lambda: up.MissConfig(r=3, target_modules=TARGETS),
    "miss-mini": lambda: up.MissConfig(r=4, mini_r=8, init_weights="mini", target_modules=TARGETS),
    "miss-bat": lambda: up.MissConfig(r=8, init_weights="bat", target_modules=TARGETS),
}
IDENTITY = {"fourierft-zero", "c3a-zero", "shira", "miss", "miss-padded", "miss-mini", "miss-bat"}
# The one trained tensor per site, and every tensor the file holds per site (PEFT's names).
PARAM = {"fourierft": "fourierft_spectrum", "c3a": "c3a_kernel", "shira": "shira_weight", "miss": "miss_block"}
FILE_KEYS = {"fourierft": {"fourierft_spectrum"}, "c3a": {"c3a_kernel"}, "shira": {"shira_weight", "shira_indices"},
             "miss": {"miss_block"}}


def _method(name: str) -> str:
    return name.split("-")[0]


def _perturbed(name: str, seed: int = 0) -> up.AdaptedModel:
    """An adapter of `name` whose trained tensors all hold seeded noise (so none sits at its init)."""
    torch.manual_seed(seed)
    model = up.adapt(build("bert"), CONFIGS[name]())
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * (0.05 if _method(name) == "c3a" else 0.2))
    return model.eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_init_is_the_identity_exactly_where_declared(name):
    batch = inputs("bert", seed=3)
    with torch.no_grad():
        expected = output(build("bert"), batch)
        model = up.adapt(build("bert"), CONFIGS[name]())
        got = output(model, batch)
    declared = all(d.identity_at_init for d in model.deltas("default"))
    assert declared == (name in IDENTITY)
    if name in IDENTITY:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    else:  # PEFT's default inits are random (normal spectrum, Xavier-uniform kernels)
        assert (got - expected).abs().max() > 1e-5
    # The class-level declaration is PEFT's default init: random for FourierFT and C3A, zeros otherwise.
    assert up.get_method(_method(name)).delta_cls.identity_at_init == (_method(name) in ("shira", "miss"))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_merged_equals_unmerged_and_unmerge_restores(name):
    model = _perturbed(name)
    batch = inputs("bert", seed=99)
    base_state = {k: v.clone() for k, v in build("bert").state_dict().items()}
    with torch.no_grad():
        before = output(model, batch)
        assert (before - output(build("bert"), batch)).abs().max() > 1e-5, "the adapter does nothing"
        model.merge()
        torch.testing.assert_close(output(model, batch), before, **TOL)
        model.unmerge()
        torch.testing.assert_close(output(model, batch), before, rtol=0, atol=1e-6)
        merged = model.merge_and_unload()
        torch.testing.assert_close(output(merged, batch), before, **TOL)
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, base_state[k])}
    assert changed and all(k.endswith(".weight") for k in changed)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_save_load_exact_with_peft_key_names(name, tmp_path):
    model = _perturbed(name)
    batch = inputs("bert", seed=7)
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    suffixes = {k.rsplit(".", 1)[-1] for k in saved}
    assert suffixes == FILE_KEYS[_method(name)]
    assert all(k.startswith("base_model.model.bert.encoder.layer.") for k in saved)
    assert len(saved) == 10 * len(FILE_KEYS[_method(name)])  # 5 targets in each of 2 layers
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == type(CONFIGS[name]()).peft_type
    torch.manual_seed(1234)  # the loaded adapter's own init draws other numbers
    loaded = up.AdaptedModel.from_pretrained(build("bert"), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(output(loaded, batch), output(model, batch), rtol=0, atol=0)
    for a, b in zip(model.deltas("default"), loaded.deltas("default")):
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb and torch.equal(va, vb), ka


@pytest.mark.parametrize("name", ["fourierft", "c3a", "shira", "miss", "miss-bat"])
def test_only_adapter_tensors_train(name):
    torch.manual_seed(0)
    model = up.adapt(build("bert"), CONFIGS[name]())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and {n.rsplit(".", 1)[-1] for n in trainable} == {PARAM[_method(name)]}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step in range(2):
        opt.zero_grad()
        out = output(model, inputs("bert", seed=10 + step))
        ((out ** 2).mean() + out.mean()).backward()
        opt.step()
    for n, p in model.named_parameters():
        assert (not torch.equal(p.detach(), before[n])) == (n in trainable), n
    for n, b in model.named_buffers():  # locations and masks stay fixed
        assert torch.equal(b, buffers[n]), n


def test_fourierft_locations_are_regenerated_from_the_seed(tmp_path):
    def indices(model):
        return [d.indices.clone() for d in model.deltas("default")]

    cfg = up.FourierFTConfig(n_frequency=40, random_loc_seed=5, target_modules=TARGETS)
    first = up.adapt(build("bert"), cfg)
    again = up.adapt(build("bert"), cfg)
    assert all(torch.equal(a, b) for a, b in zip(indices(first), indices(again)))
    other = up.adapt(build("bert"), cfg.replace(random_loc_seed=6))
    assert not any(torch.equal(a, b) for a, b in zip(indices(first), indices(other)))
    # Distinct positions inside the (out, in) weight, as the seed's permutation gives them.
    for d, idx in zip(first.deltas("default"), indices(first)):
        assert idx.shape == (2, 40)
        assert torch.equal(idx, spectral_locations(5, d.out_features, d.in_features, 40))
        flat = idx[0] * d.in_features + idx[1]
        assert flat.unique().numel() == 40 and idx[0].max() < d.out_features and idx[1].max() < d.in_features
    first.save_pretrained(tmp_path)
    assert not any(k.endswith("indices") for k in load_file(str(tmp_path / "adapter_model.safetensors")))
    loaded = up.AdaptedModel.from_pretrained(build("bert"), tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(indices(first), indices(loaded)))


def test_fourierft_delta_is_the_inverse_fft_of_the_sparse_spectrum():
    model = _perturbed("fourierft")
    d = model.deltas("default")[0]
    spectrum = torch.zeros(d.out_features, d.in_features, dtype=torch.complex64)
    for j, (r, c) in enumerate(d.indices.T.tolist()):
        spectrum[r, c] = float(d.fourierft_spectrum[j].detach())
    # ifft2 by its definition: (1 / (M N)) sum_{u,v} F[u,v] exp(2 pi i (u r / M + v c / N)).
    m, n = d.out_features, d.in_features
    em = torch.exp(2j * torch.pi * torch.outer(torch.arange(m), torch.arange(m)) / m).to(torch.complex64)
    en = torch.exp(2j * torch.pi * torch.outer(torch.arange(n), torch.arange(n)) / n).to(torch.complex64)
    expected = (em @ spectrum @ en).real / (m * n) * 20.0
    with torch.no_grad():
        torch.testing.assert_close(d.delta_weight()["weight"], expected, atol=1e-5, rtol=1e-4)


def test_c3a_fft_forward_equals_the_explicit_circulant_blocks():
    g = torch.Generator().manual_seed(0)
    kernel = torch.randn(3, 2, 4, generator=g)
    x = torch.randn(5, 6, 8, generator=g)
    dense = torch.zeros(12, 8)
    for m in range(3):
        for n in range(2):
            for t in range(4):
                for j in range(4):
                    dense[m * 4 + t, n * 4 + j] = kernel[m, n, (j - t) % 4]
    assert torch.equal(circulant_matrix(kernel), dense)
    torch.testing.assert_close(block_circulant_apply(x, kernel), x @ dense.T, atol=1e-5, rtol=1e-5)


def test_shira_mask_is_seeded_and_stored_indices_win_on_load(tmp_path):
    cfg = CONFIGS["shira"]()
    a, b = up.adapt(build("bert"), cfg), up.adapt(build("bert"), cfg)
    for da, db in zip(a.deltas("default"), b.deltas("default")):
        k = 2 * (da.in_features + da.out_features)
        assert da.shira_indices.dtype == torch.int32 and da.shira_indices.shape == (2, k)
        assert torch.equal(da.shira_indices, db.shira_indices)
        flat = da.shira_indices[0].long() * da.in_features + da.shira_indices[1].long()
        assert torch.equal(flat, flat.unique())  # distinct, in row-major order
    unseeded = random_mask(None, 32, 32, 128)
    assert torch.equal(unseeded, random_mask(None, 32, 32, 128))  # the generator's default seed
    assert not torch.equal(unseeded, random_mask(11, 32, 32, 128))
    # A file trained with another seed: its indices are used, not the config's seed.
    other = _perturbed("shira")
    with torch.no_grad():
        for d in other.deltas("default"):
            d.shira_indices.copy_(random_mask(99, d.out_features, d.in_features, d.shira_indices.shape[1]))
    other.save_pretrained(tmp_path)
    loaded = up.AdaptedModel.from_pretrained(build("bert"), tmp_path)
    batch = inputs("bert", seed=4)
    with torch.no_grad():
        torch.testing.assert_close(output(loaded, batch), output(other, batch), rtol=0, atol=0)
    # Indices outside the weight are refused, and the base model is left as it was.
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("shira_indices"))
    tensors[key] = tensors[key].clone()
    tensors[key][1, 0] = 10_000
    save_file(tensors, str(path))
    base = build("bert")
    with pytest.raises(up.AdapterLoadError, match="shira_indices point outside"):
        up.AdaptedModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, up.Delta) for m in base.modules())


BAD = [
    (lambda: up.FourierFTConfig(n_frequency=1025, target_modules=["query"]),
     r"FourierFTConfig\.n_frequency: expected at most out\*in = 1024 .*'bert\.encoder\.layer\.0\.attention\.self"
     r"\.query'.*got 1025"),
    (lambda: up.FourierFTConfig(n_frequency=8, n_frequency_pattern={"query": 2000}, target_modules=["query"]),
     r"FourierFTConfig\.n_frequency_pattern\['query'\]: expected at most out\*in = 1024"),
    (lambda: up.C3AConfig(block_size=16, target_modules=["query", "intermediate.dense"]),
     r"C3AConfig\.block_size: expected a divisor of both in_features and out_features for module "
     r"'bert\.encoder\.layer\.0\.intermediate\.dense' \(weight 40x32.*got 16"),
    (lambda: up.C3AConfig(block_size=8, block_size_pattern={"value": 5}, target_modules=["value"]),
     r"C3AConfig\.block_size_pattern\['value'\]: expected a divisor"),
    (lambda: up.ShiraConfig(r=17, target_modules=["query"]), r"ShiraConfig\.r: expected r\*\(in\+out\) <= in\*out"),
    (lambda: up.MissConfig(r=33, target_modules=["query"]), r"MissConfig\.r: expected at most in_features = 32"),
    (lambda: up.MissConfig(r=3, init_weights="bat", target_modules=["query"]),
     r"MissConfig\.r: expected a divisor of both in_features and out_features"),
    (lambda: up.MissConfig(r=4, mini_r=3, init_weights="mini", target_modules=["query"]),
     r"MissConfig\.mini_r: expected a divisor of out_features = 32"),
]


@pytest.mark.parametrize("make,match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_config_that_does_not_fit_a_module_names_the_field_and_changes_nothing(make, match):
    base = build("bert")
    batch = inputs("bert", seed=2)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    with torch.no_grad():
        expected = output(base, batch)
    with pytest.raises(up.ConfigError, match=match):
        up.adapt(base, make())
    assert not any(isinstance(m, up.Delta) for m in base.modules())
    assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(output(base, batch), expected, rtol=0, atol=0)


@pytest.mark.parametrize("make,match", [
    (lambda: up.FourierFTConfig(n_frequency=0), r"FourierFTConfig\.n_frequency: expected a positive integer, got 0"),
    (lambda: up.FourierFTConfig(random_loc_seed=None), r"FourierFTConfig\.random_loc_seed: expected an integer"),
    (lambda: up.FourierFTConfig(scaling=float("nan")), r"FourierFTConfig\.scaling: expected a finite number"),
    (lambda: up.FourierFTConfig(n_frequency_pattern={"q": 0}), r"FourierFTConfig\.n_frequency_pattern: expected"),
    (lambda: up.C3AConfig(init_weights="normal"), r"C3AConfig\.init_weights: expected one of \[True, False, "
                                                  r"'gaussian'"),
    (lambda: up.C3AConfig(init_weights=1), r"C3AConfig\.init_weights: expected one of"),
    (lambda: up.C3AConfig(bias="all"), r"C3AConfig\.bias: expected one of \['none'\], got 'all'"),
    (lambda: up.ShiraConfig(mask_type="topk"), r"ShiraConfig\.mask_type: expected one of \['random'\]"),
    (lambda: up.ShiraConfig(random_seed=1.5), r"ShiraConfig\.random_seed: expected an integer"),
    (lambda: up.MissConfig(init_weights="mini2"), r"MissConfig\.init_weights: expected one of"),
    (lambda: up.MissConfig(miss_dropout=1.0), r"MissConfig\.miss_dropout: expected 0 <= miss_dropout < 1"),
])
def test_bad_field_values_raise_config_error_naming_the_field(make, match):
    with pytest.raises(up.ConfigError, match=match):
        make()


def test_miss_bat_merge_undoes_exactly_what_it_added():
    """bat's update depends on W: unmerging subtracts the cached update, restoring W to float rounding."""
    model = _perturbed("miss-bat")
    site = next(iter(model.sites()))
    before = site.base_layer.weight.detach().clone()
    model.merge()
    assert (site.base_layer.weight - before).abs().max() > 1e-3
    model.unmerge()
    torch.testing.assert_close(site.base_layer.weight.detach(), before, rtol=0, atol=1e-6)
    assert site.deltas["default"].kind == "weight" and site.deltas["default"].weight_dependent
