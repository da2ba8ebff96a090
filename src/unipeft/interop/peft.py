"""Hugging Face PEFT interop: task-type conventions, and checked import/export of adapter folders."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from ..core.config import CONFIG_NAME, AdapterConfig
from ..core.errors import AdapterLoadError, ConfigError
from ..core.registry import get_method, method_for_config, public_methods
from ..core.state import WEIGHTS_NAME, read_adapter

# PEFT's PeftModelForSequenceClassification trains these heads as modules_to_save.
SEQ_CLS_HEADS = ["classifier", "score"]
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


def apply_task_type(config: AdapterConfig) -> AdapterConfig:
    """Add the modules PEFT trains implicitly for `config.task_type` (the classifier head for SEQ_CLS)."""
    task = config.task_type
    if task is not None and task not in TASK_TYPES:
        raise ConfigError(f"task_type={task!r} is not a PEFT task type; expected one of {list(TASK_TYPES)}")
    if task == "SEQ_CLS":
        extra = [m for m in SEQ_CLS_HEADS if m not in (config.modules_to_save or [])]
        if extra:
            return config.replace(modules_to_save=list(config.modules_to_save or []) + extra)
    return config


def _peft_types() -> list[str]:
    """PEFT type names of the registered methods PEFT can read."""
    specs = [get_method(n) for n in public_methods()]
    return sorted({s.config_cls.peft_type for s in specs if s.capabilities.peft_compatible})


def check_peft_folder(directory: str | Path) -> tuple[AdapterConfig, dict]:
    """Read a PEFT-format adapter folder and check that PEFT itself can read it back."""
    config, tensors = read_adapter(directory)
    spec = method_for_config(config)
    if not spec.capabilities.peft_compatible:
        raise ConfigError(f"{directory}: method '{spec.name}' ({config.peft_type}) has no PEFT equivalent; "
                          f"PEFT-compatible methods: {', '.join(_peft_types())}")
    prefix = type(config).state_prefix
    # Prompt-learning methods keep their own tensors at the file's root (PEFT's `prompt_embeddings`).
    rooted = spec.delta_cls.state_at_root
    bad = [k for k in tensors if not k.startswith(prefix) and not (rooted and "." not in k)]
    if bad:
        raise AdapterLoadError(f"{directory}: tensor keys must start with '{prefix}', e.g. {bad[0]!r} does not")
    return config, tensors


def _copy_checked(src: str | Path, dst: str | Path) -> Path:
    """Copy the two adapter files of `src` into `dst`, written next to it first, then moved in."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        config, tensors = read_adapter(src)
        config.save(tmp)  # re-serialised: normalised keys, PEFT names, inert fields dropped
        if (src / WEIGHTS_NAME).exists():
            shutil.copyfile(src / WEIGHTS_NAME, tmp / WEIGHTS_NAME)
        else:  # an older folder's adapter_model.bin (read with weights_only) is written as safetensors
            save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        dst.mkdir(parents=True, exist_ok=True)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            (tmp / name).replace(dst / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def export_to_peft(src: str | Path, dst: str | Path) -> Path:
    """Write the unipeft adapter in `src` as a folder PEFT loads (checked first)."""
    check_peft_folder(src)
    return _copy_checked(src, dst)


def import_from_peft(src: str | Path, dst: str | Path) -> Path:
    """Read a PEFT adapter folder, check every field is supported, and write it as a unipeft adapter."""
    check_peft_folder(src)
    return _copy_checked(src, dst)


def verify_on_model(directory: str | Path, base_model) -> None:
    """Load the adapter onto `base_model` to check every key and shape (the model is restored)."""
    from ..core.model import AdaptedModel

    AdaptedModel.from_pretrained(base_model, directory).unload()
