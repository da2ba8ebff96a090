"""PEFT parity of the data-aware inits CorDA, EVA and LoRA-GA: same weights + same calibration data ->
the same A / B / residual base; PEFT-saved folders load here and ours load in PEFT, outputs identical.

Tolerances: CorDA is computed exactly as PEFT does (fp32, 1e-5). LoRA-GA: PEFT takes the gradient's
singular vectors from torch.svd_lowrank, whose signs are arbitrary; with q = 4r = min(in, out) its
range finder spans the whole space, so the vectors agree with an exact SVD up to sign: A's rows and B's
columns are compared up to sign (1e-4), and each side's residual is checked against its own A, B. EVA:
PEFT runs an incremental randomized PCA until the components stop moving (cosine >= tau), we the exact
PCA of the same rows. Its truncated incremental updates converge to a slightly different subspace
(principal-angle cosines down to ~0.98 where two eigenvalues are close), so the comparison is on EVA's
objective: the input variance each adapter's rows capture. Ours is the optimum; PEFT's (run with
tau = 0.9999) reaches > 99% of it on every layer; the redistributed ranks / alphas agree exactly.
"""
from __future__ import annotations

import dataclasses
import sys
import types
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import unipeft as up
from unipeft.core.calibration import BASE_HOLDS_RESIDUAL, calibration_data

from ._models import build, inputs, output

peft = pytest.importorskip("peft")
try:  # peft 0.21.2's corda.py imports attrs' `dataclass` for a plain record; the stdlib one is equivalent
    import attr  # noqa: F401
except ImportError:
    sys.modules["attr"] = types.SimpleNamespace(dataclass=dataclasses.dataclass)
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora.corda import preprocess_corda  # noqa: E402
from peft.tuners.lora.eva import initialize_lora_eva_weights  # noqa: E402
from peft.tuners.lora.loraga import preprocess_loraga  # noqa: E402
from peft.utils import set_peft_model_state_dict  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-5}
# (not the pooler: PEFT's CorDA hook cannot take its 2-d input)
TARGETS = ["query", "value", "intermediate.dense", "output.dense"]


def _model(kind="bert"):
    model = build(kind)
    for m in model.modules():  # PEFT's LoRA-GA takes gradients in train mode: no dropout noise
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def _rows(n=6, labels=False):
    """Batches of one sequence each (PEFT's CorDA hook takes (tokens, in) inputs), no padding."""
    out = []
    for i in range(n):
        b = {"input_ids": inputs("bert", seed=40 + i)["input_ids"][:1]}
        if labels:
            b["labels"] = torch.tensor([i % 3])
        out.append(b)
    return out


def _peft_layers(pm):
    return {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if hasattr(m, "lora_A")
            and "default" in m.lora_A}


def _ours(model, path):
    d = model.delta_at("default", path)
    return d.lora_A.weight, d.lora_B.weight, model.base_model.get_submodule(path).base_layer.weight


def _plain_with(model_weights_of, kind="bert"):
    """A plain model holding the (residual) base weights of a PEFT or unipeft adapted model."""
    sd = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v
          for k, v in model_weights_of.state_dict().items() if "lora_" not in k}
    plain = _model(kind)
    plain.load_state_dict({k: sd[k] for k in plain.state_dict()})
    return plain


def _peft_loads(folder, base, config=None):
    """PEFT loads `folder` onto `base`; its loader reports no missing / unexpected LoRA keys."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(base, folder, config=config).eval()
    assert not [str(w.message) for w in caught if "issing" in str(w.message) or "nexpected" in str(w.message)]
    result = set_peft_model_state_dict(pm, load_file(str(folder / "adapter_model.safetensors")))
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora" in k]
    return pm


def _perturb(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.03 * torch.randn_like(p))


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_matches_peft_and_folders_load_both_ways(method, tmp_path):
    rows = _rows()
    pcfg = LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, init_lora_weights="corda",
                      corda_config=peft.tuners.lora.config.CordaConfig(corda_method=method))
    pbase = _model()
    preprocess_corda(pbase, pcfg, run_model=lambda: [pbase(**b) for b in rows])
    pm = get_peft_model(pbase, pcfg).eval()
    ours = up.adapt(_model(), up.LoraConfig(r=2, alpha=4, target_modules=TARGETS, init="corda",
                                           corda_config={"corda_method": method}), calibration=rows)
    layers = _peft_layers(pm)
    assert sorted(layers) == sorted(d.path for d in ours.deltas("default"))
    for path, layer in layers.items():
        a, b, w = _ours(ours, path)
        torch.testing.assert_close(a, layer.lora_A["default"].weight, **TOL)
        torch.testing.assert_close(b, layer.lora_B["default"].weight, **TOL)
        torch.testing.assert_close(w, layer.base_layer.weight, **TOL)
    batch = inputs("bert", seed=7)
    # a PEFT-saved folder (after some training) on PEFT's residual base
    _perturb(pm)
    pm.save_pretrained(tmp_path / "peft")
    with calibration_data(BASE_HOLDS_RESIDUAL):
        loaded = up.AdaptedModel.from_pretrained(_plain_with(pm), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(output(loaded, batch), output(pm, batch), **TOL)
    # ours in PEFT: PEFT's own loader re-runs CorDA's preprocessing for init_lora_weights="corda" (it cannot
    # load even its own CorDA folder on a plain base), so its config is read and given with the init disabled
    _perturb(ours)
    ours.save_pretrained(tmp_path / "ours")
    pconfig = LoraConfig.from_pretrained(tmp_path / "ours")
    assert pconfig.init_lora_weights == "corda" and pconfig.corda_config.corda_method == method
    pconfig.init_lora_weights = True
    pconfig.corda_config = None
    back = _peft_loads(tmp_path / "ours", _plain_with(ours.base_model), config=pconfig)
    with torch.no_grad():
        torch.testing.assert_close(output(back, batch), output(ours, batch), **TOL)


def _align(x, ref, dim):
    """`x` with each row (dim=0) / column (dim=1) sign-flipped to agree with `ref`."""
    signs = torch.sign((x * ref).sum(1 - dim, keepdim=True))
    return x * signs


@pytest.mark.parametrize("direction,scale", [("ArB2r", "stable"), ("ArBr", "gd_scale"), ("A2rBr", "weight_svd")])
def test_lora_ga_matches_peft_up_to_sign_and_folders_load_both_ways(direction, scale, tmp_path):
    # A causal LM: every token's loss reaches every target, so the gradients have full rank and their 2r
    # singular directions are well defined. (nn.Linear: on GPT-2's Conv1D PEFT's "stable" scale reads the
    # stored (in, out) shape as out_features; ours uses the true output width.)
    rows = []
    for i in range(6):
        ids = inputs("llama", seed=40 + i)["input_ids"][:1]
        rows.append({"input_ids": ids, "labels": ids})
    r = 8  # 4r = 32 = min(in, out): PEFT's svd_lowrank spans the whole space
    targets = ["q_proj", "gate_proj", "up_proj"]
    pcfg = LoraConfig(r=r, lora_alpha=16, target_modules=targets, init_lora_weights="lora_ga",
                      lora_ga_config=peft.tuners.lora.config.LoraGAConfig(direction=direction, scale=scale))
    pbase = _model("llama")

    def train_step():
        for b in rows:
            pbase(**b).loss.backward()
    preprocess_loraga(pbase, pcfg, train_step)
    pm = get_peft_model(pbase, pcfg).eval()
    ours = up.adapt(_model("llama"), up.LoraConfig(r=r, alpha=16, target_modules=targets, init="lora_ga",
                                                 lora_ga_config={"direction": direction, "scale": scale}),
                    calibration=rows)
    original = dict(_model("llama").named_modules())
    layers = _peft_layers(pm)
    assert sorted(layers) == sorted(d.path for d in ours.deltas("default"))
    for path, layer in layers.items():
        d = ours.delta_at("default", path)
        a, b = d.lora_A.weight, d.lora_B.weight
        pa, pb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        torch.testing.assert_close(_align(a, pa, 0), pa, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(_align(b, pb, 1), pb, rtol=1e-4, atol=1e-4)
        w0 = original[path].weight
        assert d.scaling == layer.scaling["default"]
        torch.testing.assert_close(ours.base_model.get_submodule(path).base_layer.weight,
                                   w0 - d.scaling * b @ a, **TOL)
        torch.testing.assert_close(layer.base_layer.weight, w0 - d.scaling * pb @ pa, **TOL)
    batch = inputs("llama", seed=7)
    _perturb(pm)
    pm.save_pretrained(tmp_path / "peft")
    with calibration_data(BASE_HOLDS_RESIDUAL):
        loaded = up.AdaptedModel.from_pretrained(_plain_with(pm, "llama"), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(output(loaded, batch), output(pm, batch), **TOL)
    _perturb(ours)
    ours.save_pretrained(tmp_path / "ours")
    back = _peft_loads(tmp_path / "ours", _plain_with(ours.base_model, "llama"))  # PEFT's LoRA-GA loads as is
    assert back.peft_config["default"].lora_ga_config.direction == direction
    with torch.no_grad():
        torch.testing.assert_close(output(back, batch), output(ours, batch), **TOL)


def _input_covariances(model, paths, batches):
    """{path: covariance (float64) of every input row the module receives over `batches`}."""
    rows = {p: [] for p in paths}
    handles = [model.get_submodule(p).register_forward_pre_hook(
        lambda m, a, p=p: rows[p].append(a[0].reshape(-1, a[0].shape[-1]))) for p in paths]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in handles:
        h.remove()
    return {p: torch.cov(torch.cat(r).double().T) for p, r in rows.items()}


@pytest.mark.parametrize("rho", [1.0, 2.0])
def test_eva_matches_peft_subspaces_and_ranks_and_folders_load_both_ways(rho, tmp_path):
    rows = [{"input_ids": inputs("bert", seed=60 + i)["input_ids"]} for i in range(4)]
    pcfg = LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, init_lora_weights="eva",
                      eva_config=peft.tuners.lora.config.EvaConfig(rho=rho, tau=0.9999))
    torch.manual_seed(0)
    pm = get_peft_model(_model(), pcfg)
    initialize_lora_eva_weights(pm, dataloader=rows, show_progress_bar=False)
    pm.eval()
    ours = up.adapt(_model(), up.LoraConfig(r=2, alpha=4, target_modules=TARGETS, init="eva",
                                           eva_config={"rho": rho}), calibration=rows)
    covs = _input_covariances(_model(), [d.path for d in ours.deltas("default")], rows)
    pconf, oconf = pm.peft_config["default"], ours.peft_config["default"]
    assert dict(oconf.rank_pattern) == dict(pconf.rank_pattern)
    assert bool(oconf.rank_pattern) == (rho > 1)  # with rho = 2 ranks really move on this model
    assert dict(oconf.alpha_pattern) == pytest.approx(dict(pconf.alpha_pattern))
    layers = _peft_layers(pm)
    assert sorted(layers) == sorted(d.path for d in ours.deltas("default"))
    for path, layer in layers.items():
        a = ours.delta_at("default", path).lora_A.weight.double()
        pa = layer.lora_A["default"].weight.double()
        torch.testing.assert_close(a @ a.T, torch.eye(len(a), dtype=a.dtype), rtol=0, atol=1e-5)  # orthonormal
        torch.testing.assert_close(pa @ pa.T, torch.eye(len(pa), dtype=a.dtype), rtol=0, atol=1e-5)
        cov = covs[path]
        ours_var, peft_var = torch.trace(a @ cov @ a.T), torch.trace(pa @ cov @ pa.T)
        assert ours_var >= peft_var * (1 - 1e-6), path  # ours is the exact optimum of EVA's objective
        assert peft_var >= 0.99 * ours_var, (path, float(peft_var / ours_var))
        assert torch.count_nonzero(ours.delta_at("default", path).lora_B.weight) == 0
    batch = inputs("bert", seed=7)
    _perturb(pm)
    pm.save_pretrained(tmp_path / "peft")
    with calibration_data(BASE_HOLDS_RESIDUAL):  # EVA edits no base weight: the plain base
        loaded = up.AdaptedModel.from_pretrained(_model(), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(output(loaded, batch), output(pm, batch), **TOL)
    _perturb(ours)
    ours.save_pretrained(tmp_path / "ours")
    back = _peft_loads(tmp_path / "ours", _model())
    with torch.no_grad():
        torch.testing.assert_close(output(back, batch), output(ours, batch), **TOL)


def test_peft_sub_config_objects_are_accepted_as_their_dicts():
    cfg = up.LoraConfig(init="eva", eva_config=peft.tuners.lora.config.EvaConfig(rho=1.5, whiten=True))
    assert cfg.eva_config == {**dataclasses.asdict(peft.tuners.lora.config.EvaConfig()), "rho": 1.5, "whiten": True}
    ga = up.LoraConfig(init="lora_ga", lora_ga_config=peft.tuners.lora.config.LoraGAConfig(direction="ArBr"))
    assert LoraConfig(**{k: v for k, v in ga.to_dict().items() if k in ("lora_ga_config", "init_lora_weights")}
                      ).lora_ga_config.direction == "ArBr"
