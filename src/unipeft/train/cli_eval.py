"""`unipeft eval RUN_DIR`: metrics of a finished run on one of its splits or on a data file."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the eval verb."""
    parser.add_argument("run_dir", help="a finished run folder (output_dir of unipeft train)")
    parser.add_argument("--split", default="test", choices=["train", "valid", "test"],
                        help="which split of the run's data (default: test)")
    parser.add_argument("--data", default=None, help="evaluate on this CSV/JSONL/text file instead")
    parser.add_argument("--batch-size", type=int, default=64)


def run(args: argparse.Namespace) -> int:
    """Print the metrics as one JSON line."""
    import json

    from ..data.encode import encode_split
    from .artifacts import eval_splits, load_run
    from .evaluate import evaluate

    loaded = load_run(args.run_dir)
    data = eval_splits(loaded, args.data).get("test" if args.data else args.split)
    encoded = encode_split(loaded.tokenizer, data, loaded.cfg.data.max_length, loaded.cfg.data.chat_template)
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer is not None else 0
    metrics = evaluate(loaded.model, encoded, loaded.cfg.task, args.batch_size, pad or 0, len(loaded.label_names))
    print(json.dumps({"split": args.data or args.split, **metrics}))
    return 0
