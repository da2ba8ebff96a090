"""`unipeft federated CONFIG.yaml`: federated training of an adapter on Flower's simulation engine."""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the `federated` verb."""
    parser.description = (
        "Train the run's adapter across N simulated clients with Flower (Ray): each round the server samples "
        "clients, each trains on its part of the training split, the server checks and aggregates their "
        "adapters (fedavg, fedavg_exact, ffa_lora, lora_fair, fedkseed), evaluates and checkpoints it. "
        "A rerun with the same output_dir resumes after the newest round checkpoint.")
    parser.add_argument("config", help="federated YAML (train: run config; clients, rounds, strategy, partition)")
    parser.add_argument("--parallel", type=int, help="clients trained at once (default: the CPU count)")
    parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="--key value pairs, e.g. --rounds 3 --strategy.name ffa_lora --train.optimizer.lr 3e-3")


def run(args: argparse.Namespace) -> int:
    from ..cli_args import pull_flags
    from .config import load_federated_config
    from .simulate import run_federated

    fed = load_federated_config(args.config, pull_flags(args, ("--quiet", "--verbose"), {"--parallel": int}))
    summary = run_federated(fed, args.parallel, progress=not args.quiet, verbose=args.verbose)
    final = summary["final"]
    shown = {k: v for k, v in final.items() if k.startswith(("valid_", "test_")) or k in ("round", "up_bytes")}
    print(json.dumps(shown, indent=1))
    print(f"history: {fed.output_dir}/history.json; global adapter per round: {fed.output_dir}/round-NNNN/adapter")
    return 0
