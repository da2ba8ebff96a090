"""ComPEFT compression: exact byte counts, the exact reconstruction formula, loading, and clean errors."""
import json
import math
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import unipeft as up
from unipeft.compress.compeft import compress_adapter, decompress_adapter, load_compressed
from unipeft.compress.packing import COMPRESSED_NAME
from unipeft.core.errors import AdapterLoadError, ConfigError


def base():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128))


CONFIGS = {"lora": lambda: up.LoraConfig(r=8, alpha=16, target_modules=["0", "2"]),
           "ia3": lambda: up.IA3Config(target_modules=["0", "2"], feedforward_modules=["2"])}
REFERENCE = {"lora": 0.0, "ia3": 1.0}  # LoRA: A random, B zeros -> 0; IA3 vectors start at ones


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def saved(request, tmp_path_factory):
    """A 'trained' adapter (seeded noise on every parameter) saved to a folder."""
    model = up.adapt(base(), CONFIGS[request.param]())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for delta in model.deltas("default"):
            for p in delta.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    folder = tmp_path_factory.mktemp(request.param) / "src"
    model.save_pretrained(folder)
    return request.param, folder


def expected(value, reference, density, rule="mean_abs", alpha=1.0):
    """The reconstruction formula, written independently of the library."""
    t = value.float().reshape(-1) - reference
    k = max(1, min(t.numel(), round(density * t.numel())))
    threshold = t.abs().sort(descending=True).values[k - 1]
    mask = (t.abs() >= threshold) & (t != 0)
    s = t[mask].abs().mean() if rule == "mean_abs" else alpha * t.std(correction=0)
    s = torch.tensor(float(s), dtype=torch.float32)
    return (torch.tensor(reference, dtype=torch.float32) + s * torch.sign(t) * mask).reshape(value.shape), int(mask.sum())


def header_len(path):
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


@pytest.mark.parametrize("density", [0.1, 0.2, 0.5])
def test_bytes_follow_the_packing_formula(saved, tmp_path, density):
    method, src = saved
    original = load_file(str(src / "adapter_model.safetensors"))
    summary = compress_adapter(src, tmp_path / "c", density, base_model=base())
    path = tmp_path / "c" / COMPRESSED_NAME
    payload = sum(math.ceil(v.numel() / 8) + math.ceil(round(density * v.numel()) / 8) + 4 for v in original.values())
    assert summary["payload_after"] == payload
    assert path.stat().st_size == summary["bytes_after"] == 8 + header_len(path) + payload
    assert summary["payload_before"] == sum(4 * v.numel() for v in original.values())
    assert summary["bytes_before"] == (src / "adapter_model.safetensors").stat().st_size
    assert summary["bytes_after"] < summary["bytes_before"]
    assert summary["ratio"] == summary["bytes_before"] / summary["bytes_after"]
    for key, info in summary["tensors"].items():
        assert info["kind"] == "ternary" and info["reference"] == REFERENCE[method]
        assert info["kept"] == round(density * original[key].numel())


@pytest.mark.parametrize("density,rule,alpha", [(0.1, "mean_abs", 1.0), (0.5, "mean_abs", 1.0), (0.2, "std", 2.5),
                                                (1.0, "mean_abs", 1.0)])
def test_reconstruction_is_exactly_the_formula(saved, tmp_path, density, rule, alpha):
    method, src = saved
    original = load_file(str(src / "adapter_model.safetensors"))
    summary = compress_adapter(src, tmp_path / "c", density, scale=rule, alpha=alpha, base_model=base())
    decompress_adapter(tmp_path / "c", tmp_path / "d")
    out = load_file(str(tmp_path / "d" / "adapter_model.safetensors"))
    assert set(out) == set(original)
    assert (tmp_path / "d" / "adapter_config.json").read_text() == (src / "adapter_config.json").read_text()
    for key, value in original.items():
        want, kept = expected(value, REFERENCE[method], density, rule, alpha)
        assert out[key].dtype == value.dtype and torch.equal(out[key], want)
        assert summary["tensors"][key]["kept"] == kept
        err = float((want - value).norm() / value.norm())
        assert summary["tensors"][key]["rel_error"] == pytest.approx(err, rel=1e-6)
        if density == 1.0:  # ternary is lossy even keeping every entry: each is reference +- scale
            assert not torch.equal(out[key], value)
            assert len(torch.unique(out[key])) == 2


def test_loaded_outputs_equal_the_decompressed_folder(saved, tmp_path):
    method, src = saved
    compress_adapter(src, tmp_path / "c", 0.2, base_model=base())
    decompress_adapter(tmp_path / "c", tmp_path / "d")
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(2))
    want = up.AdaptedModel.from_pretrained(base(), tmp_path / "d")(x)
    assert torch.equal(load_compressed(base(), tmp_path / "c")(x), want)
    full = up.AdaptedModel.from_pretrained(base(), src)
    assert not torch.allclose(full(x), want)  # the compression changed something measurable
    model = load_compressed(full, tmp_path / "c", "small")  # into an existing model, by name
    model.set_adapter("small")
    assert torch.equal(model(x), want)


def test_without_base_model_the_reference_is_zero(saved, tmp_path):
    method, src = saved
    summary = compress_adapter(src, tmp_path / "c", 0.5)
    assert summary["reference_source"] == "zero"
    decompress_adapter(tmp_path / "c", tmp_path / "d")
    out = load_file(str(tmp_path / "d" / "adapter_model.safetensors"))
    for key, value in load_file(str(src / "adapter_model.safetensors")).items():
        assert torch.equal(out[key], expected(value, 0.0, 0.5)[0])


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("density", [0, -0.1, 1.5, True, "0.5", float("nan")])
def test_bad_density_writes_nothing(saved, tmp_path, density):
    _, src = saved
    with pytest.raises(ConfigError, match="density"):
        compress_adapter(src, tmp_path / "c", density)
    assert _leftovers(tmp_path) == []


def test_bad_scale_rule_and_alpha(saved, tmp_path):
    _, src = saved
    with pytest.raises(ConfigError, match="scale must be one of"):
        compress_adapter(src, tmp_path / "c", 0.5, scale="max")
    with pytest.raises(ConfigError, match="alpha"):
        compress_adapter(src, tmp_path / "c", 0.5, scale="std", alpha=0)
    assert _leftovers(tmp_path) == []


def test_not_an_adapter_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterLoadError, match="src_dir=.*empty.*not an adapter folder"):
        compress_adapter(tmp_path / "empty", tmp_path / "c", 0.5)
    with pytest.raises(AdapterLoadError, match=COMPRESSED_NAME):
        decompress_adapter(tmp_path / "empty", tmp_path / "d")
    assert _leftovers(tmp_path) == ["empty"]


def test_corrupt_or_unknown_files_are_refused_and_leave_the_model_unchanged(saved, tmp_path):
    _, src = saved
    compress_adapter(src, tmp_path / "c", 0.5, base_model=base())
    path = tmp_path / "c" / COMPRESSED_NAME
    good = path.read_bytes()
    model = up.AdaptedModel.from_pretrained(base(), src)
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(3))
    before = model(x)
    path.write_bytes(good[:len(good) // 2])  # truncated
    with pytest.raises(AdapterLoadError, match="compeft_model.safetensors: cannot read"):
        load_compressed(model, tmp_path / "c", "other")
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "pt"})  # a plain safetensors file
    with pytest.raises(AdapterLoadError, match="not a valid unipeft-compeft v1 file"):
        decompress_adapter(tmp_path / "c", tmp_path / "d")
    meta_bad = good.replace(b'"format_version":"1"', b'"format_version":"9"')
    assert meta_bad != good
    path.write_bytes(meta_bad)
    with pytest.raises(AdapterLoadError, match="version '9' is unknown"):
        load_compressed(model, tmp_path / "c", "other")
    assert list(model.peft_config) == ["default"] and torch.equal(model(x), before)
    assert _leftovers(tmp_path) == ["c"]


def test_header_records_the_source(saved, tmp_path):
    method, src = saved
    compress_adapter(src, tmp_path / "c", 0.1, scale="std", alpha=3.0, base_model=base())
    from safetensors import safe_open
    with safe_open(str(tmp_path / "c" / COMPRESSED_NAME), framework="pt") as f:
        meta = f.metadata()
    assert (meta["format"], meta["format_version"], meta["density"], meta["scale_rule"], meta["alpha"]) == \
        ("unipeft-compeft", "1", "0.1", "std", "3.0")
    assert meta["method"] == method and meta["reference_source"] == "base_model"
    assert json.loads(meta["adapter_config"]) == json.loads((src / "adapter_config.json").read_text())


def test_deterministic_non_constant_inits_are_kept_raw(tmp_path):
    """A modules_to_save copy starts as the base's weights: the reader cannot rebuild them, so they stay exact."""
    model = up.adapt(base(), up.LoraConfig(r=4, target_modules=["0"], modules_to_save=["2"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    model.save_pretrained(tmp_path / "s")
    summary = compress_adapter(tmp_path / "s", tmp_path / "c", 0.3, base_model=base())
    kinds = {k: v["kind"] for k, v in summary["tensors"].items()}
    assert kinds == {"base_model.model.0.lora_A.weight": "ternary", "base_model.model.0.lora_B.weight": "ternary",
                     "base_model.model.2.weight": "raw", "base_model.model.2.bias": "raw"}
    decompress_adapter(tmp_path / "c", tmp_path / "d")
    src = load_file(str(tmp_path / "s" / "adapter_model.safetensors"))
    out = load_file(str(tmp_path / "d" / "adapter_model.safetensors"))
    assert torch.equal(out["base_model.model.2.weight"], src["base_model.model.2.weight"])
    assert torch.equal(out["base_model.model.0.lora_A.weight"], expected(src["base_model.model.0.lora_A.weight"], 0.0, 0.3)[0])
    # lora_B is all 0.01 (every magnitude tied): still exactly k entries are kept, each 0.01 again
    b = out["base_model.model.0.lora_B.weight"]
    assert int((b != 0).sum()) == round(0.3 * b.numel()) and b.unique().tolist() == [0.0, pytest.approx(0.01)]
