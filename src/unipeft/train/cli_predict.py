"""`unipeft predict RUN_DIR TEXT...`: the label (classification) or the completion (causal LM) of each text."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the predict verb."""
    parser.add_argument("run_dir", help="a finished run folder (output_dir of unipeft train)")
    parser.add_argument("texts", nargs="*", help="input texts (or use --file)")
    parser.add_argument("--file", default=None, help="read one input per line from this file ('-': stdin)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="causal LM: tokens to generate")


def run(args: argparse.Namespace) -> int:
    """Print one line per input: `label<TAB>probability<TAB>text`, or the generated completion."""
    from ..core.errors import ConfigError
    from .artifacts import classify, generate, input_lines, load_run

    texts = input_lines(args.texts, args.file, "predict")
    loaded = load_run(args.run_dir)
    if loaded.cfg.task == "classification":
        if loaded.tokenizer is None:
            raise ConfigError("predict: this run's model takes vectors, not text; use unipeft eval instead")
        for text, (label, prob) in zip(texts, classify(loaded, texts)):
            print(f"{label}\t{prob:.3f}\t{text}")
    else:
        for completion in generate(loaded, texts, args.max_new_tokens):
            print(completion)
    return 0
