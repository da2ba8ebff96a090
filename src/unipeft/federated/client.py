"""The Flower ClientApp: each SuperNode trains the run's adapter on its part of the training split.

A train message carries the global adapter (safetensors bytes, payload.py) or, for FedKSeed, the global seed
coefficients, and a config (round, lr scale). The reply carries only the tensors local training changed
(FedKSeed: the K per-seed scalars) and the node's example count. The node's part is
`node_config["partition-id"]` of `num-partitions` (set by the simulation, or by
`flower-supernode --node-config "partition-id=0 num-partitions=8"`).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..core.errors import ConfigError
from ..data.batching import epoch_batches
from ..train.zo import direction_seed
from . import compression
from .config import FederatedConfig
from .fedkseed import fingerprint
from .node import Node, node_for
from .payload import changed, pack, unpack


def partition_of(context, fed: FederatedConfig) -> int:
    """This node's part, checked against the federation's client count."""
    cfg = context.node_config
    if "partition-id" not in cfg:
        raise ConfigError("node_config: partition-id is missing (start the SuperNode with "
                          "--node-config \"partition-id=K num-partitions=N\")")
    pid, parts = int(cfg["partition-id"]), int(cfg.get("num-partitions", fed.clients))
    if parts != fed.clients or not 0 <= pid < parts:
        raise ConfigError(f"node_config: partition-id {pid} of num-partitions {parts} does not fit clients "
                          f"{fed.clients}")
    return pid


def loop_position(per_epoch: int, steps_before: int) -> dict[str, int]:
    """Where the client's pass over its data stands after `steps_before` steps of `per_epoch` batches each (a
    pure function of the round, so a restarted server or a re-scheduled client continues the same pass)."""
    return {"epoch": steps_before // per_epoch, "batch_in_epoch": steps_before % per_epoch}


def local_round(fed: FederatedConfig, node: Node, pid: int, content) -> tuple[object, dict]:
    """Train partition `pid` for one round from the message's global state; (ArrayRecord reply, metrics)."""
    config = content["config"]
    rnd, lr_scale = int(config["server-round"]), float(config["lr-scale"])
    p = fed.partition
    indices = node.client_parts(fed.clients, p.kind, p.alpha, p.seed)[pid]
    data = node.client_set(("client", fed.clients, p.kind, p.alpha, p.seed, pid), indices)
    run = node.run
    if run.batch_size > len(data):  # a tiny non-IID part: one batch of everything it has
        node.run = dataclasses.replace(run, batch_size=len(data))
    try:
        group = node.run.data.group_by_length
        per_epoch = len(epoch_batches(data.lengths, node.run.batch_size, node.run.seed, 0, group))
        steps = fed.local_steps if fed.local_epochs is None else max(1, round(fed.local_epochs * per_epoch))
        loop = loop_position(per_epoch, (rnd - 1) * steps)
        seed = direction_seed(run.seed, rnd, 2, pid)
        if fed.strategy.name == "fedkseed":
            if str(config.get("theta0", "")) != fingerprint(node.initial):
                raise ConfigError("fedkseed: this node's initial adapter differs from the server's (theta_0); "
                                  "every node must build the run with the same seed and model")
            kseed = kseed_options(fed)
            node.replay(torch.from_numpy(content["arrays"]["coefficients"].numpy().astype(np.float64)), kseed)
            result = node.train_local(data, steps, lr_scale, loop, seed, kseed)
            from flwr.app import Array, ArrayRecord
            reply = ArrayRecord({"coefficients": Array(result.coefficients.to(torch.float32).numpy())})
        else:
            start = unpack(content["arrays"])
            node.load(start)
            result = node.train_local(data, steps, lr_scale, loop, seed)
            update = changed(result.state, start)
            density = fed.strategy.compeft_density
            reply = pack(update if density is None else compression.encode(update, start, density))
    finally:
        node.run = run
    return reply, {"num-examples": result.examples, "train-loss": result.loss, "partition-id": pid, "round": rnd}


def kseed_options(fed: FederatedConfig) -> dict:
    """FedKSeed's shared settings (every node derives the same seed pool from the run's seed)."""
    return {"seeds": fed.strategy.seeds, "eps": fed.strategy.eps, "run_seed": fed.run.seed}


def make_client_app(fed: FederatedConfig | None = None, corrupt=None):
    """A ClientApp for `fed` (None: read the config path from the run config, as the deployment app does).
    `corrupt(pid, reply_record, metrics)` may rewrite a reply (tests of the server's checks use it)."""
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg, context):
        cfg = fed if fed is not None else config_from_context(context)
        node = node_for(cfg.run)
        pid = partition_of(context, cfg)
        reply, metrics = local_round(cfg, node, pid, msg.content)
        if corrupt is not None:
            reply, metrics = corrupt(pid, reply, metrics)
        return Message(RecordDict({"arrays": reply, "metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


def config_from_context(context) -> FederatedConfig:
    """The FederatedConfig a deployment run names in its run config (`config = "path/to/federated.yaml"`)."""
    from .config import load_federated_config
    from pathlib import Path
    path = str(context.run_config.get("config") or "")
    if not path:
        raise ConfigError("run_config: config (the path of the federated YAML) is missing")
    if not Path(path).is_absolute():  # each SuperLink/SuperNode resolves it on its own machine, in its own cwd
        raise ConfigError(f"run_config: config must be an absolute path present on every node, got {path!r}")
    overrides = str(context.run_config.get("overrides", "")).split()
    threads = context.node_config.get("threads")  # e.g. --node-config "... threads=1" for nodes sharing a machine
    if threads is not None:
        overrides += ["--train.threads", str(int(threads))]
    return load_federated_config(path, overrides)
