"""Managing several adapters: several active at once, mixed batches of mixed methods, trainable_report."""
from __future__ import annotations

import pytest
import torch

import unipeft as up
from unipeft.core.site import BASE_NAME

from ..invariants.cases import adapter_params, build_model, make_batch, perturb, run


def _mlp(*adapters):
    """The toy MLP with the given (name, config) adapters, each perturbed with its own seed."""
    (name, cfg), *rest = adapters
    adapted = up.adapt(build_model("mlp"), cfg, name)
    for n, c in rest:
        adapted.add_adapter(n, c)
    for seed, (n, _) in enumerate(adapters, start=1):
        perturb(adapted, n, seed=seed, scale=0.3)
    return adapted


def test_two_active_lora_adapters_add_their_deltas_at_the_layer():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 3)
    x = torch.randn(4, 6)
    base = lin(x).detach()
    model = torch.nn.Sequential(lin)
    adapted = up.adapt(model, up.LoraConfig(r=2, target_modules=["0"]), "a")
    adapted.add_adapter("b", up.LoraConfig(r=3, alpha=1, target_modules=["0"]))
    perturb(adapted, "a", seed=1)
    perturb(adapted, "b", seed=2)
    outs = {}
    for active in (["a"], ["b"], ["a", "b"]):
        adapted.set_adapter(active)
        outs["+".join(active)] = run(adapted, {"input": x})
    torch.testing.assert_close(outs["a+b"] - base, (outs["a"] - base) + (outs["b"] - base), rtol=1e-5, atol=1e-6)
    assert (outs["a"] - base).abs().max() > 1e-3 and (outs["b"] - base).abs().max() > 1e-3


_STACKABLE = {
    "lora": lambda: up.LoraConfig(r=2, target_modules=["fc1", "fc2"]),
    "ia3_in": lambda: up.IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=["fc1", "fc2"]),
    "ia3_out": lambda: up.IA3Config(target_modules=["fc1", "fc2"]),
    "dora": lambda: up.LoraConfig(r=2, use_dora=True, target_modules=["fc1", "fc2"]),
    "bitfit": lambda: up.BitFitConfig(target_modules=["fc1", "fc2", "norm"]),
    "ln": lambda: up.LNTuningConfig(),
}
# DoRA normalises by the column norm of the site's *base* weight and takes `base_out - base.bias`
# as the plain output, so next to a delta that changes the input, the bias, or the output before
# it, the unmerged forward and the merge (made against the weights merged so far) disagree.
_DORA_NOT_STACKABLE = {("lora", "dora"), ("ia3_in", "dora"), ("ia3_out", "dora"), ("dora", "ia3_in"),
                       ("dora", "bitfit"), ("bitfit", "dora")}
_PAIRS = [pytest.param(a, b, id=f"{a}+{b}", marks=[pytest.mark.xfail(
    reason="known limitation: DoRA stacked with another delta on one site is not merge-consistent", strict=True)]
    if (a, b) in _DORA_NOT_STACKABLE else []) for a in _STACKABLE for b in _STACKABLE if a != b]


@pytest.mark.parametrize("first, second", _PAIRS)
def test_several_active_adapters_merge_to_the_same_output(first, second):
    """Whatever kinds of delta share a site (input-, weight-, output-side), merging them all
    reproduces the unmerged output, and unmerging restores the base weights."""
    adapted = _mlp((first, _STACKABLE[first]()), (second, _STACKABLE[second]()))
    batch = make_batch("mlp")
    weights = {n: p.detach().clone() for n, p in adapted.base_model.named_parameters() if ".deltas." not in n}
    adapted.set_adapter([first, second])
    both = run(adapted, batch)
    for single in (first, second):
        adapted.set_adapter(single)
        assert (run(adapted, batch) - both).abs().max() > 1e-3, f"{single} alone gives the stacked output"
    adapted.set_adapter([first, second])
    adapted.merge()
    torch.testing.assert_close(run(adapted, batch), both, rtol=1e-5, atol=1e-5)
    adapted.unmerge()
    for n, p in adapted.base_model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(run(adapted, batch), both, rtol=1e-6, atol=1e-6)


def test_set_adapter_unknown_name_raises_and_keeps_the_active_set():
    adapted = _mlp(("a", up.LoraConfig(r=2, target_modules=["fc1"])))
    with pytest.raises(up.ConfigError, match="no adapter named 'zz'"):
        adapted.set_adapter(["a", "zz"])
    assert adapted.active_adapters == ["a"]
    assert all(p.requires_grad for p in adapter_params(adapted, "a").values())


def test_invalid_adapter_names_raise():
    adapted = _mlp(("a", up.LoraConfig(r=2, target_modules=["fc1"])))
    for bad in ("", "x.y", BASE_NAME, "a", "half", "to", "forward"):
        with pytest.raises(up.ConfigError):
            adapted.add_adapter(bad, up.LoraConfig(r=2, target_modules=["fc1"]))
    assert sorted(adapted.peft_config) == ["a"]


def test_mixed_batch_of_different_methods_and_ranks():
    adapters = [("r2", up.LoraConfig(r=2, target_modules=["fc1", "fc2"])),
                ("r4", up.LoraConfig(r=4, target_modules=["fc1"])),
                ("dora", up.LoraConfig(r=2, use_dora=True, target_modules=["fc2"])),
                ("ia3", up.IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=["fc1"])),
                ("bias", up.BitFitConfig()),
                ("ln", up.LNTuningConfig())]
    adapted = _mlp(*adapters)
    g = torch.Generator().manual_seed(5)
    batch = {"x": torch.randn(9, 8, generator=g)}
    rows = ["ia3", "r2", BASE_NAME, "dora", "r4", "bias", "ln", "r2", "ia3"]
    expected = {}
    for name, _ in adapters:
        adapted.set_adapter(name)
        expected[name] = run(adapted, batch)
    with adapted.disable_adapters():
        expected[BASE_NAME] = run(adapted, batch)
    mixed = run(adapted, batch, adapter_names=rows)
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], expected[name][i], rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"row {i} ({name}): {m}")
    # LoRA only, equal ranks: the batched path.
    rows = ["r2", BASE_NAME, "r2", BASE_NAME, "r2", "r2", BASE_NAME, "r2", "r2"]
    mixed = run(adapted, batch, adapter_names=rows)
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], expected[name][i], rtol=1e-5, atol=1e-5)


def test_mixed_batch_bad_names_raise():
    adapted = _mlp(("a", up.LoraConfig(r=2, target_modules=["fc1"])))
    batch = make_batch("mlp")
    with pytest.raises(up.ConfigError, match="no adapter named 'zz'"):
        run(adapted, batch, adapter_names=["a", "zz", "a", "a", "a"])
    with pytest.raises(ValueError, match="one adapter name per input row"):
        run(adapted, batch, adapter_names=["a", "a"])
    # The failed calls leave no grouping behind.
    torch.testing.assert_close(run(adapted, batch), run(adapted, batch, adapter_names=["a"] * 5), rtol=1e-6,
                               atol=1e-6)


def test_trainable_report_counts():
    model = build_model("mlp")
    base_total = sum(p.numel() for p in model.parameters())
    assert base_total == (8 * 16 + 16) + (16 + 16) + (16 * 4 + 4) == 244
    adapted = up.adapt(model, up.LoraConfig(r=2, target_modules=["fc1", "fc2"]), "a")
    lora = 2 * 8 + 16 * 2 + 2 * 16 + 4 * 2  # A (r x in) and B (out x r) of fc1 and fc2
    rep = up.trainable_report(adapted)
    assert (rep.trainable, rep.total) == (lora, base_total + lora) == (88, 332)
    assert rep.percent == pytest.approx(100 * 88 / 332)
    assert rep.summary() == "trainable params: 88 || all params: 332 || trainable%: 26.5060"
    assert rep.rows == [("fc1", "a", "lora", 48), ("fc2", "a", "lora", 40)]
    assert adapted.get_nb_trainable_parameters() == (88, 332)

    adapted.add_adapter("b", up.IA3Config(target_modules=["fc1"], modules_to_save=["fc2"]))
    ia3, saved = 16, 16 * 4 + 4
    rep = up.trainable_report(adapted)
    assert (rep.trainable, rep.total) == (lora, base_total + lora + ia3 + saved)
    assert sorted(rep.rows) == sorted([("fc1", "a", "lora", 48), ("fc2", "a", "lora", 40), ("fc1", "b", "ia3", 0),
                                       ("fc2", "b", "ia3", 0)])
    adapted.set_adapter("b")
    rep = up.trainable_report(adapted)
    assert rep.trainable == ia3 + saved
    assert ("fc2", "b", "ia3", saved) in rep.rows and ("fc1", "a", "lora", 0) in rep.rows
    adapted.set_adapter(["a", "b"])
    assert up.trainable_report(adapted).trainable == lora + ia3 + saved
    assert "fc1" in str(up.trainable_report(adapted))


def test_trainable_report_counts_tied_weights_once():
    model = build_model("gpt2")
    unique = sum(p.numel() for p in model.parameters())  # parameters() already de-duplicates
    assert unique < sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    adapted = up.adapt(model, up.LoraConfig(r=2, target_modules=["c_attn"]))
    lora = 2 * (2 * 16 + 48 * 2)
    rep = up.trainable_report(adapted)
    assert (rep.trainable, rep.total) == (lora, unique + lora)
    assert up.trainable_report(build_model("mlp")).trainable == 244  # a plain module: everything trains
