"""OFT, BOFT and HRA on a toy model with Linear, Conv2d and Embedding layers: identity at init,
merged == unmerged after training, exact save/load with PEFT's key names, only adapter parameters
train, the rotations stay orthogonal, COFT's ball, block dropout, stacking, and bad configs."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import unipeft as up

ALL = ["embed", "fc", "conv", "out"]
CONFIGS = {
    # r=1: one block spanning each layer's whole width (8, 8, 27 and 76 rotated features)
    "oft-exact": lambda: up.OFTConfig(r=1, oft_block_size=None, use_cayley_neumann=False, target_modules=ALL),
    "oft-neumann": lambda: up.OFTConfig(oft_block_size=4, target_modules=["embed", "fc", "out"]),
    "oft-shared-coft": lambda: up.OFTConfig(oft_block_size=4, block_share=True, coft=True, eps=0.2,
                                            use_cayley_neumann=False, target_modules=["fc", "out"]),
    "boft": lambda: up.BOFTConfig(boft_block_size=None, boft_block_num=1, target_modules=["fc", "conv", "out"]),
    "boft-butterfly": lambda: up.BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=2, target_modules=["fc", "out"]),
    "hra": lambda: up.HRAConfig(r=4, target_modules=["fc", "conv", "out"]),
    "hra-gs": lambda: up.HRAConfig(r=4, apply_GS=True, init_weights=False, target_modules=["fc", "conv", "out"]),
}
KEYS = {"oft": {"oft_R.weight", "oft_embedding_R.weight"}, "boft": {"boft_R", "boft_s"}, "hra": {"hra_u"}}
ORTHOGONAL = ["oft-exact", "oft-shared-coft", "boft", "boft-butterfly", "hra", "hra-gs"]  # not the Neumann series


class Toy(nn.Module):
    """Embedding -> mean -> Linear, a 3x3 Conv2d branch, and a Linear head over both."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 12)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.out = nn.Linear(12 + 4 * 16, 6)

    def forward(self, ids, img):
        h = torch.tanh(self.fc(self.embed(ids).mean(1)))
        c = torch.relu(self.conv(img)).flatten(1)
        return self.out(torch.cat([h, c], 1))


def _toy(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    return Toy().eval()


def _batch(seed: int = 1, rows: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"ids": torch.randint(0, 20, (rows, 5), generator=g), "img": torch.randn(rows, 3, 4, 4, generator=g)}


def _run(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch)


def _train(model, steps: int = 4, lr: float = 0.05):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        opt.zero_grad()
        out = model(**_batch(10 + step))
        ((out - 1.0) ** 2).mean().backward()
        opt.step()
    return model.eval()


def _trained(name: str) -> up.AdaptedModel:
    torch.manual_seed(5)
    return _train(up.adapt(_toy(), CONFIGS[name]()))


def _family(name: str) -> str:
    return name.split("-")[0]


def _orthogonal_matrix(delta) -> torch.Tensor:
    if isinstance(delta, up.get_method("hra").delta_cls):
        return delta.reflection()
    return delta.rotation()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_identity_at_init(name):
    base, batch = _toy(), _batch()
    expected = _run(base, batch)
    model = up.adapt(base, CONFIGS[name]())
    out = _run(model, batch)
    if name == "hra-gs":  # random columns (init_weights=False): a real rotation from the start
        assert (out - expected).abs().max() > 1e-3
    elif _family(name) == "hra":  # paired reflections cancel up to float rounding
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    else:
        assert torch.equal(out, expected)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_trained_merge_equals_unmerged_and_unmerge_restores(name):
    model, batch = _trained(name), _batch(99)
    out = _run(model, batch)
    assert (out - _run(_toy(), batch)).abs().max() > 1e-3, "training changed nothing"
    before = {k: v.clone() for k, v in model.base_model.state_dict().items() if "deltas" not in k}
    model.merge()
    torch.testing.assert_close(_run(model, batch), out, atol=1e-5, rtol=1e-5)
    model.unmerge()
    after = {k: v for k, v in model.base_model.state_dict().items() if "deltas" not in k}
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, atol=1e-6, rtol=1e-6, msg=key)
    merged = model.merge_and_unload()
    torch.testing.assert_close(_run(merged, batch), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_save_load_is_exact_with_peft_key_names(name, tmp_path):
    model, batch = _trained(name), _batch(98)
    model.save_pretrained(tmp_path)
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    prefix = "base_model.model."
    assert all(k.startswith(prefix) for k in keys)
    split = [k[len(prefix):].split(".", 1) for k in keys]
    assert {path for path, _ in split} == {d.path for d in model.deltas("default")}
    assert {rest for _, rest in split} <= KEYS[_family(name)]
    loaded = up.AdaptedModel.from_pretrained(_toy(), tmp_path)
    assert torch.equal(_run(loaded, batch), _run(model, batch))
    assert type(loaded.peft_config["default"]) is type(model.peft_config["default"])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_only_adapter_parameters_train(name):
    torch.manual_seed(5)
    model = up.adapt(_toy(), CONFIGS[name]())
    allowed = ("oft_R.weight", "oft_embedding_R.weight", "boft_R", "boft_s", "hra_u")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(n.endswith(allowed) for n in trainable), trainable
    assert trainable, "nothing trains"
    before = {n: p.detach().clone() for n, p in _toy().named_parameters()}
    _train(model)
    base = model.unload()
    for n, p in base.named_parameters():
        assert torch.equal(p, before[n]), f"base parameter {n} changed"


@pytest.mark.parametrize("name", ORTHOGONAL)
def test_rotations_stay_orthogonal_after_training(name):
    model = _trained(name)
    for delta in model.deltas("default"):
        with torch.no_grad():
            q = _orthogonal_matrix(delta)
        eye = torch.eye(q.shape[0])
        assert (q - eye).abs().max() > 1e-4, f"{delta.path}: still the identity"
        torch.testing.assert_close(q @ q.T, eye, atol=1e-5, rtol=0)


def test_neumann_series_is_close_to_but_not_exactly_orthogonal():
    model = _trained("oft-neumann")
    worst = 0.0
    for delta in model.deltas("default"):
        with torch.no_grad():
            q = delta.rotation()
        worst = max(worst, float((q @ q.T - torch.eye(q.shape[0])).abs().max()))
    assert 0 < worst < 0.05


def test_coft_keeps_each_block_within_eps():
    model = _trained("oft-shared-coft")
    for delta in model.deltas("default"):
        with torch.no_grad():
            delta.rotation_blocks()  # projects the stored parameters, as every forward does
            vec = delta.vector
            assert vec.shape[0] == 1  # block_share: one block for the whole layer
            q = vec.new_zeros(1, 4, 4)
            q[:, delta.rows, delta.cols] = vec
            norm = float((q - q.transpose(1, 2)).norm())
        assert 0.1 < norm <= 0.2 + 1e-6, f"{delta.path}: skew norm {norm}"


def test_butterfly_factors_mix_beyond_one_block_diagonal():
    model = _trained("boft-butterfly")
    fc = model.delta_at("default", "fc")
    assert fc.boft_R.shape == (2, 4, 2, 2)
    with torch.no_grad():
        m = fc.rotation()
    outside = m.clone()
    for i in range(0, 8, 2):
        outside[i:i + 2, i:i + 2] = 0
    assert outside.abs().max() > 1e-3, "two factors act like one block-diagonal matrix"


def test_module_dropout_turns_blocks_into_identity_only_while_training():
    torch.manual_seed(0)
    model = up.adapt(_toy(), up.OFTConfig(oft_block_size=2, module_dropout=0.5, use_cayley_neumann=False,
                                          target_modules=["fc"]))
    delta = model.delta_at("default", "fc")
    with torch.no_grad():
        delta.vector.normal_(0, 0.3)
    eye = torch.eye(2)
    with torch.no_grad():
        blocks = delta.rotation_blocks(dropout=True)
    assert sum(torch.equal(b, eye) for b in blocks) == 2  # int(0.5 * 4) blocks dropped
    assert sum(torch.equal(b, eye) for b in delta.rotation_blocks().detach()) == 0
    batch = _batch(3)
    model.eval()
    eval_out = _run(model, batch)
    model.train()
    train_outs = [_run(model, batch) for _ in range(4)]
    assert all((o - eval_out).abs().max() > 1e-5 for o in train_outs), "dropout never acted while training"
    model.eval()
    assert torch.equal(_run(model, batch), eval_out)
    with torch.no_grad():  # a merge in training mode uses every block
        model.train()
        dw = delta.delta_weight()["weight"]
        model.eval()
        torch.testing.assert_close(dw, delta.delta_weight()["weight"], atol=0, rtol=0)


def test_two_stacked_adapters_merge_like_their_forward():
    torch.manual_seed(0)
    model = up.adapt(_toy(), up.OFTConfig(oft_block_size=4, use_cayley_neumann=False, target_modules=["fc", "out"]),
                     "a")
    model.add_adapter("b", up.BOFTConfig(boft_block_size=4, target_modules=["fc", "out"]))
    model.set_adapter(["a", "b"])
    with torch.no_grad():
        for name in ("a", "b"):
            for p in (p for d in model.deltas(name) for p in d.parameters()):
                p.add_(torch.randn(p.shape) * 0.2)
    batch = _batch(7)
    out = _run(model, batch)
    single = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        single[name] = _run(model, batch)
        assert (single[name] - out).abs().max() > 1e-4
    model.set_adapter(["a", "b"])
    model.merge()
    torch.testing.assert_close(_run(model, batch), out, atol=1e-5, rtol=1e-5)


def test_hra_odd_rank_warns_and_is_random():
    with pytest.warns(UserWarning, match="odd"):
        model = up.adapt(_toy(), up.HRAConfig(r=3, target_modules=["fc"]))
    assert (_run(model, _batch()) - _run(_toy(), _batch())).abs().max() > 1e-4


def test_peft_zero_means_unset_in_both_directions():
    cfg = up.AdapterConfig.from_dict({"peft_type": "OFT", "r": 4, "oft_block_size": 0, "target_modules": ["fc"]})
    assert (cfg.r, cfg.oft_block_size) == (4, None)
    assert (cfg.to_dict()["r"], cfg.to_dict()["oft_block_size"]) == (4, 0)
    cfg = up.AdapterConfig.from_dict({"peft_type": "BOFT", "boft_block_size": 0, "boft_block_num": 2,
                                      "target_modules": ["fc"]})
    assert (cfg.boft_block_size, cfg.boft_block_num, cfg.to_dict()["boft_block_size"]) == (None, 2, 0)


# ---- bad configs ------------------------------------------------------------------------------
def _unchanged_after(exc, match, config, model=None):
    model = model or _toy()
    types = [type(m) for m in model.modules()]
    with pytest.raises(exc, match=match):
        up.adapt(model, config)
    assert [type(m) for m in model.modules()] == types
    assert all(p.requires_grad for p in model.parameters())


def test_block_size_not_dividing_the_width_names_the_field():
    _unchanged_after(up.ConfigError, r"OFTConfig\.oft_block_size: expected a divisor of the 8 rotated features "
                                     r"of 'fc'.*got 3", up.OFTConfig(oft_block_size=3, target_modules=["fc"]))
    _unchanged_after(up.ConfigError, r"OFTConfig\.r: .*27 rotated features of 'conv'.*got 4",
                     up.OFTConfig(r=4, oft_block_size=None, target_modules=["fc", "conv"]))
    _unchanged_after(up.ConfigError, r"BOFTConfig\.boft_block_size: .*76 rotated features of 'out'",
                     up.BOFTConfig(boft_block_size=8, target_modules=["fc", "out"]))
    _unchanged_after(up.ConfigError, r"BOFTConfig\.boft_n_butterfly_factor: 4 factors",
                     up.BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=4, target_modules=["fc"]))


def test_field_rules():
    with pytest.raises(up.ConfigError, match=r"OFTConfig\.r / oft_block_size: expected exactly one"):
        up.OFTConfig(r=2, target_modules=["fc"])  # oft_block_size keeps its default 32
    with pytest.raises(up.ConfigError, match=r"OFTConfig\.r / oft_block_size"):
        up.OFTConfig(r=None, oft_block_size=None, target_modules=["fc"])
    with pytest.raises(up.ConfigError, match=r"OFTConfig\.oft_block_size: expected a positive integer, got -2"):
        up.OFTConfig(oft_block_size=-2, target_modules=["fc"])
    with pytest.raises(up.ConfigError, match=r"OFTConfig\.coft: expected True or False, got 'yes'"):
        up.OFTConfig(coft="yes", target_modules=["fc"])
    with pytest.raises(up.ConfigError, match=r"OFTConfig\.module_dropout"):
        up.OFTConfig(module_dropout=1.5, target_modules=["fc"])
    with pytest.raises(up.ConfigError, match=r"BOFTConfig\.boft_block_num / boft_block_size"):
        up.BOFTConfig(boft_block_num=2, target_modules=["fc"])
    with pytest.raises(up.ConfigError, match=r"HRAConfig\.r: expected a positive integer, got 0"):
        up.HRAConfig(r=0, target_modules=["fc"])
    with pytest.raises(up.ConfigError, match=r"field 'bias'='all' is not supported"):
        up.AdapterConfig.from_dict({"peft_type": "HRA", "r": 2, "bias": "all", "target_modules": ["fc"]})


def test_grouped_conv_is_refused():
    model = nn.Sequential(nn.Conv2d(4, 4, 1, groups=2))
    _unchanged_after(up.TargetError, r"'0' is a Conv2d with groups=2", up.HRAConfig(r=2, target_modules=["0"]),
                     model)
