"""Older PEFT folders hold `adapter_model.bin` (torch.save) instead of safetensors: unipeft reads them with
torch.load(weights_only=True), checks keys and shapes as for safetensors, prefers safetensors when both are
there, and refuses a pickle holding anything but tensors without running it."""
from __future__ import annotations

import re
from pathlib import Path

import peft
import pytest
import torch

import unipeft as up
from unipeft.core.state import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME

from ..interop._models import build, inputs, output

TOL = dict(atol=1e-5, rtol=1e-5)
CASES = {
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]),
    "ia3": lambda: peft.IA3Config(target_modules=["key", "value", "intermediate.dense"],
                                  feedforward_modules=["intermediate.dense"]),
}


def _write_marker(path: str) -> int:
    """What unpickling the payload below would run: it leaves a file behind."""
    Path(path).write_text("the pickle ran code")
    return 0


class Payload:
    """A pickled object whose unpickling calls `_write_marker` (any code could stand there)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_write_marker, (str(self.marker),))


def _peft_trained(case: str):
    model = peft.get_peft_model(build("bert"), CASES[case]())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for seed in range(3):
        opt.zero_grad()
        output(model, inputs("bert", seed=10 + seed)).pow(2).mean().backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def legacy_lora(tmp_path_factory):
    """A PEFT-trained LoRA folder written with safe_serialization=False, and the PEFT model."""
    folder = tmp_path_factory.mktemp("legacy_lora")
    model = _peft_trained("lora")
    model.save_pretrained(folder, safe_serialization=False)
    return folder, model


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_legacy_folder_loads_with_identical_outputs(case, tmp_path):
    pm = _peft_trained(case)
    pm.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / LEGACY_WEIGHTS_NAME).is_file() and not (tmp_path / WEIGHTS_NAME).exists()
    ours = up.AdaptedModel.from_pretrained(build("bert"), tmp_path)
    batch = inputs("bert", seed=99)
    with torch.no_grad():
        expected = output(pm, batch)
        assert (expected - output(build("bert"), batch)).abs().max() > 1e-4, "the adapter does nothing"
        torch.testing.assert_close(output(ours, batch), expected, **TOL)
    merged_peft, merged_ours = pm.merge_and_unload().state_dict(), ours.merge_and_unload().state_dict()
    assert merged_peft.keys() == merged_ours.keys()
    for key in merged_peft:
        torch.testing.assert_close(merged_ours[key], merged_peft[key], **TOL, msg=f"merged {key}")


def _copy_config(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    return dst


def test_a_pickled_object_is_refused_without_running_it(legacy_lora, tmp_path):
    folder, _ = legacy_lora
    evil = _copy_config(folder, tmp_path / "evil")
    marker = tmp_path / "marker.txt"
    state = torch.load(folder / LEGACY_WEIGHTS_NAME, weights_only=True)
    key = next(iter(state))
    torch.save({**state, key: Payload(marker)}, evil / LEGACY_WEIGHTS_NAME)
    base = build("bert")
    with pytest.raises(up.AdapterLoadError, match=rf"{LEGACY_WEIGHTS_NAME}: cannot be read as a tensors-only"):
        up.AdaptedModel.from_pretrained(base, evil)
    host = up.adapt(build("bert"), up.IA3Config(target_modules=["query"]))
    with pytest.raises(up.AdapterLoadError, match=re.escape(str(evil / LEGACY_WEIGHTS_NAME))):
        host.load_adapter(evil, "evil")
    assert not marker.exists(), "loading ran the pickled code"
    assert sorted(host.peft_config) == ["default"]
    assert not any(isinstance(m, up.Delta) for m in base.modules())
    # The payload is live: an unrestricted unpickler does run it (what weights_only=True prevents).
    torch.load(evil / LEGACY_WEIGHTS_NAME, weights_only=False)
    assert marker.read_text() == "the pickle ran code"


@pytest.mark.parametrize("content, found", [
    (lambda s: [*s.values()], "found list"),
    (lambda s: {"nested": s}, "found 'nested': dict"),
    (lambda s: {**s, "step": 3}, "found 'step': int"),
    (lambda s: {**s, 7: torch.zeros(1)}, "found 7: Tensor"),
])
def test_a_legacy_file_that_is_not_a_flat_tensor_dict_is_refused(legacy_lora, tmp_path, content, found):
    folder, _ = legacy_lora
    bad = _copy_config(folder, tmp_path / "bad")
    torch.save(content(torch.load(folder / LEGACY_WEIGHTS_NAME, weights_only=True)), bad / LEGACY_WEIGHTS_NAME)
    with pytest.raises(up.AdapterLoadError, match=rf"{LEGACY_WEIGHTS_NAME}: expected a flat .* dict, {found}"):
        up.AdaptedModel.from_pretrained(build("bert"), bad)


def test_a_corrupt_legacy_file_is_refused_naming_it(legacy_lora, tmp_path):
    folder, _ = legacy_lora
    bad = _copy_config(folder, tmp_path / "corrupt")
    (bad / LEGACY_WEIGHTS_NAME).write_bytes(b"not a torch file")
    with pytest.raises(up.AdapterLoadError, match=rf"corrupt/{LEGACY_WEIGHTS_NAME}: cannot be read"):
        up.AdaptedModel.from_pretrained(build("bert"), bad)


def test_keys_and_shapes_are_checked_as_for_safetensors(legacy_lora, tmp_path):
    folder, _ = legacy_lora
    state = torch.load(folder / LEGACY_WEIGHTS_NAME, weights_only=True)
    first, second = sorted(state)[:2]
    dropped = _copy_config(folder, tmp_path / "dropped")
    torch.save({k: v for k, v in state.items() if k != first}, dropped / LEGACY_WEIGHTS_NAME)
    with pytest.raises(up.AdapterLoadError, match=r"is missing from the file"):
        up.AdaptedModel.from_pretrained(build("bert"), dropped)
    reshaped = _copy_config(folder, tmp_path / "reshaped")
    torch.save({**state, second: torch.zeros(3, 3)}, reshaped / LEGACY_WEIGHTS_NAME)
    with pytest.raises(up.AdapterLoadError, match=r"has shape \(3, 3\) in the file"):
        up.AdaptedModel.from_pretrained(build("bert"), reshaped)
    extra = _copy_config(folder, tmp_path / "extra")
    torch.save({**state, "base_model.model.bert.pooler.dense.lora_A.weight": torch.zeros(4, 32)},
               extra / LEGACY_WEIGHTS_NAME)
    with pytest.raises(up.AdapterLoadError, match=r"unexpected key"):
        up.AdaptedModel.from_pretrained(build("bert"), extra)


def test_safetensors_wins_and_other_files_are_ignored(legacy_lora, tmp_path):
    folder, pm = legacy_lora
    ours = up.AdaptedModel.from_pretrained(build("bert"), folder)
    both = tmp_path / "both"
    ours.save_pretrained(both)  # adapter_model.safetensors + config
    (both / LEGACY_WEIGHTS_NAME).write_bytes(b"never read: the safetensors file is there")
    (both / "training_args.bin").write_bytes(b"\x80\x04 junk")
    (both / "README.md").write_text("notes")
    loaded = up.AdaptedModel.from_pretrained(build("bert"), both)
    batch = inputs("bert", seed=5)
    with torch.no_grad():
        torch.testing.assert_close(output(loaded, batch), output(pm, batch), **TOL)
    (both / WEIGHTS_NAME).unlink()  # now the (broken) legacy file is the only one: it is read, and refused
    with pytest.raises(up.AdapterLoadError, match=LEGACY_WEIGHTS_NAME):
        up.AdaptedModel.from_pretrained(build("bert"), both)
    (both / LEGACY_WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=rf"no {WEIGHTS_NAME} \(or legacy {LEGACY_WEIGHTS_NAME}\)"):
        up.AdaptedModel.from_pretrained(build("bert"), both)


def test_import_of_a_legacy_folder_writes_safetensors_with_the_same_tensors(legacy_lora, tmp_path):
    from safetensors.torch import load_file

    from unipeft.interop.peft import import_from_peft

    folder, _ = legacy_lora
    out = import_from_peft(folder, tmp_path / "imported")
    written = load_file(str(out / WEIGHTS_NAME))
    original = torch.load(folder / LEGACY_WEIGHTS_NAME, weights_only=True)
    assert written.keys() == original.keys() and not (out / LEGACY_WEIGHTS_NAME).exists()
    for key, tensor in original.items():
        assert torch.equal(written[key], tensor), key
