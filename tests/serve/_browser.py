"""Helpers for the playground test: a tiny seeded Llama with LoRA adapter folders, the real server on a free
port in a thread, and headless Debian chromium driven by selenium."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from ._server import build_app as _build_app
from ._server import make_adapter, make_base, offline
from ._server import serving as serve  # noqa: F401  (the page test imports it from here)

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


def save_tiny_llama(path: Path, seed: int = 0) -> Path:
    """The servers' tiny Llama, without a chat template (the page shows the server's error for chat)."""
    return make_base(path, seed, chat_template=False)


def save_lora(base_dir: Path, path: Path, seed: int, targets: list[str]) -> Path:
    """A LoRA adapter folder with random weights on `targets`."""
    return make_adapter(base_dir, path, seed, targets=tuple(targets))


def offline_greedy(base_dir: Path, adapter_dir: Path | None, prompt: str, n: int) -> str:
    """The library's offline greedy completion with the adapter merged."""
    return offline(base_dir, adapter_dir, prompt, n)


def build_app(base_dir: Path, adapters: dict[str, Path]):
    """The real server app over the tiny base with `adapters` loaded at startup."""
    return _build_app(base_dir, adapters)[0]
