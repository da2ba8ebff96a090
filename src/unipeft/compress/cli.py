"""`unipeft compress ADAPTER OUT --density D` (ComPEFT) and `unipeft extract-lora BASE TUNED OUT --rank R`."""
from __future__ import annotations

import argparse


def add_compress_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `unipeft compress`."""
    parser.add_argument("adapter", help="adapter folder (any unipeft method, or a PEFT folder unipeft reads)")
    parser.add_argument("out", help="folder for compeft_model.safetensors (bit-packed ternary); written atomically")
    parser.add_argument("--density", type=float, required=True,
                        help="share of each tensor's entries kept (top magnitudes), in (0, 1]")
    parser.add_argument("--scale", default="mean_abs", choices=["mean_abs", "std"],
                        help="the one scale per tensor: mean |kept| (default) or alpha * std of the task vector")
    parser.add_argument("--alpha", type=float, default=1.0, help="multiplier of the std scale rule (default 1)")
    parser.add_argument("--model", default=None,
                        help="the adapter's base model (a local folder, or 'minilm'): constant inits such as IA3's "
                             "ones are then subtracted before compressing (without it every reference is zero)")


def run_compress(args: argparse.Namespace) -> int:
    """Compress the adapter and print sizes and reconstruction errors."""
    from .compeft import compress_adapter

    base = None
    if args.model:
        from pathlib import Path

        from ..merge.cli import load_base
        base = load_base(args.model, Path(args.adapter), Path.cwd())
    s = compress_adapter(args.adapter, args.out, args.density, scale=args.scale, alpha=args.alpha, base_model=base)
    ternary = {k: v for k, v in s["tensors"].items() if v["kind"] == "ternary"}
    errs = [v["task_rel_error"] for v in ternary.values()]
    print(f"compressed {args.adapter} -> {args.out}: {s['bytes_before'] / 1024:.1f} KiB -> "
          f"{s['bytes_after'] / 1024:.1f} KiB ({s['ratio']:.1f}x smaller), density {s['density']}, "
          f"{len(ternary)} ternary tensors, {len(s['tensors']) - len(ternary)} kept as they were")
    if errs:
        print(f"  relative error of the task vectors: mean {sum(errs) / len(errs):.3f}, max {max(errs):.3f}")
    return 0


def add_extract_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `unipeft extract-lora`."""
    parser.add_argument("base", help="the base model folder (safetensors)")
    parser.add_argument("tuned", help="the fully fine-tuned model folder (same architecture)")
    parser.add_argument("out", help="folder for the LoRA adapter in PEFT's format; written atomically")
    parser.add_argument("--rank", type=int, required=True, help="LoRA rank per layer (the SVD is truncated there)")
    parser.add_argument("--target-modules", nargs="+", default=None,
                        help="module names or a regex (default: every Linear whose weight changed)")
    parser.add_argument("--min-fro-fraction", type=float, default=None,
                        help="per layer, the smallest rank <= --rank keeping this share of the task vector's energy "
                             "(squared Frobenius norm)")
    parser.add_argument("--embeddings", action="store_true", help="extract embedding layers too")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_extract(args: argparse.Namespace) -> int:
    """Extract the LoRA and print its size and per-layer errors."""
    from .extract import extract_lora

    targets = args.target_modules[0] if args.target_modules and len(args.target_modules) == 1 else args.target_modules
    s = extract_lora(args.base, args.tuned, args.out, args.rank, target_modules=targets,
                     min_fro_fraction=args.min_fro_fraction, include_embeddings=args.embeddings,
                     progress=not args.no_progress)
    rel = [v["rel_error"] for v in s["layers"].values()]
    print(f"extracted a rank-{s['rank']} LoRA of {len(rel)} layers ({s['total_params']:,} parameters, "
          f"{s['bytes'] / 1024:.1f} KiB) to {args.out}; {len(s['skipped'])} layers skipped")
    print(f"  relative Frobenius error of the task vectors: mean {sum(rel) / len(rel):.4f}, max {max(rel):.4f}")
    if s["changed_not_extracted"]:
        print(f"  changed but not extracted (not in the LoRA): {', '.join(s['changed_not_extracted'][:8])}"
              + (" ..." if len(s["changed_not_extracted"]) > 8 else ""))
    return 0
