"""PEFT parity of the SVD-family inits PEFT has (PiSSA, pissa_niter_K, OLoRA, KaSA): the same init on the
same weights gives PEFT's A, B and residual base; a PEFT-trained folder loads in unipeft (on the
original base: both libraries run the init again there) with PEFT's residual and outputs; PEFT loads
ours with no missing/unexpected keys and identical outputs."""
from __future__ import annotations

import warnings

import peft
import pytest
import torch
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file, save_file

import unipeft as up

from ._models import build, inputs, output

TOL = dict(atol=1e-5, rtol=1e-5)
SEED = 11  # the randomized SVD (pissa_niter_K) and KaSA's diagonal draw from the global RNG
CASES = {
    "gpt2-pissa": ("gpt2", dict(init_lora_weights="pissa", target_modules=["c_attn", "c_fc"])),
    "llama-pissa-patterns": ("llama", dict(init_lora_weights="pissa", target_modules=["q_proj", "v_proj", "down_proj"],
                                           rank_pattern={"v_proj": 3}, alpha_pattern={"down_proj": 5})),
    "llama-pissa-niter": ("llama", dict(init_lora_weights="pissa_niter_3", target_modules=["q_proj", "up_proj"])),
    "llama-olora": ("llama", dict(init_lora_weights="olora", target_modules=["q_proj", "v_proj", "down_proj"])),
    "llama-kasa": ("llama", dict(kasa_config={"beta": 1e-4, "gamma": 1e-3}, target_modules=["q_proj", "o_proj"])),
}


def _peft_config(case: str) -> peft.LoraConfig:
    return peft.LoraConfig(r=2, lora_alpha=4, **CASES[case][1])


def _loss(model, batch) -> torch.Tensor:
    out = output(model, batch).float()
    return (out ** 2).mean() + out.mean()


def _train(model, kind: str, seed: int) -> None:
    """A few AdamW steps, so no adapter parameter sits at its init."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step in range(3):
        opt.zero_grad()
        _loss(model, inputs(kind, seed=seed + step)).backward()
        opt.step()
    model.eval()


def _base_weights(model, paths) -> dict[str, torch.Tensor]:
    """{path: dense weight} of the (possibly wrapped) base layers at `paths`."""
    mods = dict(model.named_modules())
    out = {}
    for p in paths:
        m = mods[p]
        m = getattr(m, "base_layer", m)
        out[p] = m.weight.detach().clone()
    return out


def _targets(model_kind: str, case: str) -> list[str]:
    names = CASES[case][1]["target_modules"]
    return [p for p, _ in build(model_kind).named_modules() if p.split(".")[-1] in names]


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_init_gives_peft_a_b_and_residual(case):
    kind, _ = CASES[case]
    torch.manual_seed(SEED)
    pm = peft.get_peft_model(build(kind), _peft_config(case))
    torch.manual_seed(SEED)
    ours = up.adapt(build(kind), up.AdapterConfig.from_dict(_peft_config(case).to_dict()))
    peft_state = {k.replace("base_model.model.", "", 1): v for k, v in pm.state_dict().items()}
    mine = ours.adapter_state_dict()
    assert mine
    for key, value in mine.items():
        theirs = peft_state[key.replace("base_model.model.", "", 1).replace(".weight", ".default.weight")
                            if key.endswith(".weight") else key.replace("base_model.model.", "", 1) + ".default"]
        torch.testing.assert_close(value, theirs, **TOL, msg=key)
    paths = _targets(kind, case)
    for p in paths:
        theirs = _base_weights(pm.base_model.model, [p])[p]
        torch.testing.assert_close(ours.delta_at("default", p).base.weight, theirs, **TOL, msg=p)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_trained_folder_loads_with_peft_residual_and_outputs(case, tmp_path):
    kind, _ = CASES[case]
    torch.manual_seed(SEED)
    pm = peft.get_peft_model(build(kind), _peft_config(case))
    _train(pm, kind, seed=10)
    pm.save_pretrained(tmp_path / "adapter")
    # The base is edited (the residual): keep PEFT's, to check ours against it.
    save_file({k: v.contiguous() for k, v in _base_weights(pm.base_model.model, _targets(kind, case)).items()},
              str(tmp_path / "residual.safetensors"))
    residual = load_file(str(tmp_path / "residual.safetensors"))
    torch.manual_seed(SEED)  # loading runs the init again on the original base, as PEFT's loader does
    ours = up.AdaptedModel.from_pretrained(build(kind), tmp_path / "adapter").eval()
    for p, w in residual.items():
        torch.testing.assert_close(ours.delta_at("default", p).base.weight, w, **TOL, msg=p)
    batch = inputs(kind, seed=99)
    with torch.no_grad():
        torch.testing.assert_close(output(ours, batch), output(pm, batch), **TOL)
        merged = output(ours.merge_and_unload(), batch)
        torch.testing.assert_close(merged, output(pm, batch), **TOL)


@pytest.mark.parametrize("case", sorted(CASES))
def test_unipeft_folder_loads_in_peft_without_warnings(case, tmp_path):
    kind, _ = CASES[case]
    torch.manual_seed(SEED)
    ours = up.adapt(build(kind), up.AdapterConfig.from_dict(_peft_config(case).to_dict()))
    _train(ours, kind, seed=20)
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(SEED)
        pm = peft.PeftModel.from_pretrained(build(kind), str(tmp_path)).eval()
    noisy = [str(w.message) for w in caught if any(s in str(w.message) for s in ("missing", "nexpected"))]
    assert not noisy, noisy
    result = set_peft_model_state_dict(pm, load_file(str(tmp_path / "adapter_model.safetensors")))
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora" in k]
    batch = inputs(kind, seed=98)
    with torch.no_grad():
        torch.testing.assert_close(output(pm, batch), output(ours, batch), **TOL)


@pytest.mark.parametrize("case", ["llama-pissa-patterns", "llama-olora"])
def test_converted_plain_lora_loads_on_the_original_base_in_peft(case, tmp_path):
    kind, _ = CASES[case]
    ours = up.adapt(build(kind), up.AdapterConfig.from_dict(_peft_config(case).to_dict()))
    _train(ours, kind, seed=30)
    batch = inputs(kind, seed=97)
    with torch.no_grad():
        adapted = output(ours, batch)
    up.save_as_plain_lora(ours, tmp_path)
    pm = peft.PeftModel.from_pretrained(build(kind), str(tmp_path)).eval()
    back = up.AdaptedModel.from_pretrained(build(kind), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(output(pm, batch), adapted, **TOL)
        torch.testing.assert_close(output(back, batch), adapted, **TOL)
