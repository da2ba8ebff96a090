"""What the PEFT parity tests share: the loss on a model's output, a few AdamW steps on it, the two trained
folders (PEFT's loaded by us, ours loaded by PEFT) with PEFT's report of keys, outputs and merged weights
compared, configs round-tripped through PEFT's JSON, and what both sides draw from a seed compared.

`kind` names a tiny model of ._models; `base(kind)` builds a fresh one (default: build) and `batch(kind, seed)`
gives its inputs (default: inputs), for the tests with models or batches of their own."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import peft
import torch
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

import unipeft as up

from ._models import build, inputs, output

TOL = dict(atol=1e-5, rtol=1e-5)
PREFIX = "base_model.model."
Base = Callable[[str], nn.Module]
Batch = Callable[[str, int], dict]


def _inputs(kind: str, seed: int) -> dict:
    return inputs(kind, seed=seed)


def output_loss(out: torch.Tensor) -> torch.Tensor:
    """mean(out^2) + mean(out): moves every output, so no trained parameter stays at its init."""
    out = out.float()
    return (out ** 2).mean() + out.mean()


def train_steps(model: nn.Module, run: Callable[[nn.Module, int], torch.Tensor], seed: int, steps: int = 3,
                train_mode: bool = False) -> nn.Module:
    """`steps` AdamW steps (lr 0.05) on output_loss(run(model, seed + step)); the model comes back in eval
    mode. `train_mode`: step in training mode (dropout active) instead of the model's current mode."""
    if train_mode:
        model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step in range(steps):
        opt.zero_grad()
        output_loss(run(model, seed + step)).backward()
        opt.step()
    return model.eval()


def train_on(model: nn.Module, kind: str, seed: int, *, batch: Batch = _inputs, train_mode: bool = False):
    """train_steps on the output of `model` for batch(kind, seed + step)."""
    return train_steps(model, lambda m, s: output(m, batch(kind, s)), seed, train_mode=train_mode)


def perturb(model: nn.Module, seed: int = 0, scale: float = 0.2) -> None:
    """Adds seeded Gaussian noise times `scale` to every trainable parameter (no training needed)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def peft_load_report(base: nn.Module, folder: Path):
    """PEFT loads `folder` onto `base`: (model, warnings about keys, unexpected keys, missing keys)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(base, folder).eval()
    noisy = [str(w.message) for w in caught if any(s in str(w.message) for s in ("missing", "nexpected"))]
    result = set_peft_model_state_dict(pm, load_file(str(Path(folder) / "adapter_model.safetensors")))
    return pm, noisy, set(result.unexpected_keys), set(result.missing_keys)


def peft_trained(kind: str, make: Callable[[], peft.PeftConfig], folder: Path, *, base: Base = build,
                 batch: Batch = _inputs, seed: int | None = 0):
    """PEFT's adapter make() on a fresh base (built after torch.manual_seed(seed); None: no reseeding), three
    AdamW steps from batch seed 10, saved in `folder`, and ours loaded from that folder onto a fresh base.
    Returns (PEFT's model, ours)."""
    if seed is not None:
        torch.manual_seed(seed)
    pm = train_on(peft.get_peft_model(base(kind), make()), kind, 10, batch=batch)
    pm.save_pretrained(folder)
    return pm, up.AdaptedModel.from_pretrained(base(kind), folder)


def ours_trained(kind: str, make: Callable[[], peft.PeftConfig], folder: Path, *, base: Base = build,
                 batch: Batch = _inputs, seed: int | None = 1, train_mode: bool = False) -> up.AdaptedModel:
    """Our adapter from PEFT's own config dict (make().to_dict()) on a fresh base (after torch.manual_seed(seed);
    None: no reseeding), three AdamW steps from batch seed 20 (in training mode with `train_mode`), saved in
    `folder`. Returns our model."""
    config = up.AdapterConfig.from_dict(make().to_dict())  # PEFT's own dict -> our config
    if seed is not None:
        torch.manual_seed(seed)
    ours = train_on(up.adapt(base(kind), config), kind, 20, batch=batch, train_mode=train_mode)
    ours.save_pretrained(folder)
    return ours


def peft_loads_ours(kind: str, make: Callable[[], peft.PeftConfig], folder: Path, peft_folder: Path, *,
                    base: Base = build, shapes: bool = False):
    """PEFT loads our `folder` onto a fresh base: no warning about missing or unexpected keys, no unexpected
    keys, the same missing keys as when PEFT loads its own fresh adapter make() (saved in `peft_folder`: what
    PEFT leaves out of its own file, such as shared buffers it keeps once, is the reference), and the same file
    keys (with `shapes`, also the same shape and dtype per key). Returns PEFT's model on our folder."""
    peft.get_peft_model(base(kind), make()).save_pretrained(peft_folder)
    _, _, _, missing_own = peft_load_report(base(kind), peft_folder)
    pm, noisy, unexpected, missing = peft_load_report(base(kind), folder)
    assert not noisy, noisy
    assert not unexpected
    assert missing == missing_own
    ours_file = load_file(str(Path(folder) / "adapter_model.safetensors"))
    peft_file = load_file(str(Path(peft_folder) / "adapter_model.safetensors"))
    assert set(ours_file) == set(peft_file)
    if shapes:
        for key, tensor in peft_file.items():
            assert ours_file[key].shape == tensor.shape and ours_file[key].dtype == tensor.dtype, key
    return pm


def assert_outputs_match(reference: nn.Module, other: nn.Module, kind: str, seed: int, *,
                         moved: float | None = 1e-5, base: Base = build, batch: Batch = _inputs) -> torch.Tensor:
    """Without gradients, on batch(kind, seed): `reference`'s output differs from a fresh base's by more than
    `moved` (else "the adapter does nothing"; moved=None: not checked) and `other`'s output equals it within
    TOL. Returns `reference`'s output."""
    data = batch(kind, seed)
    with torch.no_grad():
        expected = output(reference, data)
        if moved is not None:
            assert (expected - output(base(kind), data)).abs().max() > moved, "the adapter does nothing"
        torch.testing.assert_close(output(other, data), expected, **TOL)
    return expected


def assert_peft_folder_loads_alike(kind: str, make: Callable[[], peft.PeftConfig], folder: Path, *,
                                   moved: float = 1e-5, base: Base = build, batch: Batch = _inputs,
                                   seed: int | None = 0):
    """PEFT-trained folder -> ours (peft_trained): on batch seed 99 PEFT's adapter acts (by more than `moved`)
    and ours gives its output within TOL (assert_outputs_match). Returns (PEFT's model, ours)."""
    pm, ours = peft_trained(kind, make, folder, base=base, batch=batch, seed=seed)
    assert_outputs_match(pm, ours, kind, 99, moved=moved, base=base, batch=batch)
    return pm, ours


def assert_our_folder_loads_in_peft(kind: str, make: Callable[[], peft.PeftConfig], tmp_path: Path, *,
                                    moved: float | None = 1e-5, shapes: bool = False, base: Base = build,
                                    batch: Batch = _inputs, seed: int | None = 1):
    """Our trained folder (ours_trained, in tmp_path / "ours") -> PEFT: PEFT loads it as it loads its own
    (peft_loads_ours, against tmp_path / "peft"; `shapes` as there), and on batch seed 98 our adapter acts (by
    more than `moved`; None: not checked) and PEFT gives our output within TOL. Returns (PEFT's model, ours)."""
    ours = ours_trained(kind, make, tmp_path / "ours", base=base, batch=batch, seed=seed)
    pm = peft_loads_ours(kind, make, tmp_path / "ours", tmp_path / "peft", base=base, shapes=shapes)
    assert_outputs_match(ours, pm, kind, 98, moved=moved, base=base, batch=batch)
    return pm, ours


def assert_same_merge(pm, ours, base: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """PEFT's and our merge_and_unload give the same weights (TOL); returns PEFT's merged state. With `base`
    (a fresh base model): merging also changed at least one of its weights."""
    merged_peft = pm.merge_and_unload().state_dict()
    merged_ours = ours.merge_and_unload().state_dict()
    assert merged_peft.keys() == merged_ours.keys()
    for key in merged_peft:
        torch.testing.assert_close(merged_ours[key], merged_peft[key], **TOL, msg=f"merged {key}")
    if base is not None:
        state = base.state_dict()
        assert any(not torch.equal(merged_peft[key], state[key]) for key in merged_peft), "merging changed no weight"
    return merged_peft


def assert_config_round_trips(make: Callable[[], peft.PeftConfig], folder: Path) -> None:
    """Our adapter_config.json (from PEFT's dict) loads as PEFT's config class with the same values, and back."""
    ours = up.AdapterConfig.from_dict(make().to_dict())
    ours.save(folder)
    theirs = peft.PeftConfig.from_pretrained(str(folder))
    assert type(theirs).__name__ == type(ours).peft_class
    back = up.AdapterConfig.from_dict(theirs.to_dict())
    assert back.to_dict() == ours.to_dict()


def fresh_pair(kind: str, make: Callable[[], peft.PeftConfig], *, base: Base = build):
    """PEFT's fresh adapter make() and ours from its dict, each on a fresh base: (PEFT's model, ours)."""
    pm = peft.get_peft_model(base(kind), make())
    return pm, up.adapt(base(kind), up.AdapterConfig.from_dict(make().to_dict()))


def peft_layers(pm, cls: type) -> dict[str, nn.Module]:
    """{module path in the base model: PEFT's tuner layer} over PEFT's layers of class `cls`."""
    return {n.removeprefix(PREFIX): m for n, m in pm.named_modules() if isinstance(m, cls)}


def assert_regenerated_bases_equal(kind: str, make: Callable[[], peft.PeftConfig], names) -> None:
    """Both sides regenerate the shared bases `names` from the seed: our bank's equal PEFT's (on base_model,
    adapter "default") bit for bit."""
    pm, ours = fresh_pair(kind, make)
    bank = ours.banks["default"]
    for name in names:
        theirs = getattr(pm.base_model, name)["default"]
        assert torch.equal(getattr(bank, name), theirs.float()), name
