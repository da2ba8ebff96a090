"""Every registered method on a bitsandbytes-quantized tiny Llama (NF4 with double quant, and int8).

Parametrised over the registry, so a new method is covered automatically: methods declaring
quantized_base=True whose layer types match a quantized linear must be the identity at init
(exactly, or within 1e-6 when declared identity only up to rounding), leave the packed weights
bit-identical through training steps, and save/load exactly; the others must refuse the quantized
targets with TargetError and leave the model untouched.
"""
from __future__ import annotations

import pytest
import torch
from transformers import BitsAndBytesConfig, LlamaForCausalLM

import unipeft as up
from unipeft.core import layers
from ..interop._models import save_tiny_llama
from ..invariants.cases import NOT_GENERIC

bnb = pytest.importorskip("bitsandbytes", reason="needs bitsandbytes==0.50.2 (the `test` extra)")

KINDS = {
    "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32),
    "int8": BitsAndBytesConfig(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama with biased linears (so BitFit/SSF have targets), saved as safetensors."""
    return save_tiny_llama(tmp_path_factory.mktemp("llama"), attention_bias=True, mlp_bias=True)


def load(path, kind: str) -> LlamaForCausalLM:
    """In training mode throughout (no dropout in this model): an eval-mode forward of a CPU Linear4bit
    with AVX512-BF16 repacks its weight into a layout bitsandbytes' training path cannot use."""
    return LlamaForCausalLM.from_pretrained(path, quantization_config=KINDS[kind], dtype=torch.float32).train()


def packed(model) -> dict[str, tuple[torch.Tensor, ...]]:
    """Clones of every quantized layer's stored weight and scales."""
    out = {}
    for path, m in model.named_modules():
        if layers.is_quantized(m):
            w = m.weight
            scales = w.quant_state.absmax if getattr(w, "quant_state", None) is not None else layers._int8_scales(m)
            out[path.replace(".base_layer", "")] = (w.data.clone(), scales.clone())
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(x, y) for k in a for x, y in zip(a[k], b[k]))


def _probe():
    return bnb.nn.Linear4bit(64, 64, bias=True)


def _targets_quantized(spec) -> bool:
    return isinstance(_probe(), spec.capabilities.layer_types)


def _config(spec, model):
    """target_modules = the quantized linears of a supported type, plus the config's example fields."""
    types = spec.capabilities.layer_types
    paths = [p for p, m in model.named_modules() if layers.is_quantized(m) and isinstance(m, types)
             and (spec.default_targets is None or spec.default_targets(p, m))]
    return spec.config_cls(target_modules=paths, **spec.config_cls.example_fields(paths))


SPECS = sorted((s for s in up.public_methods().values() if s.name not in NOT_GENERIC), key=lambda s: s.name)
SUPPORTED = [s for s in SPECS if s.capabilities.quantized_base and _targets_quantized(s)]
REFUSED = [s for s in SPECS if not s.capabilities.quantized_base and _targets_quantized(s)]
IDS = {"ids": lambda s: s.name}
BATCH = {"input_ids": torch.randint(1, 96, (3, 7), generator=torch.Generator().manual_seed(1))}


def test_the_table_covers_something():
    assert {"lora", "ia3", "bitfit", "ssf", "sara"} <= {s.name for s in SUPPORTED}
    assert "spt" in {s.name for s in REFUSED}  # its selection needs gradients of the (packed) base weight


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spec", SUPPORTED, **IDS)
def test_supported_method_on_a_quantized_llama(spec, kind, llama_dir, tmp_path):
    model = load(llama_dir, kind)
    with torch.no_grad():
        base = model(**BATCH).logits
    saved = packed(model)
    adapted = up.adapt(model, _config(spec, model))
    if spec.delta_cls.identity_at_init:
        with torch.no_grad():
            diff = (adapted(**BATCH).logits - base).abs().max()
        assert diff <= 1e-6, f"{spec.name}: not the identity at init ({diff:.3g})"
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    assert trainable and same(packed(model), saved)
    before = [p.detach().clone() for p in trainable]
    opt = torch.optim.SGD(trainable, lr=0.1)
    for _ in range(2):
        adapted(**BATCH).logits.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert any(not torch.equal(p, b) for p, b in zip(trainable, before)), f"{spec.name}: training changed nothing"
    assert same(packed(model), saved), f"{spec.name}: training changed the packed base weights"
    with torch.no_grad():
        trained = adapted(**BATCH).logits
    adapted.save_pretrained(tmp_path)
    fresh = load(llama_dir, kind)
    loaded = up.AdaptedModel.from_pretrained(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**BATCH).logits, trained)
    state, back = adapted.adapter_state_dict(), loaded.adapter_state_dict()
    assert state.keys() == back.keys() and all(torch.equal(state[k], back[k]) for k in state)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spec", REFUSED, **IDS)
def test_unsupported_method_refuses_quantized_targets(spec, kind, llama_dir):
    model = load(llama_dir, kind)
    config = _config(spec, model)
    modules, saved = list(model.named_modules()), packed(model)
    with pytest.raises(up.TargetError, match=rf"{spec.name} does not support quantized base layers"):
        up.adapt(model, config)
    assert list(model.named_modules()) == modules and same(packed(model), saved)
    assert not any(isinstance(m, up.AdaptedModel) for m in model.modules())


# ---- merging into a quantized base ----------------------------------------------------------------
MERGE_TARGETS = ["q_proj", "down_proj"]


def _lora(llama_dir, kind):
    model = up.adapt(load(llama_dir, kind), up.LoraConfig(r=4, alpha=8, target_modules=MERGE_TARGETS))
    torch.manual_seed(2)
    with torch.no_grad():
        for d in model.deltas("default"):
            d.lora_B.weight.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_merge_reports_the_requantization_error(kind, llama_dir):
    model = _lora(llama_dir, kind)
    with torch.no_grad():
        exact = {s.path: layers.dense_weight(s.base_layer) + s.deltas["default"].delta_weight()["weight"]
                 for s in model.sites()}
    report = model.merge()
    assert report is model.last_merge_report and len(report) == 4
    for e in report:
        stored = layers.dense_weight(model.base_model.get_submodule(e.path).base_layer)
        diff = stored - exact[e.path]
        assert (e.param, e.adapter) == ("weight", "default")
        assert e.max_abs == pytest.approx(float(diff.abs().max()), rel=1e-6) and e.max_abs > 0
        assert e.rel_fro == pytest.approx(float(diff.norm() / exact[e.path].norm()), rel=1e-5)
        # measured rel_fro: NF4 ~0.09-0.10, int8 ~0.004
        assert e.rel_fro < (0.15 if kind == "nf4" else 0.01)
    model.unmerge()
    assert model.merge(adapter_names=[]) == [] and model.last_merge_report == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_to_a_float_dtype_is_exact(kind, dtype, llama_dir):
    model = _lora(llama_dir, kind)
    with torch.no_grad():
        unmerged = model(**BATCH).logits
        expected = {s.path: layers.dense_weight(s.base_layer).to(dtype)
                    + s.deltas["default"].delta_weight()["weight"].to(dtype) for s in model.sites()}
        others = {p: layers.dense_weight(m).to(dtype) for p, m in model.base_model.named_modules()
                  if layers.is_quantized(m) and not p.endswith("base_layer")}
    plain = model.merge_and_unload(dtype=dtype)
    assert not any(layers.is_quantized(m) for m in plain.modules())
    for path, w in {**others, **expected}.items():
        lin = plain.get_submodule(path)
        assert type(lin) is torch.nn.Linear and lin.weight.dtype == dtype and torch.equal(lin.weight, w), path
    if dtype == torch.float32:
        with torch.no_grad():  # the same dense math as bitsandbytes' training-mode path
            assert (plain(**BATCH).logits - unmerged).abs().max() < 1e-4


@pytest.mark.parametrize("failure", ["shape", "write"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_refused_merge_names_method_and_layer_and_changes_nothing(kind, failure, llama_dir, monkeypatch):
    model = _lora(llama_dir, kind)
    sites = list(model.sites())
    bad = sites[-1].deltas["default"]
    if failure == "shape":  # caught by the checks, before any write
        monkeypatch.setattr(bad, "delta_weight", lambda: {"weight": torch.zeros(3, 3)})
    else:  # a write failing after earlier sites were merged: those are undone
        def boom(name, value):
            raise RuntimeError("requantization failed")
        monkeypatch.setattr(bad, "merged_write", boom)
    saved = packed(model.base_model)
    with torch.no_grad():
        before = model(**BATCH).logits
    for call in (model.merge, lambda: model.merge_and_unload(dtype=torch.float32)):
        with pytest.raises(up.MergeError, match=rf"adapter 'default' \(lora\) into '{sites[-1].path}' "):
            call()
        assert model.merged_adapters == [] and same(packed(model.base_model), saved)
        assert all(layers.is_quantized(s.base_layer) and s.deltas["default"].base is s.base_layer for s in sites)
        with torch.no_grad():
            assert torch.equal(model(**BATCH).logits, before)
