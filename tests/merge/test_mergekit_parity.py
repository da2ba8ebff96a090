"""Model-level merges agree with mergekit's own merge of the same tiny Llama checkpoints, tensor for tensor.

Each case writes one mergekit-style YAML; mergekit runs it (Python API, CPU, fixed random_seed) and unipeft runs
the same file with the same seed. DARE's random drops match too: both draw one Bernoulli mask per source and
tensor, in sorted tensor-name order, from a generator seeded the same way. Every tensor is asserted equal bit
for bit (fp32 here; bf16 too with compute_dtype="input").
"""
import pytest
import torch
import yaml
from safetensors.torch import load_file

mergekit = pytest.importorskip("mergekit")
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from unipeft.merge.checkpoint import run_merge_yaml  # noqa: E402

SEED = 1234


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base Llama (hidden 32, 2 layers, vocab 128) and three seeded perturbed copies, saved with save_pretrained."""
    root = tmp_path_factory.mktemp("llama")
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(root / "base")
    state = base.state_dict()
    for i in range(3):
        gen = torch.Generator().manual_seed(100 + i)
        tuned = LlamaForCausalLM(cfg)
        # Noise of about the weights' own scale, so the task vectors have mixed signs and TIES' election matters.
        tuned.load_state_dict({k: v + 0.02 * torch.randn(v.shape, generator=gen) for k, v in state.items()})
        tuned.save_pretrained(root / f"ft{i}")
    return root


def _run_both(root, tmp_path, conf: dict, **ours_kwargs):
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(conf))
    rng = torch.get_rng_state()
    try:  # mergekit seeds the global generators; keep the test process's state as it was
        run_merge(MergeConfiguration.model_validate(yaml.safe_load(path.read_text())), str(tmp_path / "mk"),
                  MergeOptions(random_seed=SEED, quiet=True, copy_tokenizer=False, write_model_card=False))
    finally:
        torch.set_rng_state(rng)
    summary = run_merge_yaml(path, tmp_path / "ours", seed=SEED, **ours_kwargs)
    theirs = load_file(tmp_path / "mk" / "model.safetensors")
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    return theirs, ours, summary


def _models(root, params):
    return [{"model": str(root / f"ft{i}"), "parameters": p} for i, p in enumerate(params)]


CASES = {
    "linear": lambda r: {"merge_method": "linear",
                         "models": _models(r, [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.7}])},
    "task_arithmetic": lambda r: {"merge_method": "task_arithmetic", "base_model": str(r / "base"),
                                  "models": _models(r, [{"weight": 0.6}, {"weight": -0.2}, {"weight": 0.9}]),
                                  "parameters": {"lambda": 0.8}},
    "task_arithmetic_gradient": lambda r: {
        "merge_method": "task_arithmetic", "base_model": str(r / "base"),
        "models": _models(r, [{"weight": [0.2, 1.0]}, {"weight": [{"filter": "mlp", "value": 0.3}, {"value": 0.6}]},
                              {"weight": 0.5}]), "parameters": {"normalize": True}},
    "ties": lambda r: {"merge_method": "ties", "base_model": str(r / "base"),
                       "models": _models(r, [{"weight": 0.5, "density": 0.3}, {"weight": 0.3, "density": 0.6},
                                             {"weight": 0.8, "density": 0.9}])},
    "ties_int8_unnormalized": lambda r: {
        "merge_method": "ties", "base_model": str(r / "base"),
        "models": _models(r, [{"weight": 1.0, "density": 0.5}, {"weight": 0.4, "density": 0.5}]),
        "parameters": {"int8_mask": True, "normalize": False}},
    "dare_linear": lambda r: {"merge_method": "dare_linear", "base_model": str(r / "base"),
                              "models": _models(r, [{"weight": 0.5, "density": 0.4}, {"weight": 0.5, "density": 0.7},
                                                    {"weight": 0.2, "density": 1.0}])},
    "dare_ties": lambda r: {"merge_method": "dare_ties", "base_model": str(r / "base"),
                            "models": _models(r, [{"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.3},
                                                  {"weight": 0.7, "density": 0.8}]),
                            "parameters": {"normalize": True}},
    "slerp": lambda r: {"merge_method": "slerp", "base_model": str(r / "base"),
                        "models": [{"model": str(r / "base")}, {"model": str(r / "ft1")}], "parameters": {"t": 0.35}},
    "slerp_gradient": lambda r: {
        "merge_method": "slerp", "base_model": str(r / "base"),
        "models": [{"model": str(r / "base")}, {"model": str(r / "ft2")}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.7]}, {"filter": "mlp", "value": [1.0, 0.2]},
                             {"value": 0.5}]}},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_tensors_as_mergekit(models, tmp_path, case):
    theirs, ours, summary = _run_both(models, tmp_path, CASES[case](models))
    assert sorted(ours) == sorted(theirs) and len(ours) == 21
    base = load_file(models / "base" / "model.safetensors")
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype == torch.float32, name
        assert torch.equal(ours[name], theirs[name]), name  # bit for bit (same fp32 operations in the same order)
    # The merge changed the weights (a no-op merge would also "agree").
    assert max((ours[n] - base[n]).abs().max().item() for n in ours) > 1e-3
    assert summary["tensors_merged"] == 21 and summary["tensors_copied"] == 0
    assert summary["bytes_written"] == (tmp_path / "ours" / "model.safetensors").stat().st_size


@pytest.mark.parametrize("case", ["ties", "dare_ties", "slerp_gradient", "linear"])
def test_bfloat16_matches_bit_for_bit_when_computing_in_the_input_dtype(models, tmp_path, case):
    # With dtype: bfloat16, mergekit's task-vector methods do their arithmetic in bf16; compute_dtype="input"
    # does the same (the default computes in fp32 and rounds once, so it may differ by a few bf16 ulps).
    theirs, ours, _ = _run_both(models, tmp_path, {**CASES[case](models), "dtype": "bfloat16"}, compute_dtype="input")
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype == torch.bfloat16, name
        assert torch.equal(ours[name], theirs[name]), name


def test_dare_depends_on_the_seed(models, tmp_path):
    conf = CASES["dare_ties"](models)
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(conf))
    a = load_file(run_merge_yaml(path, tmp_path / "a", seed=1)["out"] + "/model.safetensors")
    b = load_file(run_merge_yaml(path, tmp_path / "b", seed=2)["out"] + "/model.safetensors")
    c = load_file(run_merge_yaml(path, tmp_path / "c", seed=1)["out"] + "/model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(a[name], c[name]) and not torch.equal(a[name], b[name])


def test_merged_folder_loads_as_the_same_model(models, tmp_path):
    _run_both(models, tmp_path, CASES["ties"](models))
    ids = torch.tensor([[1, 5, 9, 77, 3]])
    ours = LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "mk").eval()
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)
    assert (tmp_path / "ours" / "config.json").read_bytes() == (models / "base" / "config.json").read_bytes()
