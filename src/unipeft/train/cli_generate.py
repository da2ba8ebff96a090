"""`unipeft generate RUN_OR_ADAPTER PROMPT...`: stream completions of a trained causal LM adapter."""
from __future__ import annotations

import argparse

EXAMPLES = """examples:
  unipeft generate runs/lm "Is red a colour?"
  unipeft generate runs/lm --file prompts.txt --max-new-tokens 64 --stop "\\n"
  unipeft generate runs/lm/adapter --base smollm2 --chat "Name a fruit." --temperature 0.7 --top-p 0.9 --seed 1
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the generate verb."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLES
    parser.add_argument("source", metavar="RUN_OR_ADAPTER",
                        help="a finished causal_lm run folder of unipeft train (its config.yaml names the base "
                             "model), or an adapter folder (adapter_config.json; base from its "
                             "base_model_name_or_path or --base)")
    parser.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts to complete (or use --file)")
    parser.add_argument("--file", default=None, help="read one prompt per line from this file ('-': stdin), "
                                                     "e.g. --file prompts.txt")
    parser.add_argument("--base", default=None, metavar="PATH_OR_BUILTIN",
                        help="the base model: a local model folder or a built-in name (e.g. smollm2); overrides "
                             "the adapter's base_model_name_or_path or the run's model")
    parser.add_argument("--chat", action="store_true",
                        help="render each prompt as a user turn of the tokenizer's chat template, followed by the "
                             "assistant's start (always on for runs trained with data.chat_template)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default: 64)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 (default): greedy decoding; > 0: sample with this temperature, e.g. 0.7")
    parser.add_argument("--top-p", type=float, default=None,
                        help="sampling: keep the smallest token set of this total probability, e.g. 0.9")
    parser.add_argument("--top-k", type=int, default=None, help="sampling: keep the k likeliest tokens, e.g. 50")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampler, for reproducible samples")
    parser.add_argument("--stop", action="append", default=[], metavar="STRING",
                        help="end a completion at the first STRING (not printed); repeatable, e.g. --stop '\\n'")
    parser.add_argument("--no-stream", action="store_true",
                        help="print each completion whole once done instead of token by token")


def _unescape(text: str) -> str:
    """'\\n' and '\\t' typed on the command line as the characters."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def run(args: argparse.Namespace) -> int:
    """Print each completion followed by a newline, streamed as it is generated (unless --no-stream)."""
    import sys

    from .artifacts import input_lines
    from .generate import GenerationOptions, generate, load_for_generation

    prompts = input_lines(args.prompts, args.file, "generate")
    options = GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed, stop=[_unescape(s) for s in args.stop],
                                chat=args.chat)
    options.generate_kwargs()  # bad settings fail before the model loads
    model, tokenizer, name, chat = load_for_generation(args.source, args.base)
    options.chat = options.chat or chat
    out = sys.stdout
    if args.no_stream:
        for text in generate(model, tokenizer, prompts, options, name=name):
            out.write(text + "\n")
        return 0

    def show(_: int, chunk: str) -> None:
        out.write(chunk)
        out.flush()

    def end(_: int, __: str) -> None:
        out.write("\n")
        out.flush()

    generate(model, tokenizer, prompts, options, on_text=show, on_end=end, name=name)
    return 0
