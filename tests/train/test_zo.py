"""Zeroth-order optimizers (MeZO, Sparse MeZO, SPSA-GC): exact perturb/restore, the update rules, learning,
determinism, no gradients, exact resumption, adapters, errors, and a forward-only run through train_run."""
from __future__ import annotations

import copy
import io
import json
import math

import pytest
import torch
from torch import nn

import unipeft as up
from unipeft.core.errors import ConfigError
from unipeft.train import TrainerCallback, config_from_dict, partial_dir, train_run
from unipeft.train.config import OptimizerConfig, ZerothOrderConfig
from unipeft.train.optim import build_optimizer
from unipeft.train.zo import MeZO, SparseMeZO, SpsaGC, build_zo, direction_seed

from ._helpers import tiny_config


def _regression(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A 8-16-1 tanh MLP and 256 noisy linear targets; its MSE starts at 10.57."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.01 * torch.randn(256, 1, generator=g)
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)), x, y


def _train(opt_cls, steps: int, seed: int = 1, **kwargs) -> tuple[nn.Module, torch.optim.Optimizer, float, float]:
    """`steps` forward-only steps on the regression; (model, optimizer, loss before, loss after)."""
    model, x, y = _regression()
    opt = opt_cls(model.parameters(), seed=seed, **kwargs)

    def closure():
        return nn.functional.mse_loss(model(x), y)

    with torch.no_grad():
        before = float(closure())
    for _ in range(steps):
        opt.step(closure)
    with torch.no_grad():
        return model, opt, before, float(closure())


def test_mezo_with_lr_zero_restores_every_parameter():
    model, x, y = _regression()
    start = [p.detach().clone() for p in model.parameters()]
    opt = MeZO(model.parameters(), lr=0.0, eps=1e-3, perturbations=2, seed=3)
    losses = []
    for _ in range(20):
        losses.append(float(opt.step(lambda: nn.functional.mse_loss(model(x), y))))
    for p, p0 in zip(model.parameters(), start):
        # +eps z, -2 eps z, +eps z: back to the start up to rounding (a missing restore moves it by ~eps)
        assert float((p.detach() - p0).norm() / p0.norm()) < 1e-6
    assert max(losses) - min(losses) < 1e-3 * losses[0]  # it evaluated around the same point every step


def test_mezo_and_spsa_gc_follow_their_update_rules_on_a_quadratic():
    # L(theta) = |theta|^2 / 2: the central difference is exact, g = theta . d, so the rules are checkable.
    def quadratic(p):
        return lambda: 0.5 * (p * p).sum()

    torch.manual_seed(0)
    theta0 = torch.randn(6, dtype=torch.float64)  # float64: the finite difference is then exact to ~1e-12
    p = nn.Parameter(theta0.clone())
    opt = MeZO([p], lr=0.1, weight_decay=0.5, eps=1e-3, perturbations=2, seed=7)
    opt.step(quadratic(p))
    zs = [opt._direction(p, direction_seed(7, 0, j, 0)) for j in range(2)]
    expected = theta0 - 0.1 * (sum((theta0 @ z) * z for z in zs) / 2 + 0.5 * theta0)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-9, atol=1e-9)

    p = nn.Parameter(theta0.clone())
    lr, beta = 0.05, 0.9
    opt = SpsaGC([p], lr=lr, eps=1e-3, momentum=beta, seed=7)
    theta, m = theta0.clone(), torch.zeros(6, dtype=torch.float64)
    for step in range(3):
        opt.step(quadratic(p))
        d = opt._direction(p, direction_seed(7, step, 0, 0))
        assert 0.5 <= float(d.abs().min()) and float(d.abs().max()) <= 1.0  # segmented uniform
        look = theta - beta * m  # BlackVIP: the estimate is taken at the look-ahead point
        m = beta * m + lr * (look @ d) / d
        theta = theta - m
        torch.testing.assert_close(p.detach(), theta, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], m, rtol=1e-9, atol=1e-9)


def test_mezo_reduces_a_regression_loss_without_gradients_or_state():
    model, opt, before, after = _train(MeZO, 200, lr=1e-2, eps=1e-3)
    assert before > 10.0 and after < 1.0  # measured 10.57 -> 0.51
    assert all(p.grad is None for p in model.parameters())
    assert len(opt.state) == 0 and opt.state_dict()["state"] == {}
    assert not any(isinstance(v, torch.Tensor) for v in opt.state_dict()["zeroth_order"].values())


def test_same_seed_same_run_other_seed_other_run():
    a, _, _, loss_a = _train(MeZO, 30, seed=5, lr=1e-2)
    b, _, _, loss_b = _train(MeZO, 30, seed=5, lr=1e-2)
    c, _, _, loss_c = _train(MeZO, 30, seed=6, lr=1e-2)
    assert loss_a == loss_b and all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert loss_a != loss_c and not torch.equal(a[0].weight, c[0].weight)


def test_sparse_mezo_touches_only_the_smallest_entries_of_each_tensor():
    model, x, y = _regression()
    fraction = 0.25
    opt = SparseMeZO(model.parameters(), lr=3e-2, eps=1e-3, sparse_fraction=fraction, weight_decay=0.1, seed=2)
    for _ in range(5):
        before = [p.detach().clone() for p in model.parameters()]
        opt.step(lambda: nn.functional.mse_loss(model(x), y))
        for p, p0 in zip(model.parameters(), before):
            k = math.ceil(fraction * p0.numel())
            mask = p0.abs() <= p0.abs().flatten().kthvalue(k).values  # chosen from this step's weights
            assert int(mask.sum()) == k
            assert torch.equal(p[~mask], p0[~mask])  # bit-identical outside the mask (weight decay too)
            assert bool((p[mask] != p0[mask]).all())


def test_sparse_mezo_reaches_a_lower_loss_than_mezo_at_a_large_lr():
    # At lr 3e-2 MeZO's dense estimate is noisy (10.57 -> 0.66 here); restricted to the smallest quarter of
    # each tensor, Sparse MeZO takes the same step size further (-> 0.42). Measured over the lr grid
    # {1e-3, 3e-3, 1e-2, 3e-2, 1e-1} and 4 seeds, the best Sparse MeZO beat the best MeZO in 3 of 4 seeds.
    _, _, _, dense = _train(MeZO, 200, seed=0, lr=3e-2)
    _, _, _, sparse = _train(SparseMeZO, 200, seed=0, lr=3e-2, sparse_fraction=0.25)
    assert sparse < 0.8 * dense and sparse < 0.5


def test_spsa_gc_learns_and_resumes_exactly_from_its_state_dict():
    _, _, before, after = _train(SpsaGC, 200, lr=1e-3, momentum=0.9)
    assert after < 0.1 * before  # measured 10.57 -> 0.50

    def closure_of(model, x, y):
        return lambda: nn.functional.mse_loss(model(x), y)

    model, x, y = _regression()
    ref = copy.deepcopy(model)
    opt_ref = SpsaGC(ref.parameters(), lr=1e-3, momentum=0.9, perturbations=2, seed=4)
    for _ in range(10):
        opt_ref.step(closure_of(ref, x, y))

    opt = SpsaGC(model.parameters(), lr=1e-3, momentum=0.9, perturbations=2, seed=4)
    for _ in range(4):
        opt.step(closure_of(model, x, y))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buf)
    sd = opt.state_dict()
    assert sd["zeroth_order"] == {"seed": 4, "steps": 4}
    assert sorted(sd["state"]) == list(range(4)) and all("momentum_buffer" in s for s in sd["state"].values())

    resumed, _, _ = _regression(seed=1)  # other weights, other seed: everything must come from the checkpoint
    blob = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    resumed.load_state_dict(blob["model"])
    opt2 = SpsaGC(resumed.parameters(), lr=1e-3, momentum=0.9, perturbations=2, seed=99)
    opt2.load_state_dict(blob["optimizer"])
    for _ in range(6):
        opt2.step(closure_of(resumed, x, y))
    for p, q in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(opt_ref.state[p]["momentum_buffer"], opt2.state[q]["momentum_buffer"])


class _Net(nn.Module):
    """Two named linears for LoRA to target."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 1)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_mezo_on_a_lora_adapter_changes_only_the_adapter():
    _, x, y = _regression()
    torch.manual_seed(0)
    model = up.adapt(_Net(), up.LoraConfig(r=2, alpha=4, target_modules=["fc1", "fc2"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and trained and all("lora" in n for n in trained)
    opt = build_optimizer(model, OptimizerConfig(name="mezo", lr=1e-2))
    assert isinstance(opt, MeZO)

    def closure():
        return nn.functional.mse_loss(model(x), y)

    with torch.no_grad():
        before = float(closure())
    for _ in range(100):
        opt.step(closure)
    with torch.no_grad():
        after = float(closure())
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())  # the base is never written
    assert all(not torch.equal(params[n], v) for n, v in trained.items())
    assert after < 0.3 * before  # measured 10.57 -> 1.59 (lr 3e-2 diverges here)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(("field", "value", "name"), [
    ("eps", 0.0, "mezo"), ("eps", -1e-3, "spsa_gc"), ("perturbations", 0, "mezo"),
    ("sparse_fraction", 0.0, "sparse_mezo"), ("sparse_fraction", 1.5, "sparse_mezo"),
    ("momentum", 1.0, "spsa_gc"), ("momentum", -0.1, "spsa_gc"),
])
def test_bad_zo_fields_name_the_field(field, value, name):
    model, _, _ = _regression()
    cfg = OptimizerConfig(name=name, zo=ZerothOrderConfig(**{field: value}))
    with pytest.raises(ConfigError, match=rf"optimizer\.zo\.{field}: expected .*got {value}"):
        build_optimizer(model, cfg)


@pytest.mark.parametrize("cls", [MeZO, SparseMeZO, SpsaGC])
def test_no_trainable_tensor_names_the_optimizer(cls):
    model, _, _ = _regression()
    model.requires_grad_(False)
    with pytest.raises(ConfigError, match=rf"optimizer\.name={cls.name}: the model has no trainable tensor"):
        cls(model.parameters())
    groups = [{"params": list(model.parameters()), "lr": 1e-3, "weight_decay": 0.0, "name": "default"}]
    with pytest.raises(ConfigError, match=rf"optimizer\.name={cls.name}: the model has no trainable tensor"):
        build_zo(model, groups, OptimizerConfig(name=cls.name))


class _NoGrad(TrainerCallback):
    """Records, after every step, whether any parameter holds a .grad."""

    def __init__(self) -> None:
        self.grads: list[bool] = []

    def on_step_end(self, ctx):
        self.grads.append(any(p.grad is not None for p in ctx.model.parameters()))


def _zo_run(tiny_bert, word_csv, out, **extra):
    base = dict(optimizer={"name": "mezo", "lr": 2e-2}, schedule={"name": "constant"}, max_steps=150,
                eval_every=1000, log_every=5)
    base.update(extra)
    return config_from_dict(tiny_config(tiny_bert, word_csv, out, **base))


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "split" not in r]


def test_mezo_run_through_train_run_learns_without_gradients(tiny_bert, word_csv, tmp_path):
    probe = _NoGrad()
    out = tmp_path / "run"
    summary = train_run(_zo_run(tiny_bert, word_csv, out), show_progress=False, log=lambda *_: None,
                        callbacks=[probe])
    assert summary["status"] == "complete" and summary["steps"] == 150
    assert len(probe.grads) == 150 and not any(probe.grads)
    losses = _losses(out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "split" not in line]
    assert all("grad_norm" not in r for r in rows)  # nothing to clip or report
    # LoRA r=4 on the tiny BERT, batch 8: measured 1.099 (chance, ln 3) -> 0.84 over the last 3 windows
    assert losses[0] > 1.05 and sum(losses[-3:]) / 3 < 0.92


def test_spsa_gc_run_resumes_exactly(tiny_bert, word_csv, tmp_path):
    class Crash(Exception):
        pass

    class CrashAt(TrainerCallback):
        def on_step_end(self, ctx):
            if ctx.step == 7:
                raise Crash

    extra = dict(optimizer={"name": "spsa_gc", "lr": 2e-3, "weight_decay": 0.1, "zo": {"momentum": 0.9}},
                 schedule={"name": "linear", "warmup_steps": 2}, max_steps=12, save_every=5)
    quiet = dict(show_progress=False, log=lambda *_: None)
    train_run(_zo_run(tiny_bert, word_csv, tmp_path / "ref", **extra), **quiet)
    out = tmp_path / "run"
    with pytest.raises(Crash):
        train_run(_zo_run(tiny_bert, word_csv, out, **extra), callbacks=[CrashAt()], **quiet)
    assert (partial_dir(out) / "checkpoints" / "step-0000005").is_dir()
    assert train_run(_zo_run(tiny_bert, word_csv, out, **extra), resume=True, **quiet)["resumed"]
    from ._helpers import adapter_tensors

    ref, got = adapter_tensors(tmp_path / "ref"), adapter_tensors(out)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert _losses(out) == _losses(tmp_path / "ref")


def test_bad_zo_field_fails_before_the_run_writes_anything(tiny_bert, word_csv, tmp_path):
    out = tmp_path / "run"
    cfg = _zo_run(tiny_bert, word_csv, out, optimizer={"name": "mezo", "zo": {"eps": 0.0}})
    with pytest.raises(ConfigError, match=r"optimizer\.zo\.eps"):
        train_run(cfg, show_progress=False, log=lambda *_: None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_mezo_on_two_processes_matches_one(tiny_bert, word_csv, tmp_path):
    # Every process draws the same directions (seeded from the run seed) and sees the loss of the whole
    # global batch (all-reduced), so they take the same step; losses agree to summation-order rounding.
    import os
    import subprocess
    import sys

    from ._helpers import adapter_tensors, summary, write_config

    common = dict(optimizer={"name": "mezo", "lr": 2e-2}, schedule={"name": "constant"}, max_steps=6,
                  eval_every=3, log_every=1)
    one = tiny_config(tiny_bert, word_csv, tmp_path / "one", **common)
    config = write_config(tmp_path / "two.yaml", **tiny_config(tiny_bert, word_csv, tmp_path / "two", grad_accum=2,
                                                               **common))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "unipeft.cli", "train", str(config), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train_run(config_from_dict(one), show_progress=False, log=lambda *_: None)
    assert summary(tmp_path / "two")["world_size"] == 2
    a, b = adapter_tensors(tmp_path / "one"), adapter_tensors(tmp_path / "two")
    assert a.keys() == b.keys()
    assert max(float(t.abs().max()) for k, t in a.items() if "lora_B" in k) > 1e-3  # it moved
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(_losses(tmp_path / "one")), torch.tensor(_losses(tmp_path / "two")),
                               atol=1e-5, rtol=0)
