"""The continuous-batching Engine on a tiny seeded Llama (and GPT-2) with LoRA adapters and a prompt adapter:
outputs equal offline generation token for token, batching really happens, stop/eos/length semantics,
seeded sampling, adapter loads between steps, draining stop."""
from __future__ import annotations

import copy
import queue
import threading
import time

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import unipeft as up
from unipeft.serve import Engine, GenRequest, TokenEvent

LORAS = {"a": ["q_proj", "v_proj"], "b": ["q_proj", "o_proj", "down_proj"], "c": ["k_proj", "up_proj"]}


def randomize(model, name: str, seed: int) -> None:
    """Random LoRA B matrices, so every adapter changes the outputs (and differently)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for delta in model.deltas(name):
            delta.lora_B.weight.normal_(0, 0.3, generator=g)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=48,
                                        max_position_embeddings=256)).eval()
    m = None
    for i, (name, targets) in enumerate(LORAS.items()):
        cfg = up.LoraConfig(r=4, target_modules=targets)
        m = up.adapt(base, cfg, name) if m is None else m
        if name not in m.peft_config:
            m.add_adapter(name, cfg)
        randomize(m, name, i)
    torch.manual_seed(1)
    m.add_adapter("pt", up.PromptTuningConfig(num_virtual_tokens=3))  # cannot mix: its own group
    return m


def offline(model, adapter: str | None, prompt: list[int], n: int, **kw) -> list[int]:
    """Greedy tokens of transformers' generate on a copy: the LoRA adapter merged into the base (merge_and_unload),
    the plain base, or the prompt adapter active. Ends at eos only when `eos_token_id` is given (eos dropped)."""
    copied = copy.deepcopy(model)
    if adapter is None:
        lm = copied.unload()
    elif adapter == "pt":
        copied.set_adapter("pt")
        lm = copied
    else:
        lm = copied.merge_and_unload([adapter])
    eos = kw.pop("eos_token_id", None)
    out = lm.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0, **kw)
    toks = out[0, len(prompt):].tolist()
    return toks[:toks.index(eos)] if eos in toks else toks


def collect(q: "queue.Queue[TokenEvent]") -> tuple[list[int], TokenEvent]:
    """All token ids of one request and its final event."""
    toks = []
    while True:
        event = q.get(timeout=20)
        if event.finished:
            assert event.token_id is None
            return toks, event
        toks.append(event.token_id)


def wait_for(engine: Engine, tokens: int) -> dict:
    """Block until the engine generated at least `tokens` tokens; its stats then."""
    deadline = time.time() + 20
    while engine.stats()["tokens"] < tokens:
        assert time.time() < deadline, engine.stats()
        time.sleep(0.001)
    return engine.stats()


@pytest.fixture
def engine(model):
    engines = []

    def make(**kw) -> Engine:
        e = Engine(model, None, **{"eos_ids": [], **kw})
        e.start()
        engines.append(e)
        return e

    yield make
    for e in engines:
        e.stop(drain=False)


def test_greedy_outputs_equal_offline_merged_generation_while_requests_join_and_leave(model, engine):
    eng = engine(max_batch=16)
    g = torch.Generator().manual_seed(5)
    names = ["a", "b", "c", None, "pt"]
    reqs = [GenRequest(torch.randint(0, 128, (2 + (i * 5) % 11,), generator=g).tolist(), names[i % 5],
                       max_tokens=6 + (i * 3) % 9) for i in range(15)]
    qs, running_at_join = [], []
    for wave, after in ((reqs[:5], 0), (reqs[5:10], 12), (reqs[10:], 40)):
        running_at_join.append(wait_for(eng, after)["running"])
        qs += [eng.submit(r) for r in wave]
    results = [collect(q) for q in qs]
    for req, (toks, final) in zip(reqs, results):
        assert final.finish_reason == "length" and final.error is None
        assert toks == offline(model, req.adapter, req.prompt_ids, req.max_tokens), req
    assert running_at_join[1] > 0 and running_at_join[2] > 0  # later waves joined a running batch
    stats = eng.stats()
    total = sum(r.max_tokens for r in reqs)
    assert stats["tokens"] == total and stats["finished"] == 15 and stats["running"] == stats["waiting"] == 0
    assert max(stats["batch_sizes"]) > 1 and stats["forwards"] < total
    assert stats["decode_forwards"] == sum(stats["batch_sizes"].values())
    # Adapters really differ: one prompt, five different continuations.
    prompt = reqs[0].prompt_ids
    assert len({tuple(offline(model, n, prompt, 8)) for n in names}) == 5


def test_gpt2_mixed_batch_equals_offline():
    torch.manual_seed(3)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0,
                                      eos_token_id=0)).eval()
    m = up.adapt(base, up.LoraConfig(r=4, target_modules=["c_attn"]), "x")
    randomize(m, "x", 9)
    eng = Engine(m, None, eos_ids=[])
    reqs = [GenRequest([4, 5, 6, 7, 8, 9, 10], "x", max_tokens=7), GenRequest([11, 12], None, max_tokens=9),
            GenRequest([13, 14, 15], "x", max_tokens=5), GenRequest([1] * 9, None, max_tokens=6)]
    qs = [eng.submit(r) for r in reqs]  # queued before start: prefilled together, left-padded
    eng.start()
    for req, q in zip(reqs, qs):
        assert collect(q)[0] == offline(m, req.adapter, req.prompt_ids, req.max_tokens)
    eng.stop()
    assert eng.stats()["prefill_forwards"] == 1 and eng.stats()["batch_sizes"].get(4, 0) == 4


def _greedy_reference(model) -> tuple[list[int], list[int]]:
    """A prompt whose base greedy continuation G (12 tokens) has G[2] new and the pair G[3:5] only once."""
    for start in range(1, 100):
        prompt = [start, start + 7, start + 3]
        ref = offline(model, None, prompt, 12)
        pairs = [tuple(ref[i:i + 2]) for i in range(11)]
        if ref[2] not in ref[:2] and pairs.count(tuple(ref[3:5])) == 1 and ref[5] not in ref[:5]:
            return prompt, ref
    raise AssertionError("no suitable prompt")


def test_stop_ids_eos_max_tokens_and_min_tokens(model, engine):
    prompt, ref = _greedy_reference(model)
    eng = engine()
    cases = {"max": GenRequest(prompt, max_tokens=4), "one": GenRequest(prompt, max_tokens=1),
             "pair": GenRequest(prompt, max_tokens=12, stop_ids=[[ref[3], ref[4]]]),
             "partial": GenRequest(prompt, max_tokens=8, stop_ids=[[ref[3], (ref[4] + 1) % 128]]),
             "single": GenRequest(prompt, max_tokens=12, stop_ids=[[999_999], [ref[5]]])}
    out = {k: collect(eng.submit(r)) for k, r in cases.items()}
    assert out["max"] == (ref[:4], TokenEvent(None, True, "length"))
    assert out["one"] == (ref[:1], TokenEvent(None, True, "length"))
    assert out["pair"] == (ref[:3], TokenEvent(None, True, "stop"))  # the stop pair itself is never sent
    assert out["partial"] == (ref[:8], TokenEvent(None, True, "length"))  # held back, then sent: no match
    assert out["single"] == (ref[:5], TokenEvent(None, True, "stop"))

    eos = ref[2]
    eng = engine(eos_ids=[eos])
    toks, final = collect(eng.submit(GenRequest(prompt, max_tokens=12)))
    assert (toks, final.finish_reason) == (ref[:2], "stop")  # eos ends it and is not sent
    for least in (3, 5):
        expect = offline(model, None, prompt, 12, eos_token_id=eos, min_new_tokens=least)
        toks, final = collect(eng.submit(GenRequest(prompt, max_tokens=12, min_tokens=least)))
        assert toks == expect and len(toks) >= least
        assert final.finish_reason == ("length" if len(expect) == 12 else "stop")
    toks, final = collect(eng.submit(GenRequest(prompt, max_tokens=2, min_tokens=5)))
    assert (toks, final.finish_reason) == (ref[:2], "length")  # max_tokens wins over min_tokens


def test_seeded_sampling_is_reproducible(model, engine):
    eng = engine()

    def sample(seed, adapter="a", top_p=0.9, temperature=1.0):
        req = GenRequest([3, 1, 4, 1, 5], adapter, max_tokens=12, temperature=temperature, top_p=top_p, seed=seed)
        return collect(eng.submit(req))[0]

    first, again = sample(7), sample(7)
    concurrent = [eng.submit(GenRequest([3, 1, 4, 1, 5], "a", 12, 1.0, 0.9, seed=s)) for s in (7, 8, 7)]
    runs = [collect(q)[0] for q in concurrent]
    assert first == again == runs[0] == runs[2] and len(first) == 12
    assert runs[1] != first and sample(8) == runs[1]  # another seed, other tokens
    greedy = offline(model, "a", [3, 1, 4, 1, 5], 12)
    assert sample(1, top_p=1e-6) == greedy  # only the likeliest token is left
    assert sample(None, temperature=0) == greedy


def test_run_exclusive_loads_an_adapter_between_steps(model, engine):
    eng = engine()
    long = [GenRequest([9, 8, 7, 6], "a", max_tokens=30), GenRequest([5, 5], None, max_tokens=28),
            GenRequest([2, 4, 6, 8, 10], "pt", max_tokens=26)]
    qs = [eng.submit(r) for r in long]
    wait_for(eng, 6)

    def load():
        model.add_adapter("new", up.LoraConfig(r=4, target_modules=["v_proj", "gate_proj"]))
        randomize(model, "new", 42)
        return threading.current_thread().name, eng.stats()["running"]

    thread_name, running = eng.run_exclusive(load)
    assert thread_name == "unipeft-engine" and running == 3  # between steps, requests in flight
    with pytest.raises(KeyError, match="boom"):
        eng.run_exclusive(lambda: {}["boom"])  # the caller gets fn's exception
    fresh = GenRequest([9, 8, 7, 6], "new", max_tokens=10)
    toks, final = collect(eng.submit(fresh))
    assert toks == offline(model, "new", fresh.prompt_ids, 10) != offline(model, "a", fresh.prompt_ids, 10)
    for req, q in zip(long, qs):
        assert collect(q)[0] == offline(model, req.adapter, req.prompt_ids, req.max_tokens)
    # Unloading an adapter mid-request ends that request with an error; the others go on.
    q_new, q_base = eng.submit(GenRequest([1, 2], "new", max_tokens=40)), eng.submit(GenRequest([1, 2], None, 20))
    wait_for(eng, eng.stats()["tokens"] + 4)
    eng.run_exclusive(lambda: model.delete_adapter("new"))
    toks, final = collect(q_new)
    assert final.error == "adapter 'new' was unloaded while this request ran" and len(toks) < 40
    assert collect(q_base)[0] == offline(model, None, [1, 2], 20)


def test_stop_drains_in_flight_requests_and_refuses_new_ones(model, engine):
    eng = engine()
    reqs = [GenRequest([7, 7, 7], n, max_tokens=10 + i) for i, n in enumerate(["a", "b", None, "pt"])]
    qs = [eng.submit(r) for r in reqs]
    wait_for(eng, 1)
    eng.stop(drain=True)  # returns once every accepted request finished
    assert eng.stats()["running"] == eng.stats()["waiting"] == 0
    for req, q in zip(reqs, qs):
        toks, final = collect(q)
        assert final.finish_reason == "length" and toks == offline(model, req.adapter, req.prompt_ids, req.max_tokens)
    late = collect(eng.submit(GenRequest([1], "a")))
    assert late == ([], TokenEvent(None, True, None, error="the engine is stopping and accepts no new requests"))

    eng = engine()
    q = eng.submit(GenRequest([7, 7, 7], "a", max_tokens=200))
    wait_for(eng, 2)
    eng.stop(drain=False)
    toks, final = collect(q)
    assert final.error == "the engine was stopped before this request finished" and 2 <= len(toks) < 200


def test_invalid_requests_get_one_error_event_naming_the_field(model, engine):
    eng = engine()
    bad = {"adapter: 'zz' is not loaded; loaded adapters: ['a', 'b', 'c', 'pt']": GenRequest([1], "zz"),
           "prompt_ids must be a non-empty list of token ids": GenRequest([]),
           "prompt_ids: every token id must be in [0, 128)": GenRequest([1, 128]),
           "max_tokens must be an integer >= 1, got 0": GenRequest([1], max_tokens=0),
           "top_p must be in (0, 1], got 0": GenRequest([1], top_p=0),
           "temperature must be >= 0, got -1": GenRequest([1], temperature=-1),
           "stop_ids must be a list of non-empty lists of token ids": GenRequest([1], stop_ids=[[]])}
    for message, req in bad.items():
        assert collect(eng.submit(req)) == ([], TokenEvent(None, True, None, error=message))
    assert eng.stats()["errors"] == len(bad) and eng.stats()["tokens"] == 0


@pytest.mark.slow
def test_smollm2_chat_requests_on_two_adapters_equal_offline():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unipeft.train.models import model_path

    path = model_path("smollm2")
    tok = AutoTokenizer.from_pretrained(str(path))
    m = up.adapt(AutoModelForCausalLM.from_pretrained(str(path)).eval(), up.LoraConfig(r=4, target_modules=["q_proj"]),
                 "x")
    m.add_adapter("y", up.LoraConfig(r=4, target_modules=["v_proj"]))
    for i, name in enumerate("xy"):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for delta in m.deltas(name):
                delta.lora_B.weight.normal_(0, 0.01, generator=g)
    questions = ["What is the capital of France?", "Name a colour.", "What is 2+2?", "Say hello."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True) for q in questions]
    prompts = [p if isinstance(p, list) else p["input_ids"] for p in prompts]
    eng = Engine(m, tok, max_batch=8)
    assert eng.eos_ids == [tok.eos_token_id]
    eng.start()
    reqs = [GenRequest(p, a, max_tokens=8) for p in prompts for a in ("x", "y", None)]
    qs = [eng.submit(r) for r in reqs[:6]]  # concurrent: one batch of three adapters
    results = [collect(q) for q in qs]
    eng.stop(drain=True)
    for req, (toks, _) in zip(reqs, results):
        assert toks == offline(m, req.adapter, req.prompt_ids, 8, eos_token_id=tok.eos_token_id)
    assert "paris" in tok.decode(results[2][0]).lower()
    assert max(eng.stats()["batch_sizes"]) == 6


def test_weights_changed_by_a_job_between_steps_are_served(model, engine):
    """While serving, mixed-batch caches key on the model's version (static_weights), which every job bumps."""
    eng = engine()
    prompt = [3, 1, 4, 1, 5]
    before = [GenRequest(prompt, n, max_tokens=8) for n in ("a", "b")]
    first = [collect(eng.submit(r))[0] for r in before]  # both in one mixed batch: stacks cached
    held = model._ctx.static_weights
    assert held >= 1
    saved = [d.lora_B.weight.detach().clone() for d in model.deltas("a")]
    try:
        eng.run_exclusive(lambda: randomize(model, "a", 99))  # in place: no weight version is read while serving
        again = [collect(eng.submit(r))[0] for r in before]
        assert again[0] == offline(model, "a", prompt, 8) != first[0]
        assert again[1] == first[1]
    finally:
        with torch.no_grad():
            for d, w in zip(model.deltas("a"), saved):
                d.lora_B.weight.copy_(w)
    eng.stop()
    assert model._ctx.static_weights == held - 1  # weight checks are back once no engine serves the model

