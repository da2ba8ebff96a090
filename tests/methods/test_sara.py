"""SaRA: sparse-only backward, selection rule, nuclear-norm penalty, re-selection, storage, merging, trainer hook."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import unipeft as up
from unipeft.methods.sparse.base import Layout, SparseMatmul, chunked_sampled_grad, sparse_deltas
from unipeft.methods.sparse.sara import SaraCallback, SaraDelta, nuclear_grad, nuclear_norm, reselect_steps


class Net(nn.Module):
    """Two linear layers: enough structure for a sparse delta on each."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 20)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(20, 6)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def _data(seed: int = 1, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g), torch.randn(n, 6, generator=g)


def hooked_step(model, opt, hooks, x, y, before_end=None) -> None:
    """One optimizer step on a squared loss, calling the method's hooks where the trainer does."""
    hooks.step_begin()
    loss = (model(x) - y).pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    hooks.before_optimizer_step()
    opt.step()
    if before_end is not None:
        before_end()
    hooks.step_end()


def _train(model, steps: int, lr: float = 1e-2, hooks_steps: int | None = None, seed: int = 1):
    """Adam on the trainable parameters, driving the method's callbacks like the trainer does."""
    x, y = _data(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    hooks = up.TrainingHooks(model, opt, max_steps=hooks_steps or steps)
    for _ in range(steps):
        hooked_step(model, opt, hooks, x, y)
    return opt, hooks


def _random_selection(out_f, in_f, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(out_f * in_f, generator=g)[:k].sort().values


@pytest.mark.parametrize("with_frozen", [False, True])
def test_sparse_backward_equals_dense_gradient_at_selected_entries(with_frozen):
    out_f, in_f, k = 9, 13, 40
    flat = _random_selection(out_f, in_f, k)
    layout = Layout(flat, out_f, in_f)
    g = torch.Generator().manual_seed(3)
    vals = torch.randn(k, dtype=torch.float64, generator=g, requires_grad=True)
    x = torch.randn(2, 5, in_f, dtype=torch.float64, generator=g, requires_grad=True)
    frozen = None
    dense_frozen = torch.zeros(out_f * in_f, dtype=torch.float64)
    if with_frozen:
        f_flat = _random_selection(out_f, in_f, 25, seed=7)
        f_vals = torch.randn(25, dtype=torch.float64, generator=g)
        frozen = (Layout(f_flat, out_f, in_f), f_vals)
        dense_frozen[f_flat] = f_vals
    weight_out = torch.randn(2, 5, out_f, dtype=torch.float64, generator=g)

    y = SparseMatmul.apply(x, vals, layout, frozen)
    (y * weight_out).sum().backward()

    dense = torch.zeros(out_f * in_f, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    w = (dense + dense_frozen).view(out_f, in_f) + torch.zeros(out_f * in_f, dtype=torch.float64).index_add(
        0, flat, vals.detach()).view(out_f, in_f)
    y_ref = x_ref @ w.T
    (y_ref * weight_out).sum().backward()

    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vals.grad, dense.grad[flat], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    # The chunked fallback (other dtypes/devices) computes the same values.
    g2, x2 = weight_out.reshape(-1, out_f), x.detach().reshape(-1, in_f)
    torch.testing.assert_close(chunked_sampled_grad(layout.rows, layout.cols, g2, x2), dense.grad[flat],
                               rtol=1e-12, atol=1e-12)


def test_selection_is_the_entries_below_the_ratio_quantile():
    model = up.adapt(_net(), up.SaraConfig(ratio=0.1, target_modules=["fc1", "fc2"]))
    for d in sparse_deltas(model, "default", SaraDelta):
        w = d.base.weight.detach().abs().flatten()
        k = int(0.1 * w.numel())
        assert d.values.numel() == k and d.indices.numel() == k
        mask = torch.zeros_like(w, dtype=torch.bool)
        mask[d.indices] = True
        assert w[mask].max() <= w[~mask].min()
        assert w[mask].max() <= torch.quantile(w, 0.1) + 1e-7  # below the ratio quantile
        assert torch.equal(d.indices, d.indices.sort().values)


def test_training_changes_only_selected_entries_and_state_has_value_size():
    base = _net()
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = up.adapt(base, up.SaraConfig(ratio=0.1, nuclear_weight=0.0, schedule=[], target_modules=["fc1", "fc2"]))
    opt, _ = _train(model, steps=5)
    deltas = sparse_deltas(model, "default", SaraDelta)
    for d in deltas:
        state = opt.state[d.values]
        assert state, "the optimizer holds no state for the values"
        for key, t in state.items():
            assert t.numel() in (1, d.values.numel()), f"optimizer state '{key}' has {t.numel()} entries"
        assert d.values.grad.shape == d.values.shape
        assert d.base.weight.grad is None
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(d.values) for d in deltas}
    for n, p in base.named_parameters():  # the base itself never changes
        if ".deltas." not in n:
            assert torch.equal(p, original[n.replace(".base_layer", "")])
    merged = model.merge_and_unload()
    for d, name in zip(deltas, ["fc1.weight", "fc2.weight"]):
        diff = (merged.get_parameter(name) - original[name]).flatten()
        changed = set(torch.nonzero(diff).flatten().tolist())
        assert changed and changed <= set(d.indices.tolist()), "an unselected weight changed"
        outside = torch.ones_like(diff, dtype=torch.bool)
        outside[d.indices] = False
        assert torch.equal(merged.get_parameter(name).flatten()[outside], original[name].flatten()[outside])


def test_nuclear_gradient_matches_autograd():
    model = up.adapt(_net(), up.SaraConfig(ratio=0.5, target_modules=["fc1"]))
    d = sparse_deltas(model, "default", SaraDelta)[0]
    with torch.no_grad():
        d.values.copy_(torch.randn(d.values.shape, generator=torch.Generator().manual_seed(0)))
    expected, = torch.autograd.grad(torch.linalg.matrix_norm(d.dense_delta(), "nuc"), d.values)
    torch.testing.assert_close(nuclear_grad(d), expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # dW = 0 at the start: no penalty direction
        d.values.zero_()
    assert torch.count_nonzero(nuclear_grad(d)) == 0


def test_nuclear_penalty_decreases_the_nuclear_norm():
    model = up.adapt(_net(), up.SaraConfig(ratio=0.5, nuclear_weight=1.0, schedule=[], target_modules=["fc1"]))
    d = sparse_deltas(model, "default", SaraDelta)[0]
    with torch.no_grad():
        d.values.copy_(torch.randn(d.values.shape, generator=torch.Generator().manual_seed(0)))
    opt = torch.optim.SGD([d.values], lr=0.05)
    hooks = up.TrainingHooks(model, opt, max_steps=20)
    norms = [nuclear_norm(model)]
    for _ in range(20):  # the penalty alone: zero task gradient
        d.values.grad = torch.zeros_like(d.values)
        hooks.before_optimizer_step()
        opt.step()
        hooks.step_end()
        norms.append(nuclear_norm(model))
    assert norms[-1] < 0.8 * norms[0]
    assert all(b <= a + 1e-6 for a, b in zip(norms, norms[1:]))


def test_reselection_keeps_trained_values_and_selects_smallest_current_weights():
    x, _ = _data(5)
    model = up.adapt(_net(), up.SaraConfig(ratio=0.1, schedule=[0.5], target_modules=["fc1", "fc2"]))
    assert isinstance(up.TrainingHooks(model, None, 4).callbacks.callbacks[0], SaraCallback)
    assert reselect_steps([0.5], 10) == [5]
    opt, hooks = _train(model, steps=4, hooks_steps=10)  # before the re-selection step
    deltas = sparse_deltas(model, "default", SaraDelta)
    with torch.no_grad():
        out_before = model(x)
    old_indices = [d.indices.clone() for d in deltas]
    # step 5 triggers the re-selection
    xb, yb = _data(1)
    seen = {}

    def record():  # after the optimizer step, before the re-selection
        seen["dense"] = [d.dense_delta().detach().clone() for d in deltas]
        with torch.no_grad():
            seen["out"] = model(x)

    hooked_step(model, opt, hooks, xb, yb, before_end=record)
    dense_step5, out_step5 = seen["dense"], seen["out"]
    assert hooks.callbacks.callbacks[0].rounds == 1
    for d, dense, old in zip(deltas, dense_step5, old_indices):
        torch.testing.assert_close(d.dense_delta(), dense, rtol=0, atol=0)  # nothing trained is lost
        assert torch.count_nonzero(d.values) == 0  # the new selection starts from zero
        assert not torch.equal(d.indices, old)
        current = (d.base.weight.detach() + dense).abs().flatten()
        mask = torch.zeros_like(current, dtype=torch.bool)
        mask[d.indices] = True
        assert current[mask].max() <= current[~mask].min()
        assert all(t.abs().sum() == 0 for t in opt.state[d.values].values() if t.numel() > 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), out_step5, rtol=1e-6, atol=1e-6)
        assert (model(x) - out_before).abs().max() > 0
    frozen_before = [d.frozen_values.clone() for d in deltas]
    for _ in range(3):  # keep training: the frozen round stays as it was
        hooked_step(model, opt, hooks, xb, yb)
    for d, f in zip(deltas, frozen_before):
        assert torch.equal(d.frozen_values, f)
    with torch.no_grad():
        unmerged = model(x)
        model.merge()
        torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
        model.unmerge()
        torch.testing.assert_close(model(x), unmerged, rtol=1e-6, atol=1e-6)


def test_save_load_round_trip_is_exact_with_index_and_value_tensors(tmp_path):
    x, _ = _data(5)
    model = up.adapt(_net(), up.SaraConfig(ratio=0.1, schedule=[0.5], target_modules=["fc1", "fc2"]))
    _train(model, steps=8)  # includes a re-selection, so the frozen round is non-zero
    with torch.no_grad():
        out = model(x)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "SARA" and cfg["ratio"] == 0.1 and cfg["schedule"] == [0.5]
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sorted(tensors) == sorted(f"base_model.model.{m}.sara_{k}" for m in ("fc1", "fc2")
                                     for k in ("values", "indices", "frozen_indices", "frozen_values"))
    assert tensors["base_model.model.fc1.sara_indices"].dtype == torch.int32  # flat positions
    assert tensors["base_model.model.fc1.sara_values"].numel() == int(0.1 * 12 * 20)
    loaded = up.AdaptedModel.from_pretrained(_net(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
    for a, b in zip(sparse_deltas(model, "default"), sparse_deltas(loaded, "default")):
        for key, t in a.state_dict().items():
            assert torch.equal(t, b.state_dict()[key]), key


def test_merge_equals_unmerged_and_unmerge_restores():
    base = _net()
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    x, _ = _data(5)
    model = up.adapt(base, up.SaraConfig(ratio=0.2, target_modules=["fc1", "fc2"]))
    _train(model, steps=6)
    with torch.no_grad():
        out = model(x)
        model.merge()
        torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-6)
        model.unmerge()
    for n, p in base.named_parameters():
        if ".deltas." not in n:
            torch.testing.assert_close(p, original[n.replace(".base_layer", "")], rtol=0, atol=1e-7)


def test_bad_config_values_name_the_field():
    with pytest.raises(up.ConfigError, match="ratio"):
        up.SaraConfig(ratio=0.0, target_modules=["fc1"])
    with pytest.raises(up.ConfigError, match="schedule"):
        up.SaraConfig(schedule=[0.7, 0.2], target_modules=["fc1"])
    with pytest.raises(up.ConfigError, match="nuclear_weight"):
        up.SaraConfig(nuclear_weight=-1, target_modules=["fc1"])
    with pytest.raises(up.ConfigError, match="max_steps"):
        up.TrainingHooks(up.adapt(_net(), up.SaraConfig(target_modules=["fc1"])), None, 0)


@pytest.mark.parametrize("method", [
    {"name": "sara", "ratio": 0.1, "schedule": [0.5], "nuclear_weight": 1e-3, "target_modules": ["query", "value"]},
    {"name": "spiel", "density": 0.05, "update_every": 2, "target_modules": ["query", "value"]},
])
def test_unipeft_train_runs_the_method_callbacks(tmp_path, method):
    """`unipeft train` with method: sara needs nothing else: the trainer calls SaRA's callback by itself."""
    from tests.train._helpers import adapter_tensors, make_tiny_bert, make_word_csv, summary, tiny_config
    from unipeft.train import config_from_dict, train_run

    model_dir = make_tiny_bert(tmp_path / "bert")
    data = make_word_csv(tmp_path / "words.csv", per_class=12)
    cfg = config_from_dict(tiny_config(model_dir, data, tmp_path / "run", method=method, max_steps=4, epochs=None))
    train_run(cfg, show_progress=False, log=lambda *_: None)
    tensors = adapter_tensors(tmp_path / "run")
    prefix = method["name"]
    keys = [k for k in tensors if k.endswith(f".{prefix}_values")]
    assert keys and all(tensors[k.replace("_values", "_indices")].numel() == tensors[k].numel() for k in keys)
    if prefix == "sara":  # re-selected after step 2 of 4: a frozen round holds the first selection's training
        frozen = [tensors[k.replace("_values", "_frozen_values")] for k in keys]
        assert all(torch.count_nonzero(f) > 0 for f in frozen)
    assert summary(tmp_path / "run")["steps"] == 4


@pytest.mark.parametrize("method", [
    {"name": "sara", "ratio": 0.1, "schedule": [0.5], "target_modules": ["query", "value"]},
    {"name": "spiel", "density": 0.05, "update_every": 2, "target_modules": ["query", "value"]},
    {"name": "lisa", "n_layers": 1, "interval": 2, "target_modules": ["query", "value"]},
])
def test_resume_from_a_checkpoint_gives_the_uninterrupted_adapter(tmp_path, method):
    """Checkpoints hold trainable tensors only: selections and frozen rounds travel in the callback state."""
    from tests.train._helpers import adapter_tensors, make_tiny_bert, make_word_csv, tiny_config
    from unipeft.train import TrainerCallback, config_from_dict, train_run

    class Crash(TrainerCallback):
        def on_step_end(self, ctx):
            if ctx.step == 5:  # after the checkpoint of step 4 (and after SaRA's re-selection at step 3)
                raise RuntimeError("simulated crash")

    model_dir = make_tiny_bert(tmp_path / "bert")
    data = make_word_csv(tmp_path / "words.csv", per_class=12)

    def cfg(out):
        return config_from_dict(tiny_config(model_dir, data, tmp_path / out, method=method, max_steps=6, epochs=None,
                                            save_every=2, eval_every=100))

    train_run(cfg("plain"), show_progress=False, log=lambda *_: None)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_run(cfg("resumed"), show_progress=False, log=lambda *_: None, callbacks=[Crash()])
    train_run(cfg("resumed"), resume=True, show_progress=False, log=lambda *_: None)
    a, b = adapter_tensors(tmp_path / "plain"), adapter_tensors(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], atol=2e-6, rtol=1e-5, msg=lambda m: f"{k}: {m}")
        else:
            assert torch.equal(a[k], b[k]), f"{k}: the selection differs after resuming"
