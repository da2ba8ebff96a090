"""The server under bad input, corrupt adapter folders, a thousand concurrent requests and SIGTERM: every refusal
is a 4xx JSON error naming the field, the model is left unchanged, no request is lost, and a `unipeft serve`
process finishes its in-flight requests before exiting 0."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from ._server import PROMPTS, build_app, free_port, make_adapter, make_base, metric, offline, serving


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The tiny base with adapter 'a' loaded, served in a thread."""
    tmp = tmp_path_factory.mktemp("rel")
    base = make_base(tmp / "base")
    folder = make_adapter(base, tmp / "a", 1)
    app, model = build_app(base, {"a": folder}, max_adapters=4, max_batch=32)
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield {"tmp": tmp, "base": base, "a": folder, "client": client, "model": model, "url": url}


def normal_request_works(client, base, folder) -> None:
    """A well-formed request after a refused one: 200 and the offline greedy text."""
    r = client.post("/v1/completions", json={"model": "a", "prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == offline(base, folder, PROMPTS[0], 5)


LONG = " ".join(["apple"] * 40)  # 41 tokens with [CLS]; the tiny Llama has 64 positions
BAD = [  # (path, body: dict or raw bytes, status, param, words of the message)
    ("/v1/completions", b'{"prompt": "x", ', 400, None, ["not valid JSON"]),
    ("/v1/completions", b"[1, 2]", 400, None, ["JSON object", "list"]),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model", ["'nope'", "base", "a"]),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens", ["integer", "'ten'"]),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", ["greater than or equal to 1"]),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature", ["temperature"]),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p", ["greater than 0"]),
    ("/v1/completions", {"prompt": 5}, 400, "prompt", ["prompt"]),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt", ["required"]),
    ("/v1/completions", {"prompt": "x", "stop": 3}, 400, "stop", ["stop"]),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream", ["boolean"]),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "min_tokens": 5}, 400, "min_tokens", ["max_tokens 2"]),
    ("/v1/completions", {"prompt": [1, 10 ** 6]}, 400, "prompt", ["1000000", "vocabulary"]),
    ("/v1/completions", {"prompt": LONG, "max_tokens": 30}, 400, "max_tokens",
     ["41 tokens", "context of 64", "at most 23 new tokens"]),
    ("/v1/completions", {"prompt": LONG, "max_tokens": 30, "stream": True}, 400, "max_tokens", ["context of 64"]),
    ("/v1/chat/completions", {"max_tokens": 3}, 400, "messages", ["required"]),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages.0.content", ["required"]),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role", ["robot"]),
    ("/v1/classify", {"input": "hi"}, 400, "model", ["causal LM"]),
    ("/v1/adapters", {"name": "x"}, 400, "path", ["required"]),
    ("/v1/adapters", {"name": "../x", "path": "/tmp"}, 400, "name", ["pattern"]),
    ("/v1/adapters", {"name": "base", "path": "/tmp"}, 400, "name", ["base model"]),
]


@pytest.mark.parametrize("path,body,status,param,words", BAD, ids=[f"{b[0]}-{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_4xx_naming_the_field_and_the_server_keeps_serving(env, path, body, status, param, words):
    client = env["client"]
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] in ("invalid_request_error", "not_found_error")
    for word in words:
        assert word in err["message"], (word, err["message"])
    if param:
        assert err["message"].startswith(param.split(".")[0])  # the message names the field first
    normal_request_works(client, env["base"], env["a"])


def test_unknown_adapter_on_delete_and_conflicting_name(env):
    client = env["client"]
    r = client.delete("/v1/adapters/missing")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = client.post("/v1/adapters", json={"name": "a", "path": str(env["a"])})
    assert r.status_code == 409 and "already loaded" in r.json()["error"]["message"]
    normal_request_works(client, env["base"], env["a"])


def corrupt_folders(tmp, good):
    """(folder, words of the expected message) for each way an adapter folder can be broken."""
    truncated = tmp / "truncated"
    shutil.copytree(good, truncated)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    pickle_only = tmp / "pickle_only"
    shutil.copytree(good, pickle_only)
    (pickle_only / "adapter_model.safetensors").unlink()
    torch.save({"x": torch.zeros(2)}, pickle_only / "adapter_model.bin")
    wrong_shape = tmp / "wrong_shape"
    shutil.copytree(good, wrong_shape)
    cfg = json.loads((wrong_shape / "adapter_config.json").read_text())
    (wrong_shape / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    bad_config = tmp / "bad_config"
    shutil.copytree(good, bad_config)
    (bad_config / "adapter_config.json").write_text("{not json")
    no_config = tmp / "no_config"
    no_config.mkdir()
    return [(truncated, ["adapter_model.safetensors", "cannot read safetensors"]),
            (pickle_only, ["adapter_model.bin", "pickle", "safetensors"]),
            (wrong_shape, ["does not fit", "shape"]),
            (bad_config, ["adapter_config.json"]),
            (no_config, ["no adapter_config.json"]),
            (tmp / "missing", ["does not exist"])]


def test_corrupt_adapter_folders_are_refused_and_the_model_is_unchanged(env):
    client, model, tmp = env["client"], env["model"], env["tmp"]
    names, sites = sorted(model.peft_config), sorted(s.path for s in model.sites())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    listed = client.get("/v1/models").json()
    for i, (folder, words) in enumerate(corrupt_folders(tmp, env["a"])):
        r = client.post("/v1/adapters", json={"name": f"bad{i}", "path": str(folder)})
        assert r.status_code == 400, (folder, r.text)
        err = r.json()["error"]
        assert err["param"] == "path", err
        for word in words:
            assert word in err["message"], (folder.name, word, err["message"])
        assert sorted(model.peft_config) == names and sorted(s.path for s in model.sites()) == sites
        now = model.state_dict()
        assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())
        assert client.get("/v1/models").json() == listed
        normal_request_works(client, env["base"], env["a"])


@pytest.mark.parametrize("n", [200, pytest.param(1000, marks=pytest.mark.slow)])
def test_concurrent_requests_are_all_answered(env, n):
    client, url = env["client"], env["url"]
    jobs = [(["base", "a"][i % 2], PROMPTS[i % len(PROMPTS)]) for i in range(n)]
    want = {}
    for job in set(jobs):
        r = client.post("/v1/completions", json={"model": job[0], "prompt": job[1], "max_tokens": 3,
                                                 "temperature": 0})
        want[job] = r.json()["choices"][0]["text"]
    before = client.get("/metrics").text

    async def run():
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as ac:
            return await asyncio.gather(*(ac.post("/v1/completions", json={
                "model": m, "prompt": p, "max_tokens": 3, "temperature": 0}) for m, p in jobs))

    start = time.perf_counter()
    responses = asyncio.run(run())
    seconds = time.perf_counter() - start
    assert len(responses) == n and [r.status_code for r in responses] == [200] * n
    for (m, p), r in zip(jobs, responses):
        body = r.json()
        assert body["object"] == "text_completion" and body["model"] == m and len(body["choices"]) == 1
        assert body["choices"][0]["text"] == want[(m, p)]
        assert body["usage"]["completion_tokens"] <= 3
    assert len({r.json()["id"] for r in responses}) == n
    after = client.get("/metrics").text
    label = 'endpoint="/v1/completions",status="200"'
    assert metric(after, "unipeft_requests_total", label) - metric(before, "unipeft_requests_total", label) == n
    steps = metric(after, "unipeft_batch_size_count") - metric(before, "unipeft_batch_size_count")
    assert 0 < steps < n * 3  # rows were really batched together
    print(f"{n} requests in {seconds:.1f} s, {steps:.0f} decode steps")


@pytest.mark.slow  # a subprocess that imports torch and transformers
def test_sigterm_finishes_in_flight_requests_then_exits_0(env, tmp_path):
    port = free_port()
    env_vars = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(["nice", "-n", "19", sys.executable, "-m", "unipeft.serve.cli", "--model", str(env["base"]),
                             "--adapter", f"a={env['a']}", "--name", "base", "--port", str(port), "--max-batch", "2",
                             "--log-level", "warning"], env=env_vars, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "unipeft serve did not start"
            time.sleep(0.1)
        results: list = [None] * 6
        started = threading.Event()

        def stream(i: int) -> None:
            body = {"model": ["a", "base"][i % 2], "prompt": PROMPTS[i % 3], "max_tokens": 40, "min_tokens": 40,
                    "temperature": 0, "stream": True}
            with httpx.Client(base_url=url, timeout=120) as c, c.stream("POST", "/v1/completions", json=body) as r:
                events = []
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        started.set()
                        events.append(line[6:])
                results[i] = (r.status_code, events)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        assert started.wait(60)
        time.sleep(0.2)  # every request has reached the server (2 run, 4 wait in the queue)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.TransportError):  # no new connections once shutting down
            httpx.get(f"{url}/health", timeout=2)
        for t in threads:
            t.join(120)
        assert proc.wait(120) == 0, proc.communicate()[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    for status, events in results:
        assert status == 200 and events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert last["choices"][0]["finish_reason"] == "length" and last["usage"]["completion_tokens"] == 40
