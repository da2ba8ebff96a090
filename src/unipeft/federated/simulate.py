"""`run_federated`: the ServerApp and ClientApp of a FederatedConfig on Flower's simulation engine (Ray).

Each of `clients` virtual SuperNodes gets `partition-id`/`num-partitions` from the simulation; Ray runs as
many ClientApp actors at once as `parallel` (one torch thread each, `client_cpus` CPUs each). The server's
work (sampling, checks, aggregation, evaluation, checkpoints) runs in this process.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

from .client import make_client_app
from .config import FederatedConfig
from .server import make_server_app


def pinned(fed: FederatedConfig, threads: int) -> FederatedConfig:
    """`fed` with the run's torch threads set (clients share the machine: never one thread per core each)."""
    if fed.run.threads is not None:
        return fed
    return dataclasses.replace(fed, train_overrides={**fed.train_overrides, "threads": threads})


def run_federated(fed: FederatedConfig, parallel: int | None = None, log: Callable[[str], None] = print,
                  progress: bool = True, corrupt=None, verbose: bool = False) -> dict[str, Any]:
    """Run `fed` in simulation and return its summary (history of every round; output_dir/history.json)."""
    from flwr.simulation import run_simulation

    cpus = max(1, os.cpu_count() or 1)
    parallel = max(1, min(parallel or cpus, fed.clients))
    fed = pinned(fed, 1)
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": parallel, "include_dashboard": False, "logging_level": logging.ERROR,
                             "log_to_driver": verbose}}
    env = {"RAY_DEDUP_LOGS": "0", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if not verbose:
        flwr_logger.setLevel(logging.ERROR)
    try:
        run_simulation(server_app=make_server_app(fed, log, progress), client_app=make_client_app(fed, corrupt),
                       num_supernodes=fed.clients, backend_config=backend, verbose_logging=verbose)
    finally:
        flwr_logger.setLevel(level)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    path = Path(fed.output_dir) / "history.json"
    if not path.is_file():
        raise RuntimeError(f"the federated run ended without writing {path} (see the log above)")
    return json.loads(path.read_text())
