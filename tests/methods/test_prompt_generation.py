"""Generation with the KV cache equals greedy decoding without it, for every prompt method and LoRA.

Each adapter is trained a few steps first (so it changes the model), then 10 tokens are
generated with transformers' generate (use_cache=True) through `AdaptedModel.generate` and
compared with recomputing the whole sequence through `AdaptedModel.forward` at every step.
"""
from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import unipeft as up

VOCAB, NEW = 64, 10


def tiny(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, initializer_range=0.2)
        model = GPT2LMHeadModel(cfg)
    model.generation_config.eos_token_id = None  # never stop early: always NEW tokens
    model.generation_config.pad_token_id = 0
    return model.eval()


def config(method: str, kind: str) -> up.AdapterConfig:
    if method == "lora":
        return up.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"] if kind == "llama" else ["c_attn"])
    if method == "prompt_tuning":
        return up.PromptTuningConfig(num_virtual_tokens=4)
    if method == "p_tuning":
        return up.PTuningConfig(num_virtual_tokens=4, encoder_hidden_size=16)
    if method == "prefix_tuning":
        return up.PrefixTuningConfig(num_virtual_tokens=4)
    if method == "prefix_projection":
        return up.PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16)
    if method == "dept":
        return up.DeptConfig(num_virtual_tokens=3, rank=2, max_length=40)
    raise ValueError(method)


METHODS = ["lora", "prompt_tuning", "p_tuning", "prefix_tuning", "prefix_projection", "dept"]


def trained(method: str, kind: str) -> up.AdaptedModel:
    """The adapted tiny model after 4 Adam steps on random token sequences."""
    model = up.adapt(tiny(kind), config(method, kind))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=5e-2)
    g = torch.Generator().manual_seed(3)
    model.train()
    for _ in range(4):
        ids = torch.randint(1, VOCAB, (4, 12), generator=g)
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def prompt_ids(seed: int = 5, length: int = 7) -> torch.Tensor:
    return torch.randint(1, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def greedy_without_cache(model, ids: torch.Tensor, steps: int = NEW) -> tuple[list[int], torch.Tensor]:
    """Recompute the full sequence through AdaptedModel.forward at every step."""
    seq, first = ids, None
    for _ in range(steps):
        logits = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[:, -1]
        first = logits if first is None else first
        seq = torch.cat((seq, logits.argmax(-1, keepdim=True)), dim=1)
    return seq[0, ids.shape[1]:].tolist(), first


def cached(model, ids: torch.Tensor, use_cache: bool = True, **kw):
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                          do_sample=False, use_cache=use_cache, return_dict_in_generate=True, output_logits=True,
                          pad_token_id=0, **kw)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("method", METHODS)
def test_cached_generation_equals_full_recompute(method, kind):
    model = trained(method, kind)
    base = model.base_model
    for seed in (5, 6):
        ids = prompt_ids(seed)
        want, first = greedy_without_cache(model, ids)
        out = cached(model, ids)
        got = out.sequences[0, ids.shape[1]:].tolist()
        assert got == want and len(got) == NEW
        # the first generated step's logits are the adapted forward's at the last prompt position
        assert (out.logits[0] - first).abs().max().item() <= 1e-5
        # without the cache (transformers recomputes every step through the same preparation): same tokens
        assert cached(model, ids, use_cache=False).sequences[0, ids.shape[1]:].tolist() == want
    assert "prepare_inputs_for_generation" not in base.__dict__  # generate left the base model as it was
    # the adapter matters: the base model's first logits differ
    with model.disable_adapters():
        plain = base(input_ids=ids).logits[:, -1]
    assert (plain - first).abs().max().item() > 1e-3


@pytest.mark.parametrize("method", ["prefix_tuning", "prompt_tuning"])
def test_cache_grows_by_one_per_step_after_the_virtual_tokens(method):
    """Manual decoding through AdaptedModel.forward: the cache starts with the virtual positions."""
    from transformers import DynamicCache

    model = trained(method, "llama")
    ids = prompt_ids()
    want, _ = greedy_without_cache(model, ids, 4)
    cache = DynamicCache()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache, use_cache=True)
        assert out.past_key_values.get_seq_length() == 4 + ids.shape[1]
        seq, got = ids, []
        for step in range(4):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            got.append(int(nxt))
            seq = torch.cat((seq, nxt), dim=1)
            out = model(input_ids=nxt, attention_mask=torch.ones_like(seq), past_key_values=out.past_key_values,
                        use_cache=True)
            assert out.past_key_values.get_seq_length() == 4 + ids.shape[1] + step + 1
    assert got == want
    with pytest.raises(up.ConfigError, match="must cover the 12 real ones"):
        model(input_ids=nxt, attention_mask=torch.ones(1, 3, dtype=torch.long), past_key_values=out.past_key_values)


def test_sampling_with_a_seed_is_reproducible_and_tiny_top_p_is_greedy():
    model = trained("prefix_tuning", "gpt2")
    ids = prompt_ids()
    greedy = cached(model, ids).sequences

    def sample(seed, **kw):
        torch.manual_seed(seed)
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                              do_sample=True, pad_token_id=0, **kw)

    a, b = sample(1, temperature=2.0, top_k=0), sample(1, temperature=2.0, top_k=0)
    assert torch.equal(a, b)
    assert any(not torch.equal(sample(s, temperature=2.0, top_k=0), greedy) for s in range(2, 5))
    assert torch.equal(sample(7, temperature=1.0, top_p=1e-6, top_k=0), greedy)


def test_dept_refuses_generation_past_its_max_length():
    model = up.adapt(tiny("llama"), up.DeptConfig(num_virtual_tokens=2, rank=2, max_length=12))
    with pytest.raises(up.ConfigError, match="max_length is 12"):
        cached(model, prompt_ids(length=7))
