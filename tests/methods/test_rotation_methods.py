"""RoAd, PSOFT and OSF beyond PEFT parity: the per-row mixed batch of RoAd, exact identities at init,
orthogonality of PSOFT's R, OSF's rank resolution and gradient projection, and field errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import unipeft as up
from unipeft.core.errors import ConfigError
from unipeft.methods.orthogonal.road import RoadDelta, rotate_half


class Net(nn.Module):
    """Two Linear layers: a tall one (24 x 8) and a wide one (8 x 24)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 24)
        self.down = nn.Linear(24, 8, bias=False)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


def _x(rows: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, 3, 8, generator=torch.Generator().manual_seed(seed))


def _perturb(model: up.AdaptedModel, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for d in model.deltas(name):
            for p in d.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("config", [
    up.RoadConfig(group_size=4, target_modules=["up", "down"]),
    up.PsoftConfig(r=4, psoft_alpha=8, target_modules=["up", "down"]),
    up.OSFConfig(effective_rank=3, target_modules=["up", "down"]),
], ids=["road", "psoft", "osf"])
def test_fresh_adapter_is_the_identity_bit_for_bit(config):
    base_out = _net()(_x())
    with torch.no_grad():
        assert torch.equal(up.adapt(_net(), config)(_x()), base_out)


def test_rotate_half_pairs_feature_i_with_i_plus_half_group():
    h = torch.arange(8.0)
    assert rotate_half(h, 4).tolist() == [-2.0, -3.0, 0.0, 1.0, -6.0, -7.0, 4.0, 5.0]


def test_road_mixed_batch_rotates_each_row_by_its_adapter_in_one_pass(monkeypatch):
    model = up.adapt(_net(), up.RoadConfig(group_size=4, target_modules=["up", "down"]), "a")
    model.add_adapter("b", up.RoadConfig(variant="road_4", group_size=4, target_modules=["up"]))
    _perturb(model, "a", 1)
    _perturb(model, "b", 2)
    names = ["b", "a", "__base__", "a", "b", "__base__"]
    x = _x()
    with torch.no_grad():
        got = model(x, adapter_names=names)
        calls = []
        original = RoadDelta.forward_grouped.__func__
        monkeypatch.setattr(RoadDelta, "forward_grouped",
                            classmethod(lambda cls, *a: calls.append(1) or original(cls, *a)))
        assert torch.equal(model(x, adapter_names=names), got)
        assert calls, "the grouped path was not taken"
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapters():
                    ref = model(x[i:i + 1])
            else:
                model.set_adapter(name)
                ref = model(x[i:i + 1])
            torch.testing.assert_close(got[i:i + 1], ref, rtol=1e-6, atol=1e-6)
    assert (got[0] - got[1]).abs().max() > 1e-3 and (got[1] - got[2]).abs().max() > 1e-3


def test_road_groups_of_different_sizes_fall_back_to_per_group_runs():
    model = up.adapt(_net(), up.RoadConfig(group_size=4, target_modules=["up"]), "a")
    model.add_adapter("b", up.RoadConfig(group_size=8, target_modules=["up"]))
    _perturb(model, "a", 1)
    _perturb(model, "b", 2)
    site = next(s for s in model.sites() if s.path == "up")
    h = torch.randn(2, 24)
    assert RoadDelta.forward_grouped([site.deltas["a"], site.deltas["b"]], h, h, torch.tensor([0, 1])) is None
    x = _x(2)
    with torch.no_grad():
        got = model(x, adapter_names=["a", "b"])
        model.set_adapter("b")
        torch.testing.assert_close(got[1:], model(x[1:]), rtol=1e-6, atol=1e-6)


def test_road_field_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"RoadConfig.group_size: expected a positive even integer, got 3"):
        up.RoadConfig(group_size=3, target_modules=["up"])
    with pytest.raises(ConfigError, match=r"RoadConfig.variant"):
        up.RoadConfig(variant="road_3", target_modules=["up"])
    with pytest.raises(ConfigError, match=r"RoadConfig.group_size: expected an even divisor of the 24 output"):
        up.adapt(_net(), up.RoadConfig(group_size=16, target_modules=["up"]))


def test_road_without_targets_adapts_the_linear_layers_of_even_width():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.b(self.a(x))

    model = up.adapt(Odd(), up.RoadConfig(group_size=2))
    assert [s.path for s in model.sites()] == ["a"]
    with pytest.raises(ConfigError, match=r"odd number of outputs \(3\)"):
        up.adapt(Odd(), up.RoadConfig(group_size=2, target_modules=["b"]))


@pytest.mark.parametrize("neumann", [False, True])
def test_psoft_rotation_is_orthogonal_without_magnitudes(neumann):
    cfg = up.PsoftConfig(r=6, psoft_mag_a=False, psoft_mag_b=False, use_cayley_neumann=neumann,
                         num_cayley_neumann_terms=12, target_modules=["up"])
    model = up.adapt(_net(), cfg)
    delta = model.deltas("default")[0]
    with torch.no_grad():
        delta.psoft_R.weight.normal_(0, 0.05)
        r = delta.psoft_R.matrix()
    torch.testing.assert_close(r.t() @ r, torch.eye(6), atol=1e-5 if not neumann else 1e-4, rtol=0)
    assert (r - torch.eye(6)).abs().max() > 1e-2


def test_psoft_factors_span_the_principal_subspace_and_lowrank_keeps_the_global_rng():
    net, other, third = _net(), _net(), _net()
    w = net.up.weight.detach()
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    lowrank = up.adapt(other, up.PsoftConfig(r=4, psoft_alpha=4, psoft_svd="lowrank", target_modules=["up"]))
    assert torch.equal(torch.rand(3), expected_draw), "the seeded low-rank SVD moved the global RNG"
    again = up.adapt(third, up.PsoftConfig(r=4, psoft_alpha=4, psoft_svd="lowrank", target_modules=["up"]))
    assert torch.equal(lowrank.deltas("default")[0].psoft_B, again.deltas("default")[0].psoft_B)
    d = up.adapt(net, up.PsoftConfig(r=4, psoft_alpha=4, target_modules=["up"])).deltas("default")[0]
    u, s, vh = torch.linalg.svd(w)
    torch.testing.assert_close(d.scaling * d.psoft_B @ d.psoft_A, u[:, :4] @ torch.diag(s[:4]) @ vh[:4],
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(d.psoft_A @ d.psoft_A.t(), torch.eye(4), atol=1e-5, rtol=0)  # psoft_init: A = V_r^T


def test_psoft_field_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"PsoftConfig.r: expected at most min\(in, out\) = 8"):
        up.adapt(_net(), up.PsoftConfig(r=9, target_modules=["up"]))
    with pytest.raises(ConfigError, match=r"PsoftConfig.cayley_neumann_eps"):
        up.PsoftConfig(use_cayley_neumann=True, cayley_neumann_eps=1.5, target_modules=["up"])
    with pytest.raises(ConfigError, match=r"PsoftConfig.ab_svd_init"):
        up.PsoftConfig(ab_svd_init="olora", target_modules=["up"])
    with pytest.raises(ConfigError, match=r"fan_in_fan_out"):
        up.PsoftConfig.from_dict({"peft_type": "PSOFT", "fan_in_fan_out": True, "target_modules": ["up"]})


def test_osf_rank_resolution_follows_peft():
    cfg = up.OSFConfig(effective_rank=0.5, rank_pattern={"dow": 2}, target_modules=["up", "down"])
    assert cfg.frozen_rank("up", 8) == 4 and cfg.frozen_rank("down", 8) == 2  # re.search, first match
    assert up.OSFConfig(target_modules=["up"]).frozen_rank("up", 7) == 3  # None: half of min(out, in)
    assert up.OSFConfig(effective_rank=30, target_modules=["up"]).frozen_rank("up", 8) == 8
    model = up.adapt(_net(), cfg)
    shapes = {s.path: tuple(s.deltas["default"].osf_svd_params["U_low"].shape) for s in model.sites()}
    assert shapes == {"up": (24, 4), "down": (8, 6)}
    with pytest.raises(ConfigError, match=r"OSFConfig.effective_rank"):
        up.OSFConfig(effective_rank=0, target_modules=["up"])
    with pytest.raises(ConfigError, match=r"OSFConfig.effective_rank: 'up' \(24 x 8\) resolves to 0"):
        up.adapt(_net(), up.OSFConfig(effective_rank=0.1, target_modules=["up"]))


def test_osf_gradients_stay_orthogonal_to_the_frozen_subspace():
    net = _net()
    w_up, w_down = net.up.weight.detach().clone(), net.down.weight.detach().clone()
    model = up.adapt(net, up.OSFConfig(effective_rank=3, target_modules=["up", "down"]))
    (model(_x()) ** 2).sum().backward()
    high_u = torch.linalg.svd(w_up, full_matrices=False)[0][:, :3]  # tall layer: U_high is stored
    high_v = torch.linalg.svd(w_down, full_matrices=False)[2][:3]  # wide layer: V_high is stored
    d_up, d_down = (next(s for s in model.sites() if s.path == p).deltas["default"] for p in ("up", "down"))
    g_u, g_v = d_up.osf_svd_params["U_low"].grad, d_down.osf_svd_params["V_low"].grad
    assert g_u.abs().max() > 1e-3 and g_v.abs().max() > 1e-3
    torch.testing.assert_close(high_u.t() @ g_u, torch.zeros(3, g_u.shape[1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(g_v @ high_v.t(), torch.zeros(g_v.shape[0], 3), atol=1e-5, rtol=0)
    # the square factors (V of "up", U of "down"): the gradient stays in the span of the initial low part
    v0 = d_up.V_low_init
    g = d_up.osf_svd_params["V_low"].grad
    torch.testing.assert_close(g @ v0.t() @ v0, g, atol=1e-5, rtol=0)


def test_osf_never_edits_the_base_and_merge_unmerge_round_trips():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    model = up.adapt(net, up.OSFConfig(effective_rank=2, target_modules=["up", "down"]))
    _perturb(model, "default", 3)
    x = _x()
    with torch.no_grad():
        out = model(x)
        model.merge()
        torch.testing.assert_close(model(x), out, atol=1e-5, rtol=1e-5)
        model.unmerge()
    base = model.unload()
    for k, v in base.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=0)
