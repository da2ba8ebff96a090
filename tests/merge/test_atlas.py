"""aTLAS (merge/atlas.py): learned per-block coefficients over the tensors of existing adapters."""
from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import unipeft as up
from unipeft.merge.atlas import atlas_merge, default_loss

from ..invariants.cases import (CASES, adapt_case, adapter_params, applicable, build_model, loading, make_batch,
                                perturb, run)

LORA = dict(r=4, alpha=8, target_modules=["fc1", "fc2", "head"])


class Net(nn.Module):
    """Two hidden ReLU layers and a class head; returns an object with `.logits` as transformers models do."""

    def __init__(self, classes: int = 2, hidden: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x, labels=None):
        return types.SimpleNamespace(logits=self.head(torch.relu(self.fc2(torch.relu(self.fc1(x))))))


def _model(names=("a", "b")) -> up.AdaptedModel:
    """A seeded Net with one perturbed (non-identity) LoRA adapter per name."""
    torch.manual_seed(0)
    model = up.adapt(Net(), up.LoraConfig(**LORA), names[0])
    for n in names[1:]:
        model.add_adapter(n, up.LoraConfig(**LORA))
    for i, n in enumerate(names):
        perturb(model, n, seed=i + 1)
    return model


def _batches(seed: int, count: int, rows: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(rows, 8, generator=g), "labels": torch.randint(0, 2, (rows,), generator=g)}
            for _ in range(count)]


def _combined(coefs: torch.Tensor, taus: list[torch.Tensor]) -> torch.Tensor:
    """sum_k coefs[k] * taus[k] in source order (the order atlas_merge accumulates in)."""
    out = coefs[0] * taus[0]
    for k in range(1, len(taus)):
        out = out + coefs[k] * taus[k]
    return out


def test_zero_steps_give_init_times_the_sum_exactly_and_save_like_any_adapter(tmp_path):
    model = _model(("a", "b", "c"))
    taus = [{k: v.detach().clone() for k, v in adapter_params(model, n).items()} for n in "abc"]
    name, coefs = atlas_merge(model, ["a", "b", "c"], [], steps=0, init=0.3)
    assert name == "atlas" and sorted(model.peft_config) == ["a", "atlas", "b", "c"]
    assert model.active_adapters == ["a"], "the merged adapter must not be activated"
    merged = adapter_params(model, name)
    assert sorted(coefs) == sorted(merged) == ["fc1.lora_A.weight", "fc1.lora_B.weight", "fc2.lora_A.weight",
                                                "fc2.lora_B.weight", "head.lora_A.weight", "head.lora_B.weight"]
    lam = torch.tensor(0.3)
    for key, value in merged.items():
        assert torch.equal(coefs[key], torch.full((3,), 0.3))
        assert torch.equal(value, lam * taus[0][key] + lam * taus[1][key] + lam * taus[2][key]), key
    # Default init: 1/K per source, i.e. the plain average.
    name2, coefs2 = atlas_merge(model, ["a", "b", "c"], [], steps=0)
    assert name2 == "atlas_1"
    third = torch.tensor(1.0 / 3.0)
    for key, value in adapter_params(model, name2).items():
        assert torch.equal(coefs2[key], torch.full((3,), 1.0 / 3.0))
        assert torch.equal(value, third * taus[0][key] + third * taus[1][key] + third * taus[2][key]), key
    # The merged adapter is plain parameters: it saves and loads like any adapter.
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    model.set_adapter(name)
    expected = model(x=x).logits
    model.save_pretrained(tmp_path, adapter_names=[name])
    torch.manual_seed(0)
    loaded = up.AdaptedModel.from_pretrained(Net(), tmp_path / name)
    assert torch.equal(loaded(x=x).logits, expected)
    saved = model.adapter_state_dict(name)
    assert all(torch.equal(v, saved[k]) for k, v in loaded.adapter_state_dict("default").items())


def test_only_the_lambdas_train_and_the_model_is_restored():
    model = _model()
    model.train()
    model.set_adapter("a")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    taus = [{k: v.detach().clone() for k, v in adapter_params(model, n).items()} for n in "ab"]
    rng = torch.get_rng_state()
    name, coefs = atlas_merge(model, ["a", "b"], _batches(5, 3), steps=6, lr=0.05, seed=1)
    for n, p in model.named_parameters():
        if n in before:  # the base and both sources: bit for bit, and no gradient was ever stored
            assert torch.equal(p, before[n]), n
            assert p.grad is None, n
            assert p.requires_grad == flags[n], n
    assert model.active_adapters == ["a"] and model.training and model.base_model.fc1.training
    assert torch.equal(torch.get_rng_state(), rng), "atlas_merge must not consume the caller's RNG"
    assert all(not p.requires_grad and p.grad is None for p in adapter_params(model, name).values())
    moved = [k for k, c in coefs.items() if not torch.equal(c, torch.full((2,), 0.5))]
    assert sorted(moved) == sorted(coefs), f"every block has a gradient here, yet only {moved} moved"
    for key, value in adapter_params(model, name).items():  # the written tensors are the learned combination
        assert torch.equal(value, _combined(coefs[key], [taus[0][key], taus[1][key]])), key
    # Same seed, same result; another batch order, another result.
    _, again = atlas_merge(model, ["a", "b"], _batches(5, 3), steps=6, lr=0.05, seed=1)
    _, other = atlas_merge(model, ["a", "b"], _batches(5, 3), steps=6, lr=0.05, seed=2)
    assert all(torch.equal(again[k], coefs[k]) for k in coefs)
    assert any(not torch.equal(other[k], coefs[k]) for k in coefs)


def test_an_active_composition_block_is_restored():
    model = _model()
    block = up.Average("a", "b", weights=[0.25, 0.75])
    model.set_adapter(block)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    expected = model(x=x).logits
    atlas_merge(model, ["a", "b"], _batches(5, 2), steps=2)
    assert model._ctx.composition is block and model.active_adapters == ["a", "b"]
    assert torch.equal(model(x=x).logits, expected)


# ---- a toy problem: two tasks on disjoint input regions --------------------------------------
def _task(g: torch.Generator, rows: int, task: int, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inputs with x0 >= 2 (task 0) or x0 <= -2 (task 1); label = sign of w . x[1:]."""
    x = torch.randn(rows, 8, generator=g)
    x[:, 0] = (1.0 if task == 0 else -1.0) * (2.0 + x[:, 0].abs())
    return {"x": x, "labels": (x[:, 1:] @ w > 0).long()}


def _mixed(g, rows, ws) -> dict[str, torch.Tensor]:
    a, b = _task(g, rows, 0, ws[0]), _task(g, rows, 1, ws[1])
    return {k: torch.cat([a[k], b[k]]) for k in a}


def _mean_loss(model, name, batches) -> float:
    model.set_adapter(name)
    with torch.no_grad():
        return sum(float(default_loss(model(**b), b)) for b in batches) / len(batches)


def test_learned_coefficients_beat_the_plain_average_on_held_out_batches():
    torch.manual_seed(0)
    model = up.adapt(Net(), up.LoraConfig(**LORA), "t0")
    model.add_adapter("t1", up.LoraConfig(**LORA))
    g = torch.Generator().manual_seed(1)
    ws = torch.randn(7, generator=g), torch.randn(7, generator=g)
    for t in (0, 1):  # each adapter learns its own task only
        model.set_adapter(f"t{t}")
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(300):
            b = _task(g, 64, t, ws[t])
            loss = default_loss(model(**b), b)
            opt.zero_grad()
            loss.backward()
            opt.step()
    train = [_mixed(g, 32, ws) for _ in range(4)]  # a few labelled batches of both tasks
    held = [_mixed(g, 128, ws) for _ in range(2)]
    avg, _ = atlas_merge(model, ["t0", "t1"], train, name="avg", steps=0, init=0.5)
    name, coefs = atlas_merge(model, ["t0", "t1"], train, init=0.5)  # defaults: 50 steps, lr 1e-2
    single = [_mean_loss(model, f"t{t}", held) for t in (0, 1)]
    avg_loss, atlas_loss = _mean_loss(model, avg, held), _mean_loss(model, name, held)
    # Measured (torch 2.13, CPU, 1 thread): single adapters 2.13 / 2.23 (each fails the other task),
    # average 0.404, aTLAS 0.269.
    assert min(single) > 1.5
    assert 0.35 < avg_loss < 0.45, avg_loss
    assert atlas_loss < 0.30, atlas_loss
    assert avg_loss - atlas_loss > 0.1, (avg_loss, atlas_loss)  # floor: a margin of 0.1 nats
    assert len(coefs) == 6


# ---- bad input -------------------------------------------------------------------------------
def _snapshot(model):
    configs = {n: c.to_dict() for n, c in model.peft_config.items()}
    tensors = {n: {k: v.detach().clone() for k, v in adapter_params(model, n).items()} for n in model.peft_config}
    return configs, tensors, model.active_adapters


def _assert_unchanged(model, snap):
    configs, tensors, active = snap
    assert {n: c.to_dict() for n, c in model.peft_config.items()} == configs
    for n, params in tensors.items():
        now = adapter_params(model, n)
        assert sorted(now) == sorted(params) and all(torch.equal(now[k], params[k]) for k in params), n
    assert model.active_adapters == active


def _add_ia3(model):
    model.add_adapter("ia3", up.IA3Config(target_modules=["fc1", "fc2", "head"]))


def _add_r2(model):
    model.add_adapter("r2", up.LoraConfig(**{**LORA, "r": 2}))


BAD = [
    ("different methods", _add_ia3, dict(sources=["a", "ia3"]), r"one method; 'a' is lora, 'ia3' is ia3"),
    ("other config", _add_r2, dict(sources=["a", "r2"]), r"differ in config fields \['r'\]"),
    ("unknown source", None, dict(sources=["a", "nope"]), r"'nope' is not an adapter.*\['a', 'b'\]"),
    ("duplicate source", None, dict(sources=["a", "a"]), "more than once"),
    ("sources as a string", None, dict(sources="ab"), "non-empty list of adapter names"),
    ("no sources", None, dict(sources=[]), "non-empty list of adapter names"),
    ("empty batches", None, dict(batches=[]), "at least one labelled batch to train 50 steps, got none"),
    ("no labels", None, dict(batches=[{"x": torch.zeros(2, 8)}]), r"batches\[0\] has no 'labels'"),
    ("batch not a dict", None, dict(batches=[torch.zeros(2, 8)]), r"batches\[0\] must be a dict"),
    ("taken name", None, dict(name="b"), "adapter named 'b' already exists"),
    ("init length", None, dict(init=[0.5, 0.5, 0.5]), r"init must be one finite number or 2"),
    ("negative steps", None, dict(steps=-1), "steps must be an integer >= 0"),
    ("zero lr", None, dict(lr=0.0), "lr must be a finite number > 0"),
]


# Sources that are not a list of this model's adapter names: the ConfigError of every merge's checks.
NOT_NAMES = {k: up.ConfigError for k in ("unknown source", "duplicate source", "sources as a string", "no sources")}


@pytest.mark.parametrize("what,setup,kwargs,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_and_leaves_the_model_unchanged(what, setup, kwargs, message):
    model = _model()
    if setup is not None:
        setup(model)
    snap = _snapshot(model)
    args = {"sources": ["a", "b"], "batches": _batches(7, 2), **kwargs}
    with pytest.raises(NOT_NAMES.get(what, up.MergeError), match=message):
        atlas_merge(model, args.pop("sources"), args.pop("batches"), **args)
    _assert_unchanged(model, snap)


def test_a_failure_during_training_removes_the_new_adapter_and_restores_the_model():
    model = _model()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    snap = _snapshot(model)

    def broken(outputs, batch):
        raise RuntimeError("loss exploded")

    with pytest.raises(RuntimeError, match="loss exploded"):
        atlas_merge(model, ["a", "b"], _batches(7, 2), loss_fn=broken)
    _assert_unchanged(model, snap)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_sources_with_different_fixed_tensors_are_refused():
    torch.manual_seed(0)
    cfg = dict(r=2, alpha=4, target_modules=["fc1", "fc2"])
    model = up.adapt(Net(), up.LoraFAConfig(**cfg), "a")
    model.add_adapter("b", up.LoraFAConfig(**cfg))  # another frozen random A
    snap = _snapshot(model)
    with pytest.raises(up.MergeError, match=r"at 'fc1', the fixed buffers \['lora_A.weight'\].*differ"):
        atlas_merge(model, ["a", "b"], _batches(7, 1))
    _assert_unchanged(model, snap)


# ---- every method, through the one generic path -------------------------------------------------
def _kind(case) -> str | None:
    kinds = ("bert", "llama") if case.calibration == "gradients" else ("mlp", "bert", "conv", "embgpt", "llama", "kg")
    return next((k for k in kinds if applicable(case, k)), None)


def _fixed_state_differs(model, a, b) -> bool:
    """Independent check: some non-parameter state of adapters a and b differs."""
    def fixed(n):
        mods = {d.path: d for d in model.deltas(n)}
        if n in model.banks:
            mods["bank"] = model.banks[n]
        return {f"{p}.{k}": v for p, m in mods.items() for k, v in m.state_dict().items()
                if k not in dict(m.named_parameters())}
    fa, fb = fixed(a), fixed(b)
    return any(not torch.equal(fa[k], fb[k]) for k in fa)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_every_method_merges_through_the_generic_path(case):
    kind = _kind(case)
    if kind is None:
        pytest.skip(f"{case.id} adapts nothing in the toy models")
    model = adapt_case(case, kind, build_model(kind), "s0")
    adapt_case(case, kind, None, "s1", into=model)
    perturb(model, "s0", seed=1)
    perturb(model, "s1", seed=2)
    batch = make_batch(kind)
    target = torch.randn(run(model, batch).shape, generator=torch.Generator().manual_seed(0))
    # After that forward: CPT projects its offsets in place when it runs.
    taus = [{k: v.detach().clone() for k, v in adapter_params(model, n).items()} for n in ("s0", "s1")]

    def mse(outputs, _batch):
        out = outputs.logits if hasattr(outputs, "logits") else outputs
        return ((out - target) ** 2).mean()

    with loading(case, kind):
        if _fixed_state_differs(model, "s0", "s1"):
            with pytest.raises(up.MergeError, match="fixed buffers"):
                atlas_merge(model, ["s0", "s1"], [batch], loss_fn=mse)
            assert sorted(model.peft_config) == ["s0", "s1"]
            return
        name, coefs = atlas_merge(model, ["s0", "s1"], [], steps=0, init=0.3)
        lam = torch.tensor(0.3)
        merged = adapter_params(model, name)
        assert sorted(coefs) == sorted(merged) == sorted(taus[0])
        for key, value in merged.items():
            assert torch.equal(value, lam * taus[0][key] + lam * taus[1][key]), key
        trained, coefs2 = atlas_merge(model, ["s0", "s1"], [batch], steps=3, lr=0.05, loss_fn=mse)
    assert any(not torch.equal(c, torch.full((2,), 0.5)) for c in coefs2.values()), "no coefficient moved"
    for n in ("s0", "s1"):
        now = adapter_params(model, n)
        assert all(torch.equal(now[k], taus[int(n[1])][k]) for k in now), f"source {n} changed"
    for key, value in adapter_params(model, trained).items():
        assert torch.equal(value, _combined(coefs2[key], [taus[0][key], taus[1][key]])), key
