"""A toy method added the way docs/adding_a_method.md describes, from this file alone.

It is registered by a module-scoped fixture (not at import: every xdist worker imports every
test file while collecting, so an import-time registration would leak into the other files'
registry-wide tests on the workers that never run this file) and unregistered on teardown.
"""
from __future__ import annotations

import copy
import importlib
import inspect
import itertools
import pkgutil
import re
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

import unipeft as up
from unipeft.cli import main
from unipeft.core.errors import TargetError
from unipeft.core.fields import positive_int, positive_number
from unipeft.core.hooks import TrainerCallback
from unipeft.core.registry import unregister

import tests.invariants as invariants
from tests.invariants import cases

NAME = "toy_scale_shift_test"  # unique: no other file registers it


# ---- the method (what a file in src/unipeft/methods/ would hold) --------------------------
class ToyGainBank(up.Bank):
    """The adapter's shared module: one learnable gain every site multiplies by (init 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1))


class ToyStepCounter(TrainerCallback):
    """Counts optimizer steps; holds the shared gain still during warm-up (drops its gradient)."""

    created: list["ToyStepCounter"] = []  # test-only: lets the tests find the trainer's instance

    def __init__(self, gain: nn.Parameter, warmup_steps: int) -> None:
        self.gain, self.warmup_steps, self.steps = gain, warmup_steps, 0
        self.group_lrs: list[dict[str, float]] = []  # test-only: the optimizer's groups at each step
        ToyStepCounter.created.append(self)

    def on_before_optimizer_step(self, ctx) -> None:
        if ctx.step < self.warmup_steps:
            self.gain.grad = None  # the optimizer skips it (no update, no weight decay)

    def on_step_end(self, ctx) -> None:
        self.steps += 1
        self.group_lrs.append({g.get("name"): g["lr"] for g in ctx.optimizer.param_groups})

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = state["steps"]


@dataclass
class ToyScaleShiftConfig(up.AdapterConfig):
    """Per-output-feature scale (init 1) and shift (init 0), times one shared gain (init 1)."""

    peft_type = "TOY_SCALE_SHIFT"

    warmup_steps: int = positive_int(1)  # optimizer steps before the shared gain starts to learn
    shift_lr: float = positive_number(5e-3)  # the shifts' own learning rate

    def make_bank(self, model, targets):
        return ToyGainBank()

    def training_callbacks(self, model, adapter_name):
        return [ToyStepCounter(model.banks[adapter_name].gain, self.warmup_steps)]

    def optimizer_groups(self, adapter_name):
        return [{"params": rf"\.deltas\.{re.escape(adapter_name)}\.toy_shift$", "lr": self.shift_lr}]

    @classmethod
    def example_fields(cls, candidates):
        return {"warmup_steps": 2}


class ToyScaleShiftDelta(up.Delta):
    """out = base_out * (toy_scale * gain) + toy_shift, over the last (feature) dimension."""

    kind = "output"
    weight_dependent = True  # delta_weight reads the base weight: core caches it to unmerge exactly

    def __init__(self, base: nn.Module, config: ToyScaleShiftConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        if base.bias is None:
            raise TargetError(f"{config.method}: '{path}' has no bias to merge the shift into")
        self.toy_scale = nn.Parameter(torch.ones(base.out_features))
        self.toy_shift = nn.Parameter(torch.zeros(base.out_features))

    def factor(self) -> torch.Tensor:
        return self.toy_scale * self.bank.gain

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return (base_out * self.factor() + self.toy_shift).to(base_out.dtype)

    def delta_weight(self) -> dict[str, torch.Tensor]:
        g = self.factor() - 1  # W' = f * W (rows), b' = f * b + shift
        return {"weight": self.base.weight * g[:, None], "bias": self.base.bias * g + self.toy_shift}


def _linear_with_bias(path: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and module.bias is not None


CAPS = up.Capabilities(mergeable=True, mixed_batch=True, layer_types=(nn.Linear,))


@pytest.fixture(scope="module", autouse=True)
def registered():
    spec = up.register(NAME, ToyScaleShiftConfig, ToyScaleShiftDelta, CAPS, default_targets=_linear_with_bias)
    yield spec
    unregister(NAME)


# ---- a. registry, public names, field rules, frozen copies ---------------------------------
def test_registered_with_its_capabilities():
    row = next(r for r in up.capability_table() if r["method"] == NAME)
    assert row == {"method": NAME, "peft_type": "TOY_SCALE_SHIFT", "mergeable": True, "mixed_batch": True,
                   "quantized_base": False, "peft_compatible": False, "identity_at_init": True,
                   "layer_types": ["Linear"], "strategies": {}}
    assert up.ToyScaleShiftConfig is ToyScaleShiftConfig  # resolved by unipeft's module __getattr__
    assert up.get_method(NAME).delta_cls is ToyScaleShiftDelta
    assert up.AdapterConfig.from_dict({"peft_type": "TOY_SCALE_SHIFT", "warmup_steps": 3}).warmup_steps == 3


@pytest.mark.parametrize("field, value", [("warmup_steps", 0), ("warmup_steps", -2), ("warmup_steps", True),
                                          ("warmup_steps", 1.5), ("shift_lr", 0.0), ("shift_lr", "fast")])
def test_field_rules_name_the_field(field, value):
    message = rf"ToyScaleShiftConfig\.{field}: expected a positive (integer|number), got {value!r}"
    with pytest.raises(up.ConfigError, match=message):
        ToyScaleShiftConfig(**{field: value})
    with pytest.raises(up.ConfigError, match=message):
        ToyScaleShiftConfig().replace(**{field: value})
    with pytest.raises(up.ConfigError, match=message):
        up.AdapterConfig.from_dict({"peft_type": "TOY_SCALE_SHIFT", field: value})


def test_users_config_is_not_written_and_the_stored_copy_is_frozen():
    cfg = ToyScaleShiftConfig(target_modules=["fc1", "fc2"], warmup_steps=3)
    before = copy.deepcopy(cfg.__dict__)
    model = up.adapt(cases.build_model("mlp"), cfg)
    model.add_adapter("second", cfg)
    assert cfg.__dict__ == before
    stored = model.peft_config["default"]
    assert stored is not cfg and stored is not model.peft_config["second"] and stored == cfg
    with pytest.raises(up.ConfigError, match="immutable"):
        stored.warmup_steps = 4
    cfg.warmup_steps = 5  # the user's object stays editable and the adapter does not see it
    assert stored.warmup_steps == 3


def test_one_bank_per_adapter_shared_by_its_sites():
    model = up.adapt(cases.build_model("mlp"), ToyScaleShiftConfig())
    model.add_adapter("other", ToyScaleShiftConfig(target_modules=["fc2"]))
    assert [d.path for d in model.deltas("default")] == ["fc1", "fc2"]  # default_targets: Linear with bias
    assert all(d.bank is model.banks["default"] for d in model.deltas("default"))
    assert model.delta_at("other", "fc2").bank is model.banks["other"] is not model.banks["default"]
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"banks.default.gain", "base_model.fc1.deltas.default.toy_scale",
                     "base_model.fc1.deltas.default.toy_shift", "base_model.fc2.deltas.default.toy_scale",
                     "base_model.fc2.deltas.default.toy_shift"}
    with pytest.raises(TargetError, match="no bias"):
        up.adapt(nn.Sequential(nn.Linear(2, 2, bias=False)), ToyScaleShiftConfig(target_modules=["0"]))


# ---- b. the method-independent invariant suite ---------------------------------------------
TOY_CASE = cases.Case(NAME, NAME)
INVARIANT_MODULES = sorted(m.name for m in pkgutil.iter_modules(invariants.__path__) if m.name.startswith("test_"))
# Checks that must have run (not skipped) for the toy, and a floor for each module's count.
MUST_RUN = {"test_identity_at_init", "test_merged_equals_unmerged", "test_unmerge_restores_base_weights",
            "test_save_load_gives_identical_outputs", "test_training_changes_only_active_adapter_parameters",
            "test_requires_grad_only_on_active_adapters", "test_mixed_batch_rows_equal_per_adapter_runs",
            "test_no_module_matched_raises_target_error", "test_unsupported_layer_type_raises_target_error",
            "test_adapter_name_never_in_saved_keys_and_any_name_loads"}
# (The rest are not applicable: no bias-carrying Linear in embgpt/gpt2/kg, one target in conv,
# and the same-site stacking check only covers methods listed as commuting in test_multi_adapter.)
MIN_RUN = {"test_basics": 21, "test_merge": 20, "test_persistence": 12, "test_multi_adapter": 15,
           "test_bad_configs": 3}


def _invariant_calls(module):
    """(test name, kwargs) for every case-parametrized test of `module`, with the toy as the case."""
    for name, fn in vars(module).items():
        if not (name.startswith("test_") and callable(fn)) or "case" not in inspect.signature(fn).parameters:
            continue
        axes: dict[str, list] = {"case": [TOY_CASE]}
        for mark in getattr(fn, "pytestmark", []):
            if mark.name == "parametrize" and mark.args[0] != "case":
                names = [n.strip() for n in mark.args[0].split(",")] if isinstance(mark.args[0], str) else mark.args[0]
                assert len(names) == 1, f"{name}: multi-name parametrize not handled here"
                axes[names[0]] = list(mark.args[1])
        for values in itertools.product(*axes.values()):
            yield name, fn, dict(zip(axes, values))


@pytest.mark.parametrize("module_name", INVARIANT_MODULES)
def test_passes_the_invariant_suite(module_name, tmp_path):
    module = importlib.import_module(f"tests.invariants.{module_name}")
    ran, skipped, failed = [], [], []
    for i, (name, fn, kwargs) in enumerate(_invariant_calls(module)):
        extra = set(inspect.signature(fn).parameters) - set(kwargs)
        assert extra <= {"tmp_path"}, f"{name} needs fixtures {extra} this runner does not provide"
        if "tmp_path" in extra:
            kwargs["tmp_path"] = tmp_path / f"{i}"
            kwargs["tmp_path"].mkdir()
        label = f"{name}[{','.join(str(v) for k, v in kwargs.items() if k not in ('case', 'tmp_path'))}]"
        try:
            fn(**kwargs)
        except pytest.skip.Exception as exc:
            skipped.append(f"{label}: {exc}")
        except (Exception, pytest.fail.Exception) as exc:  # noqa: BLE001 - collected and reported together
            failed.append(f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        else:
            ran.append(name)
    assert not failed, "invariant checks failed for the toy method:\n" + "\n".join(failed)
    module_tests = {n for n, _, _ in _invariant_calls(module)}
    floor = MIN_RUN.get(module_name, 1 if module_tests else 0)
    assert len(ran) >= floor, f"only {len(ran)} checks of {module_name} ran; skipped:\n" + "\n".join(skipped)
    missing = (MUST_RUN & module_tests) - set(ran)
    assert not missing, f"never ran for the toy: {sorted(missing)}; skipped:\n" + "\n".join(skipped)


def test_example_fields_feed_the_suites_configs():
    assert cases.make_config(TOY_CASE, "mlp").warmup_steps == 2
    assert cases.candidate_targets(TOY_CASE, "llama") == tuple(  # attention_bias=True: q/k/v/o, no MLP or head
        f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo")


# ---- c. save_pretrained / from_pretrained, bank included ------------------------------------
def test_save_and_load_round_trip_exactly_with_the_bank(tmp_path):
    model = up.adapt(cases.build_model("mlp"), ToyScaleShiftConfig(warmup_steps=4))
    cases.perturb(model, "default", seed=3)
    with torch.no_grad():
        model.banks["default"].gain.fill_(1.75)
    batch = cases.make_batch("mlp")
    out = cases.run(model, batch)
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sorted(tensors) == ["bank.gain", "base_model.model.fc1.toy_scale", "base_model.model.fc1.toy_shift",
                               "base_model.model.fc2.toy_scale", "base_model.model.fc2.toy_shift"]
    assert torch.equal(tensors["bank.gain"], torch.tensor([1.75]))
    assert up.AdapterConfig.load(tmp_path) == model.peft_config["default"]

    torch.manual_seed(99)  # fresh inits draw other numbers: equality below means every tensor was loaded
    loaded = up.AdaptedModel.from_pretrained(cases.build_model("mlp"), tmp_path)
    assert torch.equal(loaded.banks["default"].gain, model.banks["default"].gain)
    assert all(d.bank is loaded.banks["default"] for d in loaded.deltas("default"))
    torch.testing.assert_close(cases.run(loaded, batch), out, rtol=0, atol=0)
    saved, got = model.adapter_state_dict(), loaded.adapter_state_dict()
    assert saved.keys() == got.keys() and all(torch.equal(saved[k], got[k]) for k in saved)
    assert loaded.peft_config["default"].warmup_steps == 4
    assert not any(p.requires_grad for p in loaded.parameters())  # is_trainable=False: bank frozen too

    host = up.adapt(cases.build_model("mlp"), ToyScaleShiftConfig())
    host.load_adapter(tmp_path, "loaded", is_trainable=True)
    assert torch.equal(host.banks["loaded"].gain, torch.tensor([1.75]))
    assert torch.equal(host.banks["default"].gain, torch.tensor([1.0]))
    host.set_adapter("loaded")
    torch.testing.assert_close(cases.run(host, batch), out, rtol=0, atol=0)
    assert host.banks["loaded"].gain.requires_grad and not host.banks["default"].gain.requires_grad


def test_a_file_without_the_bank_does_not_load(tmp_path):
    from safetensors.torch import save_file

    model = up.adapt(cases.build_model("mlp"), ToyScaleShiftConfig())
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(path)).items() if not k.startswith("bank.")}, str(path))
    with pytest.raises(up.AdapterLoadError, match="'gain' is missing"):
        up.AdaptedModel.from_pretrained(cases.build_model("mlp"), tmp_path)


# ---- d. training through `unipeft train` --------------------------------------------------
def test_trains_through_unipeft_train(tmp_path, capsys):
    from unipeft.train.artifacts import load_run

    steps, shift_lr = 4, 0.05
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump({
        "model": "mlp", "data": {"source": "digits"}, "output_dir": str(tmp_path / "run"),
        "method": {"name": NAME, "target_modules": ["fc1", "fc2"], "warmup_steps": 2, "shift_lr": shift_lr},
        "optimizer": {"lr": 1e-2}, "schedule": {"name": "constant"},
        "max_steps": steps, "batch_size": 32, "log_every": 1, "threads": 1}))
    ToyStepCounter.created.clear()
    assert main(["train", str(config), "--quiet"]) == 0
    assert len(ToyStepCounter.created) == 1, "the trainer asks for the method's callbacks once"
    counter = ToyStepCounter.created[0]
    assert counter.steps == steps
    pattern = r"\.deltas\.default\.toy_shift$"
    assert [lrs[pattern] for lrs in counter.group_lrs] == [shift_lr] * steps
    assert all(lrs["default"] == 1e-2 for lrs in counter.group_lrs)

    run_dir = tmp_path / "run"
    tensors = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert "bank.gain" in tensors and not torch.equal(tensors["bank.gain"], torch.ones(1))  # learnt after warm-up
    run = load_run(run_dir)
    assert type(run.cfg.method_config) is ToyScaleShiftConfig
    assert torch.equal(run.model.banks["default"].gain, tensors["bank.gain"])
    assert torch.equal(run.model.delta_at("default", "fc1").toy_shift, tensors["base_model.model.fc1.toy_shift"])
    assert "classifier" in run.model.peft_config["default"].modules_to_save  # SEQ_CLS trains the head too

    assert main(["train", str(config), "--quiet", "--overwrite", "--method.warmup_steps", "0"]) == 2
    assert "ToyScaleShiftConfig.warmup_steps: expected a positive integer, got 0" in capsys.readouterr().err


def test_warmup_holds_the_shared_gain():
    model = up.adapt(cases.build_model("mlp"), ToyScaleShiftConfig(warmup_steps=2))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    hooks = up.TrainingHooks(model, opt, max_steps=3)
    gains = []
    for _ in range(3):
        hooks.step_begin()
        model(**cases.make_batch("mlp")).pow(2).mean().backward()
        hooks.before_optimizer_step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        hooks.step_end()
        gains.append(model.banks["default"].gain.item())
    assert gains[:2] == [1.0, 1.0] and gains[2] != 1.0
    assert hooks.callbacks.state_dict() == [{"steps": 3}]
