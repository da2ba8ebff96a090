"""Ladder Side-Tuning (and its SHERL option) on tiny seeded BERT, GPT-2 and Llama models: the identity at init,
no gradient and no saved activation inside the backbone, training that moves only the side network, an exact
save/load round trip, SHERL's anti-redundancy weights, and errors raised before any training step."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)

import unipeft as up
from unipeft.methods.lst import LstBank, anti_redundancy_weights, consolidate, find_layer_list

VOCAB, WIDTH, DEPTH = 64, 32, 3
KINDS = ("bert", "gpt2", "llama")
LORA_TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}
RECEIVERS = {"bert": "bert.encoder.layer.2", "gpt2": "transformer.ln_f", "llama": "model.norm"}
LISTS = {"bert": "bert.encoder.layer", "gpt2": "transformer.h", "llama": "model.layers"}


def build(kind: str) -> nn.Module:
    """A tiny model of `kind` (hidden 32, 3 blocks) seeded with 0, in eval mode."""
    torch.manual_seed(0)
    if kind == "bert":
        model = BertForSequenceClassification(BertConfig(
            vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=2, intermediate_size=64,
            num_labels=2, max_position_embeddings=32))
    elif kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_layer=DEPTH, n_head=2, n_positions=32,
                                           bos_token_id=0, eos_token_id=0))
    else:
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=64, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0))
    return model.eval()


def batch(kind: str, seed: int = 1, rows: int = 8) -> dict[str, torch.Tensor]:
    """Seeded inputs with labels: BERT classifies the parity of the first token; the LMs continue a
    sequence counting up by one (mod VOCAB) from a random start."""
    g = torch.Generator().manual_seed(seed)
    if kind == "bert":
        ids = torch.randint(1, VOCAB, (rows, 10), generator=g)
        return {"input_ids": ids, "labels": ids[:, 0] % 2}
    start = torch.randint(0, VOCAB, (rows, 1), generator=g)
    ids = (start + torch.arange(10)) % VOCAB
    return {"input_ids": ids, "labels": ids}


def logits(model, inputs) -> torch.Tensor:
    """The model's logits without autograd (labels left out)."""
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"]).logits


# Adam's learning rate and the bound on the loss ratio (last / first step) each tiny task reaches. Measured: BERT
# 0.686 -> 0.404 (0.59) in 40 steps; the LMs start near ln(64) = 4.16 behind a random 3-block backbone and reach
# 0.71 (gpt2) and 0.65 (llama) in 40 steps; in 60 steps SHERL reaches 0.59 / 0.52 / 0.44.
LR = {"bert": 1e-2, "gpt2": 3e-2, "llama": 3e-2}
BOUND = {"bert": 0.7, "gpt2": 0.8, "llama": 0.8}


def train(model, kind: str, steps: int) -> list[float]:
    """`steps` Adam steps (lr LR[kind]) on the model's own loss for one fixed batch; the losses before each step."""
    lr = LR[kind]
    model.train()
    data = batch(kind)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**data).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def saved_for_backward(model, ids: torch.Tensor) -> tuple[int, int, int]:
    """(tensors autograd saves in one forward, elements of those that are not model parameters, tensors saved
    while a block of the layer list runs), then one backward."""
    params = {p.data_ptr() for p in model.parameters()}
    counts = {"all": 0, "elements": 0, "in_blocks": 0}
    depth = [0]

    def pack(t):
        counts["all"] += 1
        counts["in_blocks"] += depth[0] > 0
        if t.data_ptr() not in params:
            counts["elements"] += t.numel()
        return t

    modules = dict(up.core.targets.logical_modules(model.base_model))  # a site stands for its block
    handles = []
    for path in find_layer_list(model.base_model)[1]:
        block = modules[path]
        handles.append(block.register_forward_pre_hook(lambda *a: depth.__setitem__(0, depth[0] + 1)))
        handles.append(block.register_forward_hook(lambda *a: depth.__setitem__(0, depth[0] - 1)))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    out.pow(2).mean().backward()
    return counts["all"], counts["elements"], counts["in_blocks"]


@pytest.mark.parametrize("sherl", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_identity_at_init_exact(kind, sherl):
    inputs = batch(kind)
    base = logits(build(kind), inputs)
    model = up.adapt(build(kind), up.LstConfig(sherl=sherl))
    assert torch.equal(logits(model, inputs), base)


@pytest.mark.parametrize("kind", KINDS)
def test_sites_follow_the_layer_list(kind):
    """Every block of the layer list feeds the side network; the receiver is the site before the task head."""
    model = build(kind)
    path, entries = find_layer_list(model)
    assert path == LISTS[kind] and entries == [f"{path}.{i}" for i in range(DEPTH)]
    adapted = up.adapt(model, up.LstConfig(layers=[0, 2]))
    bank = adapted.banks["default"]
    assert isinstance(bank, LstBank)
    assert list(bank.order) == [f"{path}.0", f"{path}.2"] and bank.receiver == RECEIVERS[kind]
    assert adapted.peft_config["default"].hidden_size == WIDTH
    assert sorted(s.path for s in adapted.sites()) == sorted({*entries, RECEIVERS[kind]})


@pytest.mark.parametrize("kind", KINDS)
def test_backward_stays_out_of_the_backbone(kind):
    """No backbone parameter gets a gradient, autograd saves nothing while a backbone block runs (LoRA: > 20
    tensors), and in all it saves fewer tensors (ratio <= 0.6) holding far fewer
    activation elements (ratio <= 0.2) than LoRA r=8 on the attention projections of the same model."""
    ids = batch(kind, seed=3)["input_ids"]
    lst = up.adapt(build(kind), up.LstConfig())
    lora = up.adapt(build(kind), up.LoraConfig(r=8, target_modules=LORA_TARGETS[kind]))
    lst_count, lst_elements, lst_inside = saved_for_backward(lst, ids)
    lora_count, lora_elements, lora_inside = saved_for_backward(lora, ids)
    assert lst_inside == 0 and lora_inside > 20, (lst_inside, lora_inside)  # nothing saved inside the backbone
    # measured on these models: counts 48/92 (bert), 46/82 (gpt2), 46/109 (llama); elements 0.08-0.17 of LoRA's
    assert lst_count <= 0.6 * lora_count, (lst_count, lora_count)
    assert lst_elements <= 0.2 * lora_elements, (lst_elements, lora_elements)
    bank_ids = {id(p) for p in lst.banks.parameters()}
    assert all(p.grad is None for p in lst.parameters() if id(p) not in bank_ids)
    assert all(p.grad is not None for p in lst.banks.parameters() if p.requires_grad and p.numel() > 1)


@pytest.mark.parametrize("kind", KINDS)
def test_training_moves_only_the_side_network_and_lowers_the_loss(kind):
    model = up.adapt(build(kind), up.LstConfig(reduction_factor=4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = train(model, kind, steps=40)
    assert losses[-1] < BOUND[kind] * losses[0], losses[::10]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("banks.default.") for n in changed), sorted(changed)[:5]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n in before if n.startswith("banks.default.")}


@pytest.mark.parametrize("sherl", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_is_exact(kind, sherl, tmp_path):
    layers = [0, 1, 2] if sherl else [0, 2]
    model = up.adapt(build(kind), up.LstConfig(sherl=sherl, layers=layers))
    train(model, kind, steps=5)
    inputs = batch(kind, seed=7)
    out = logits(model, inputs)
    assert (out - logits(build(kind), inputs)).abs().max() > 1e-3
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LST" and saved["sherl"] is sherl and saved["layers"] == layers
    torch.manual_seed(123)  # the loaded side network's own init draws other numbers
    loaded = up.AdaptedModel.from_pretrained(build(kind), tmp_path)
    assert isinstance(loaded.peft_config["default"], up.LstConfig)
    assert torch.equal(logits(loaded, inputs), out)


@pytest.mark.parametrize("kind", KINDS)
def test_sherl_trains_and_differs_from_plain_lst(kind):
    plain = up.adapt(build(kind), up.LstConfig(reduction_factor=4))
    sherl = up.adapt(build(kind), up.LstConfig(reduction_factor=4, sherl=True))
    # SHERL's early rungs (all but the last) do not mix a previous state: no gate there; a scoring vector instead
    assert hasattr(plain.banks["default"].rungs[1], "gate") and not hasattr(sherl.banks["default"].rungs[1], "gate")
    assert sherl.banks["default"].sherl_score.weight.shape == (1, WIDTH // 4)
    plain_losses, sherl_losses = train(plain, kind, 60), train(sherl, kind, 60)
    assert sherl_losses[-1] < BOUND[kind] * sherl_losses[0], sherl_losses[::10]
    inputs = batch(kind, seed=5)
    assert (logits(plain, inputs) - logits(sherl, inputs)).abs().max() > 0.1  # measured 0.83 / 18.0 / 28.6
    assert plain_losses != sherl_losses


def test_anti_redundancy_weights_divide_by_redundancy():
    """Shallow features e1 = e2 and e3 orthogonal to them, scored equally (v = 0, b = 1): redundancies
    r = (1+1+0, 1+1+0, 0+0+1) = (2, 2, 1), so w = (1/2, 1/2, 1) / 2 = (0.25, 0.25, 0.5) (less 1e-6 / 2);
    c = g + 0.25 e1 + 0.25 e2 + 0.5 e3."""
    score = nn.Linear(4, 1)
    with torch.no_grad():
        score.weight.zero_()
        score.bias.fill_(1.0)
    e1 = torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(2, 5, 4)
    e3 = torch.tensor([0.0, 3.0, 0.0, 0.0]).expand(2, 5, 4)
    guide = torch.tensor([1.0, 1.0, 2.0, 0.0]).expand(2, 5, 4)
    w = anti_redundancy_weights(torch.stack([e1, e1, e3], -2), guide, score)
    torch.testing.assert_close(w, torch.tensor([0.25, 0.25, 0.5]).expand(2, 5, 3), rtol=0, atol=1e-6)
    c = consolidate([e1, e1, e3, guide], score)
    torch.testing.assert_close(c[0, 0], torch.tensor([1.5, 2.5, 2.0, 0.0]), rtol=0, atol=1e-5)
    # The learned score moves the weight: v along e3 * g (b = 0) scores e1, e2 at relu(0) = 0 and e3 at 3.
    with torch.no_grad():
        score.weight.copy_(torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
        score.bias.zero_()
    w = anti_redundancy_weights(torch.stack([e1, e1, e3], -2), guide, score)
    torch.testing.assert_close(w, torch.tensor([0.0, 0.0, 1.0]).expand(2, 5, 3), rtol=0, atol=1e-6)


def test_trainable_parameters_against_lora_on_bert():
    """Per rung: down 32*4+4, LayerNorm 8, two 4x4 linears 40, a gate 1 (not the first rung); up 4*32+32:
    180 + 181 + 181 + 160 = 702, against LoRA r=8 on query/value: 3 layers * 2 * 8 * (32+32) = 3072."""
    lst, _ = up.adapt(build("bert"), up.LstConfig()).get_nb_trainable_parameters()
    lora, _ = up.adapt(build("bert"), up.LoraConfig(r=8, target_modules=["query", "value"])).get_nb_trainable_parameters()
    assert (lst, lora) == (702, 3072)
    assert 0.2 <= lst / lora <= 0.25


def test_model_without_a_layer_list_is_a_config_error():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(up.ConfigError, match=r"Sequential has no layer list.*encoder\.layer.*transformer\.h.*model\.layers"):
        up.adapt(model, up.LstConfig())
    assert all(p.requires_grad for p in model.parameters()) and not any(isinstance(m, up.Delta) for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("changes, match", [
    ({"reduction_factor": 64}, r"reduction_factor: 64 exceeds the hidden width 32"),
    ({"layers": [5]}, r"layers: \[5\] name no block"),
    ({"target_modules": ["transformer.h.0.ln_1", "transformer.h.1"]}, r"norm 'transformer.h.0.ln_1' is not the last"),
    ({"target_modules": ["transformer.ln_f"]}, r"lists no block"),
    ({"sherl": True, "layers": [0, 2]}, r"sherl: .* needs at least 3 feeding layers; got 2"),
])
def test_bad_fields_are_config_errors_before_training(changes, match):
    model = build("gpt2")
    with pytest.raises(up.ConfigError, match=match):
        up.adapt(model, up.LstConfig(**changes))
    assert not any(isinstance(m, up.Delta) for m in model.modules())


@pytest.mark.parametrize("value, field", [(0, "reduction_factor"), ([], "layers"), ([-1], "layers"), ("yes", "sherl")])
def test_field_rules(value, field):
    with pytest.raises(up.ConfigError, match=f"LstConfig.{field}"):
        up.LstConfig(**{field: value})


def test_listed_targets_feed_and_the_last_receives():
    """target_modules listed: the blocks feed, the last listed site receives (here a middle block)."""
    model = up.adapt(build("gpt2"), up.LstConfig(target_modules=["transformer.h.0", "transformer.h.1"]))
    bank = model.banks["default"]
    assert list(bank.order) == ["transformer.h.0", "transformer.h.1"] and bank.receiver == "transformer.h.1"


def test_cached_generation_equals_uncached():
    """The side network is position-wise, so greedy decoding with a KV cache gives the uncached tokens."""
    model = up.adapt(build("gpt2"), up.LstConfig(reduction_factor=4))
    train(model, "gpt2", steps=10)
    prompt = batch("gpt2", seed=9, rows=2)["input_ids"][:, :4]
    cached = model.generate(input_ids=prompt, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    ids = prompt
    for _ in range(5):
        ids = torch.cat([ids, logits(model, {"input_ids": ids})[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(cached, ids)


def test_blocks_holding_other_adapters_are_refused():
    """Core's sites do not nest: LST's block sites over LoRA's sites inside the blocks are a ConfigError."""
    model = up.adapt(build("bert"), up.LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(up.ConfigError, match=r"already hold adapted modules.*attention\.self\.query"):
        model.add_adapter("side", up.LstConfig())
    assert sorted(model.peft_config) == ["default"]


def test_on_an_nf4_quantized_llama(tmp_path):
    """The backbone may be 4-bit: LST reads its blocks' outputs and never touches the packed weights."""
    pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (the `test` extra)")
    from transformers import BitsAndBytesConfig

    from tests.interop._models import save_tiny_llama

    folder = save_tiny_llama(tmp_path / "llama")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = LlamaForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.float32).train()
    packed = [(p, p.detach().clone()) for p in model.parameters() if p.dtype == torch.uint8]
    assert packed
    ids = torch.randint(1, 96, (3, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(input_ids=ids).logits
    adapted = up.adapt(model, up.LstConfig(reduction_factor=4))
    with torch.no_grad():
        assert torch.equal(adapted(input_ids=ids).logits, base)
    opt = torch.optim.Adam([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = adapted(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses[::5]
    assert all(torch.equal(p, before) for p, before in packed)
