"""merge_checkpoints on tiny seeded safetensors checkpoints: hand-checked values, streaming memory, refusals."""
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from unipeft.core.errors import ConfigError, MergeError
from unipeft.merge.checkpoint import merge_checkpoints, merge_config_from_yaml, resolve_setting, run_merge_yaml


def _write(folder, tensors, shards=1):
    """A model folder: tensors split over `shards` safetensors files, plus config and tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    for s in range(shards):
        part = {n: tensors[n].contiguous() for n in names[s::shards]}
        save_file(part, folder / f"model-{s:05d}-of-{shards:05d}.safetensors")
    (folder / "config.json").write_text(json.dumps({"num_hidden_layers": 3, "model_type": "toy"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8}))
    return folder


def _toy(tmp_path):
    """Base and two sources with values in quarters, so weighted sums are exact in fp32."""
    base = {"layers.0.w": torch.tensor([[1.0, -2.0], [0.5, 4.0]]), "layers.2.w": torch.tensor([2.0, 2.0, -1.0]),
            "embed": torch.tensor([0.25, 0.75]), "position_ids": torch.tensor([0, 1, 2])}
    a = {"layers.0.w": torch.tensor([[2.0, -1.0], [0.5, 3.0]]), "layers.2.w": torch.tensor([1.0, 3.0, -1.0]),
         "embed": torch.tensor([1.25, 0.75]), "position_ids": torch.tensor([0, 1, 2])}
    b = {"layers.0.w": torch.tensor([[0.0, -2.0], [1.5, 4.0]]), "layers.2.w": torch.tensor([2.0, 0.0, 1.0]),
         "embed": torch.tensor([0.25, -0.25]), "position_ids": torch.tensor([0, 1, 2])}
    return (_write(tmp_path / "base", base), _write(tmp_path / "a", a, shards=2), _write(tmp_path / "b", b),
            base, a, b)


def _load(out):
    return load_file(out / "model.safetensors")


def test_linear_and_task_arithmetic_exact(tmp_path):
    pb, pa, pbb, base, a, b = _toy(tmp_path)
    seen = []
    s = merge_checkpoints(None, [pa, pbb], [1.0, 3.0], "linear", tmp_path / "lin", progress=lambda *x: seen.append(x))
    out = _load(tmp_path / "lin")
    for n in ("layers.0.w", "layers.2.w", "embed"):
        assert torch.equal(out[n], (a[n] + 3 * b[n]) / 4), n
    assert torch.equal(out["position_ids"], a["position_ids"]) and out["position_ids"].dtype == torch.int64
    assert (s["tensors_merged"], s["tensors_copied"], s["sources"]) == (3, 1, 2)
    assert s["bytes_written"] == (tmp_path / "lin" / "model.safetensors").stat().st_size
    assert seen[-1] == (4, 4, "position_ids") and len(seen) == 4

    # A shard index, when present, names the files to read (the stray file beside them is not part of the model).
    save_file({"other": torch.zeros(1)}, pa / "adapter_model.safetensors")
    (pa / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        n: f"model-{i % 2:05d}-of-00002.safetensors" for i, n in enumerate(sorted(a))}}))
    merge_checkpoints(pb, [pa, pbb], [0.5, 2.0], "task_arithmetic", tmp_path / "ta", progress=True, **{"lambda": 0.5})
    out = _load(tmp_path / "ta")
    for n in ("layers.0.w", "layers.2.w", "embed"):
        assert torch.equal(out[n], base[n] + 0.5 * (0.5 * (a[n] - base[n]) + 2.0 * (b[n] - base[n]))), n
    # The base's config and tokenizer files travel with the merged weights; no partial folder is left behind.
    assert (tmp_path / "ta" / "config.json").read_bytes() == (pb / "config.json").read_bytes()
    assert (tmp_path / "ta" / "tokenizer_config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_ties_trims_elects_and_divides_by_agreeing_weights(tmp_path):
    z = torch.zeros(4)
    pb = _write(tmp_path / "base", {"w": z})
    pa = _write(tmp_path / "a", {"w": torch.tensor([3.0, -1.0, 0.5, 2.0])})
    pbb = _write(tmp_path / "b", {"w": torch.tensor([-2.0, -2.0, 1.0, 1.5])})
    merge_checkpoints(pb, [pa, pbb], [2.0, 1.0], "ties", tmp_path / "o", density=0.5)
    # Trim to 2 of 4: a -> [3, 0, 0, 2], b -> [-2, -2, 0, 0]; weighted votes [4, -2, 0, 4] elect +, -, +, +;
    # agreeing weighted sums [6, -2, 0, 4] over agreeing weights [2, 1, (none -> 1), 2].
    assert torch.equal(_load(tmp_path / "o")["w"], torch.tensor([3.0, -2.0, 0.0, 2.0]))
    merge_checkpoints(pb, [pa, pbb], [2.0, 1.0], "ties", tmp_path / "f", density=0.5, normalize=False,
                      majority_sign_method="frequency")
    # Counting signs: [0, -2, 0, 1] elects +, -, +, +; no division.
    assert torch.equal(_load(tmp_path / "f")["w"], torch.tensor([6.0, -2.0, 0.0, 4.0]))


def test_dare_drops_and_rescales(tmp_path):
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 64, generator=gen)}
    delta = torch.randn(64, 64, generator=gen)
    pb, pa = _write(tmp_path / "base", base), _write(tmp_path / "a", {"w": base["w"] + delta})
    merge_checkpoints(pb, [pa], [1.0], "dare_linear", tmp_path / "d", density=0.25, rescale="density", seed=3)
    got = _load(tmp_path / "d")["w"] - base["w"]
    kept = got.abs() > 1e-4
    assert 0.18 < kept.float().mean().item() < 0.32  # about a quarter of the entries survive
    torch.testing.assert_close(got[kept], delta[kept] / 0.25, rtol=0, atol=1e-5)
    merge_checkpoints(pb, [pa], [1.0], "dare_linear", tmp_path / "l1", density=0.25, seed=3)  # mergekit's L1 rescale
    l1 = _load(tmp_path / "l1")["w"] - base["w"]
    torch.testing.assert_close(l1.abs().sum(), delta.abs().sum(), rtol=1e-5, atol=0)
    assert torch.equal(l1 != 0, (_load(tmp_path / "d")["w"] - base["w"]) != 0)  # same seed, same mask
    merge_checkpoints(pb, [pa], [1.0], "dare_ties", tmp_path / "full", density=1.0)  # nothing dropped
    torch.testing.assert_close(_load(tmp_path / "full")["w"], base["w"] + delta, rtol=0, atol=1e-6)


def test_slerp_endpoints_and_midpoint(tmp_path):
    pb = _write(tmp_path / "base", {"w": torch.tensor([1.0, 0.0]), "layers.0.w": torch.tensor([2.0, 2.0])})
    pa = _write(tmp_path / "a", {"w": torch.tensor([0.0, 3.0]), "layers.0.w": torch.tensor([1.0, 1.0])})
    merge_checkpoints(pb, [pa], None, "slerp", tmp_path / "m", t=0.5)
    out = _load(tmp_path / "m")
    # 90 degrees apart: sin(45)/sin(90) of each vector; parallel pairs interpolate linearly.
    torch.testing.assert_close(out["w"], torch.tensor([0.5 ** 0.5, 3 * 0.5 ** 0.5]), rtol=0, atol=1e-6)
    assert torch.equal(out["layers.0.w"], torch.tensor([1.5, 1.5]))
    merge_checkpoints(pb, [pa], None, "slerp", tmp_path / "z", t=0.0)
    assert torch.equal(_load(tmp_path / "z")["w"], torch.tensor([1.0, 0.0]))


def test_settings_gradient_and_filter(tmp_path):
    assert resolve_setting([0.0, 1.0, 0.0], "layers.1.x", 0.25, "w") == 0.5
    assert resolve_setting([{"filter": "mlp", "value": 2.0}, {"value": [1.0, 3.0]}], "layers.1.attn", 0.5, "w") == 2.0
    assert resolve_setting([{"filter": "mlp", "value": 2.0}], "attn", 0.5, "w") is None
    pb, pa, _, base, a, _ = _toy(tmp_path)
    # 3 layers: layers.0 at position 0 (weight 1), layers.2 at 1 (weight 3); tensors outside the stack at 0.
    merge_checkpoints(pb, [pa], [[1.0, 3.0]], "task_arithmetic", tmp_path / "g")
    out = _load(tmp_path / "g")
    assert torch.equal(out["layers.0.w"], a["layers.0.w"])
    assert torch.equal(out["layers.2.w"], base["layers.2.w"] + 3 * (a["layers.2.w"] - base["layers.2.w"]))
    assert torch.equal(out["embed"], a["embed"])


def test_yaml_runs_the_same_merge(tmp_path):
    pb, pa, pbb, *_ = _toy(tmp_path)
    conf = {"merge_method": "ties", "base_model": "base", "dtype": "float32",
            "models": [{"model": "base"}, {"model": "a", "parameters": {"weight": 0.7, "density": 0.5}},
                       {"model": "b", "parameters": {"weight": 0.3}}], "parameters": {"density": 0.75, "lambda": 0.9}}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(conf))
    cfg = merge_config_from_yaml(tmp_path / "m.yaml")
    assert cfg["sources"] == [str(pa), str(pbb)] and cfg["weights"] == [0.7, 0.3] and cfg["density"] == [0.5, 0.75]
    run_merge_yaml(tmp_path / "m.yaml", tmp_path / "y")
    merge_checkpoints(pb, [pa, pbb], [0.7, 0.3], "ties", tmp_path / "p", density=[0.5, 0.75], **{"lambda": 0.9})
    y, p = _load(tmp_path / "y"), _load(tmp_path / "p")
    assert all(torch.equal(y[n], p[n]) for n in p)


@pytest.mark.parametrize("conf, field", [
    ({"merge_method": "nope", "models": ["a"]}, "merge_method"),
    ({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}}, "missing"]},
     "models[1].model"),
    ({"merge_method": "ties", "base_model": "base", "models": ["a"]}, "models[0].parameters.weight"),
    ({"merge_method": "slerp", "base_model": "base", "models": [{"model": "a", "parameters": {"weight": 1}}]},
     "models[0].parameters.weight"),
    ({"merge_method": "linear", "slices": []}, "slices"),
    ({"merge_method": "linear", "models": ["a"], "colour": 1}, "colour"),
])
def test_yaml_errors_name_the_field(tmp_path, conf, field):
    _toy(tmp_path)
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(conf))
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        run_merge_yaml(tmp_path / "m.yaml", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_input_leaves_nothing_at_out(tmp_path):
    pb, pa, pbb, base, a, b = _toy(tmp_path)
    wrong_shape = _write(tmp_path / "s", {**a, "embed": torch.zeros(3)})
    wrong_names = _write(tmp_path / "n", {**a, "extra": torch.zeros(1)})
    inf = _write(tmp_path / "inf", {**a, "layers.2.w": torch.tensor([1.0, float("inf"), 0.0])})
    out = tmp_path / "out"
    cases = [
        (MergeError, "shape", dict(base=pb, sources=[pa, wrong_shape], weights=[1, 1], method="ties")),
        (MergeError, "unexpected", dict(base=pb, sources=[wrong_names], weights=[1], method="task_arithmetic")),
        (ConfigError, "weights", dict(base=pb, sources=[pa, pbb], weights=[1.0], method="ties")),
        (ConfigError, "density", dict(base=pb, sources=[pa], weights=[1], method="ties", density=0.0)),
        (ConfigError, r"density\[1\]", dict(base=pb, sources=[pa, pbb], weights=[1, 1], method="dare_ties",
                                             density=[0.5, 1.5])),
        (ConfigError, "method", dict(base=pb, sources=[pa], weights=[1], method="average")),
        (ConfigError, "base", dict(base=None, sources=[pa], weights=[1], method="ties")),
        (ConfigError, "t", dict(base=pb, sources=[pa], weights=None, method="slerp", t=1.5)),
        (ConfigError, "gamma", dict(base=pb, sources=[pa], weights=[1], method="ties", gamma=0.1)),
        (MergeError, "not finite", dict(base=pb, sources=[pa, inf], weights=[1, 1], method="task_arithmetic")),
    ]
    for err, match, kwargs in cases:
        with pytest.raises(err, match=match):
            merge_checkpoints(out=out, **kwargs)
        assert not out.exists(), match
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], match
    # An existing folder is kept as it was unless overwrite=True.
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="out"):
        merge_checkpoints(pb, [pa], [1.0], "task_arithmetic", out)
    assert (out / "keep.txt").read_text() == "x"
    merge_checkpoints(pb, [pa], [1.0], "task_arithmetic", out, overwrite=True)
    assert not (out / "keep.txt").exists() and torch.equal(_load(out)["embed"], a["embed"])


def _status(key):
    """A /proc/self/status size in bytes (VmRSS: resident now, VmHWM: peak resident since the last reset)."""
    with open("/proc/self/status") as fh:
        return int(next(line for line in fh if line.startswith(key)).split()[1]) * 1024


def test_streaming_keeps_peak_memory_below_one_and_a_half_models(tmp_path):
    try:
        open("/proc/self/clear_refs", "w").close()
    except OSError:
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak-RSS mark")
    gen = torch.Generator().manual_seed(0)
    # 48 tensors of 512 x 256 fp32: 24 MiB per model, four models (base + 3) = 96 MiB read per merge.
    base = {f"layers.{i}.w": torch.randn(512, 256, generator=gen) for i in range(48)}
    model_bytes = sum(t.numel() * 4 for t in base.values())
    _write(tmp_path / "base", base)
    for s in range(3):
        _write(tmp_path / f"s{s}", {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()})
    del base
    srcs = [tmp_path / f"s{i}" for i in range(3)]
    merge_checkpoints(tmp_path / "base", srcs, [1, 1, 1], "linear", tmp_path / "warm")  # warm the allocator
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak mark (VmHWM) to the current resident size
    before = _status("VmRSS")
    merge_checkpoints(tmp_path / "base", srcs, [0.5, 0.3, 0.2], "ties", tmp_path / "o1", density=0.3)
    merge_checkpoints(tmp_path / "base", srcs, [0.5, 0.3, 0.2], "dare_ties", tmp_path / "o2", density=0.5, seed=0)
    extra = _status("VmHWM") - before
    # Loading the four checkpoints whole would need 4 models; streaming stays near one tensor's working set.
    assert extra < 1.5 * model_bytes, (extra, model_bytes)
    assert len(_load(tmp_path / "o2")) == 48 and (tmp_path / "o1" / "model.safetensors").stat().st_size > model_bytes
