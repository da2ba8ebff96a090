"""merge_adapters: parameter-space and weight-space merges on a tiny seeded model, and refused merges
that leave the model unchanged."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import unipeft as up
from unipeft.core.errors import ConfigError, MergeError
from unipeft.merge import adapters as adapters_mod
from unipeft.merge.adapters import METHODS, merge_adapters

X = torch.randn(5, 6, generator=torch.Generator().manual_seed(9))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(5, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _randomize(model, name: str, seed: int) -> None:
    """Give an adapter non-trivial values (small, so outputs stay O(1))."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for d in model.deltas(name):
            for p in d.parameters():
                p.copy_(p + 0.3 * torch.randn(p.shape, generator=g))


def _model():
    torch.manual_seed(0)
    lora = dict(target_modules=["a", "b"])
    m = up.adapt(MLP(), up.LoraConfig(r=2, alpha=4, **lora), "x")
    m.add_adapter("y", up.LoraConfig(r=2, alpha=4, **lora))
    m.add_adapter("r3", up.LoraConfig(r=3, alpha=4, **lora))
    m.add_adapter("ia3", up.IA3Config(target_modules=["a", "b"], feedforward_modules=["a", "b"]))
    m.add_adapter("ia3_out", up.IA3Config(target_modules=["a", "b"], feedforward_modules=[]))
    m.add_adapter("loha", up.LoHaConfig(r=2, alpha=2, target_modules=["a", "b"]))
    m.add_adapter("bottleneck", up.BottleneckConfig(target_modules=["a"], r=2))
    for i, n in enumerate(m.peft_config):
        _randomize(m, n, i + 1)
    return m


def _out(m, name):
    m.set_adapter(name)
    with torch.no_grad():
        return m(X)


def _dw(m, name, path):
    with torch.no_grad():
        return m.delta_at(name, path).delta_weight()["weight"]


def _ab(m, name, path):
    d = m.delta_at(name, path)
    return d.lora_B.weight.detach(), d.lora_A.weight.detach(), m.peft_config[name].scaling(path)


def test_linear_of_one_source_reproduces_it_exactly():
    m = _model()
    name = merge_adapters(m, ["x"], [1.0], method="linear", name="copy")
    assert name == "copy" and type(m.peft_config["copy"]) is type(m.peft_config["x"])
    assert torch.equal(_out(m, "copy"), _out(m, "x"))
    assert not torch.equal(_out(m, "copy"), _out(m, "y"))


def test_linear_of_lora_combines_the_factors():
    m = _model()
    merge_adapters(m, ["x", "y"], [0.6, -0.3], name="lin")
    for path in ("a", "b"):
        bx, ax, s = _ab(m, "x", path)
        by, ay, _ = _ab(m, "y", path)
        want = s * (0.6 * bx - 0.3 * by) @ (0.6 * ax - 0.3 * ay)
        assert torch.allclose(_dw(m, "lin", path), want, atol=1e-6)


def test_layer_weights_override_matching_sites():
    m = _model()
    merge_adapters(m, ["x", "y"], [0.5, 0.5], name="lw", layer_weights={r"^b$": [1.0, 0.0]})
    assert torch.equal(_dw(m, "lw", "b"), _dw(m, "x", "b"))  # weights (1, 0) at b: exactly x
    bx, ax, s = _ab(m, "x", "a")
    by, ay, _ = _ab(m, "y", "a")
    assert torch.allclose(_dw(m, "lw", "a"), s * (0.5 * bx + 0.5 * by) @ (0.5 * ax + 0.5 * ay), atol=1e-6)


def test_cat_of_lora_is_the_exact_weighted_sum_of_deltas():
    m = _model()
    merge_adapters(m, ["x", "r3"], [0.7, -1.2], method="cat", name="cat")
    assert m.peft_config["cat"].r == 5
    for path in ("a", "b"):
        want = 0.7 * _dw(m, "x", path) - 1.2 * _dw(m, "r3", path)
        assert torch.allclose(_dw(m, "cat", path), want, atol=1e-6)


def test_ties_and_pcb_apply_the_operator_per_tensor():
    m = _model()
    merge_adapters(m, ["x", "y"], [1.0, 0.5], method="ties", density=0.5, name="t")
    merge_adapters(m, ["x", "y"], [1.0, 0.5], method="pcb", ratio=0.5, name="p")
    from unipeft.merge import ops
    for path in ("a", "b"):
        for key in ("lora_A", "lora_B"):
            src = [getattr(m.delta_at(n, path), key).weight.detach() for n in ("x", "y")]
            assert torch.equal(getattr(m.delta_at("t", path), key).weight, ops.ties(src, [1.0, 0.5], 0.5))
            assert torch.equal(getattr(m.delta_at("p", path), key).weight, ops.pcb(src, [1.0, 0.5], 0.5))


@pytest.mark.parametrize("source", ["ia3", "loha"])
def test_svd_of_a_non_lora_method_writes_its_delta_as_lora(source):
    m = _model()
    merge_adapters(m, [source], [1.0], method="svd", svd_rank=5, name="full")  # >= min(out, in) at both
    assert type(m.peft_config["full"]).method == "lora" and m.peft_config["full"].r == 5
    for path in ("a", "b"):
        assert torch.allclose(_dw(m, "full", path), _dw(m, source, path), atol=1e-5)
    assert torch.allclose(_out(m, "full"), _out(m, source), atol=1e-5)
    merge_adapters(m, [source], [2.0], method="svd", svd_rank=1, name="r1")
    for path in ("a", "b"):
        d, d1 = 2.0 * _dw(m, source, path), _dw(m, "r1", path)
        s = torch.linalg.svdvals(d)
        assert torch.linalg.matrix_rank(d1) == 1
        # the best rank-1 approximation: residual = norm of the dropped singular values (Eckart-Young)
        assert abs(torch.linalg.norm(d - d1) - torch.linalg.norm(s[1:])) < 1e-5


def test_weight_space_merges_mix_methods():
    m = _model()
    merge_adapters(m, ["x", "ia3"], [0.5, 2.0], method="svd", svd_rank=5, name="mix")
    for path in ("a", "b"):
        want = 0.5 * _dw(m, "x", path) + 2.0 * _dw(m, "ia3", path)
        assert torch.allclose(_dw(m, "mix", path), want, atol=1e-5)
    merge_adapters(m, ["x", "ia3"], [1.0, 1.0], method="ties_svd", density=0.5, svd_rank=5, name="ts")
    from unipeft.merge import ops
    want = ops.ties([_dw(m, "x", "a"), _dw(m, "ia3", "a")], [1.0, 1.0], 0.5)
    assert torch.allclose(_dw(m, "ts", "a"), want, atol=1e-5)
    # default rank: the largest LoRA rank, or 8 as soon as a source is not LoRA
    assert m.peft_config[merge_adapters(m, ["x", "r3"], method="svd")].r == 3
    assert m.peft_config[merge_adapters(m, ["x", "ia3"], method="svd")].r == 8


def test_dare_is_reproducible_by_seed():
    m = _model()
    one = merge_adapters(m, ["x", "y"], method="dare_ties", density=0.5, seed=3)
    two = merge_adapters(m, ["x", "y"], method="dare_ties", density=0.5, seed=3)
    other = merge_adapters(m, ["x", "y"], method="dare_ties", density=0.5, seed=4)
    assert torch.equal(_dw(m, one, "a"), _dw(m, two, "a"))
    assert not torch.equal(_dw(m, one, "a"), _dw(m, other, "a"))


def _snapshot(m):
    return ({n: type(c) for n, c in m.peft_config.items()},
            {n: {k: v.clone() for k, v in m.adapter_state_dict(n).items()} for n in m.peft_config},
            {n: _out(m, n) for n in ("x", "ia3")})


BAD = [
    (dict(sources=["x", "nope"]), ConfigError, "nope"),
    (dict(sources=["x", "x"], weights=[0.5, 0.5]), ConfigError, "more than once"),
    (dict(sources="x"), ConfigError, "sources"),
    (dict(sources=["x", "ia3"]), MergeError, "one method"),
    (dict(sources=["x", "r3"]), MergeError, "config fields"),
    (dict(sources=["x", "y"], weights=[1.0]), ConfigError, "weights"),
    (dict(sources=["x", "y"], weights=[1.0, float("nan")]), ConfigError, "weights"),
    (dict(sources=["x", "y"], method="ties", density=0.0), ConfigError, "density"),
    (dict(sources=["x", "y"], method="dare_linear", density=1.5), ConfigError, "density"),
    (dict(sources=["x", "y"], method="ties"), ConfigError, "density: required"),
    (dict(sources=["x", "y"], method="ties_svd", density=-0.1), ConfigError, "density"),
    (dict(sources=["x", "bottleneck"], method="svd"), MergeError, "not mergeable"),
    (dict(sources=["ia3_out"], method="svd"), MergeError, "bias"),
    (dict(sources=["x", "y"], method="average"), ConfigError, "method"),
    (dict(sources=["x", "y"], name="y"), ConfigError, "already exists"),
    (dict(sources=["x", "y"], method="linear", density=0.5), ConfigError, "not a parameter"),
    (dict(sources=["x", "ia3"], method="cat"), MergeError, "plain LoRA"),
    (dict(sources=["x", "y"], layer_weights={"(": [1.0, 1.0]}), ConfigError, "layer_weights"),
    (dict(sources=["x", "y"], layer_weights={"a": [1.0]}), ConfigError, "layer_weights"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD)
def test_bad_input_raises_and_leaves_the_model_unchanged(kwargs, error, match):
    m = _model()
    before = _snapshot(m)
    with pytest.raises(error, match=match):
        merge_adapters(m, **kwargs)
    after = _snapshot(m)
    assert after[0] == before[0]
    for n in before[1]:
        assert all(torch.equal(before[1][n][k], after[1][n][k]) for k in before[1][n])
    assert all(torch.equal(before[2][n], after[2][n]) for n in before[2])


def test_a_failure_while_writing_deletes_the_new_adapter(monkeypatch):
    m = _model()
    before = _snapshot(m)

    def boom(*_a, **_k):
        raise MergeError("write failed")

    monkeypatch.setattr(adapters_mod, "write_lora", boom)
    with pytest.raises(MergeError, match="write failed"):
        merge_adapters(m, ["x", "ia3"], method="svd", name="partial")
    assert "partial" not in m.peft_config and list(m.peft_config) == list(before[0])
    assert all(torch.equal(before[2][n], _out(m, n)) for n in before[2])


def test_every_method_name_is_accepted():
    m = _model()
    params = {"density": 0.5, "ratio": 0.5}
    for method in METHODS:
        op = adapters_mod.operator_of(method)
        kw = {k: v for k, v in params.items() if k in adapters_mod.ops.OPERATOR_PARAMS[op]}
        name = merge_adapters(m, ["x", "y"], method=method, name=f"m_{method}", **kw)
        assert name in m.peft_config and type(m.peft_config[name]).method == "lora"
        assert torch.isfinite(_out(m, name)).all()
