"""The Flower ServerApp: sample clients, send the global adapter, check and aggregate the replies.

Sampling, message construction and reply bookkeeping are Flower's (`flwr.serverapp.strategy.FedAvg`,
with `fraction_train`, `min_train_nodes`, `min_available_nodes`); `AdapterStrategy` replaces the
aggregation: every reply passes `payload.check_update` (decodes, known keys, right shapes, finite, not
oversized) or is rejected with a logged reason, and the accepted ones are combined by the configured rule
(aggregate.py, fedkseed.py). A client that fails or does not answer within `round_timeout` is left out of
that round. After each round the server evaluates the global adapter on the validation and test splits
and checkpoints it (checkpoint.py); a restarted server resumes after the newest checkpoint.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from flwr.serverapp.strategy import FedAvg

from ..train.optim import lr_factor, warmup_steps
from . import compression
from .aggregate import fedavg, fedavg_exact, lora_fair, naive_gap
from .checkpoint import latest_round, save_round
from .client import kseed_options
from .config import FederatedConfig
from .fedkseed import fingerprint
from .node import Node, node_for
from .payload import check_update, full_state, pack, payload_bytes

PAYLOAD_SLACK = 4  # default cap of a client's reply: this many times the global payload


@dataclass
class RoundOutcome:
    """What one round's aggregation did."""

    accepted: list[int] = field(default_factory=list)  # partition ids
    rejected: list[dict[str, Any]] = field(default_factory=list)  # {node, partition, reason}
    failures: int = 0
    up_bytes: list[int] = field(default_factory=list)
    train_loss: float | None = None
    info: dict[str, float] = field(default_factory=dict)


class AdapterStrategy(FedAvg):
    """Flower's FedAvg sampling with unipeft's checked adapter aggregation (`aggregate` replaces averaging)."""

    def __init__(self, fed: FederatedConfig, node: Node, log: Callable[[str], None]) -> None:
        super().__init__(fraction_train=fed.fraction, fraction_evaluate=0.0, min_train_nodes=fed.min_clients,
                         min_available_nodes=fed.min_clients)
        self.fed, self.node, self.log = fed, node, log
        node.load(node.initial)  # a node this process used before (an earlier run) starts again from theta_0
        self.global_state = node.state()
        self.coefficients = torch.zeros(fed.strategy.seeds, dtype=torch.float64)

    # ---- what goes down ------------------------------------------------------------------------------------
    def downlink(self):
        """The global state as sent: the adapter's safetensors bytes, or FedKSeed's K coefficients."""
        from flwr.app import Array, ArrayRecord
        if self.fed.strategy.name == "fedkseed":
            return ArrayRecord({"coefficients": Array(self.coefficients.numpy().copy())})
        return pack(self.global_state)

    def cap(self, down) -> int:
        if self.fed.max_update_bytes is not None:
            return self.fed.max_update_bytes
        if self.fed.strategy.name == "fedkseed":
            return PAYLOAD_SLACK * self.fed.strategy.seeds * 8
        return PAYLOAD_SLACK * payload_bytes(down)

    # ---- what comes up -------------------------------------------------------------------------------------
    def _check(self, msg, cap: int) -> tuple[int, float, Any, int] | str:
        """(partition, weight, update, bytes) of an acceptable reply, else the reason to reject it."""
        content = msg.content
        if "metrics" not in content or "arrays" not in content:
            return f"reply lacks 'arrays'/'metrics' records (has {sorted(content.keys())})"
        metrics = content["metrics"]
        try:
            weight, pid = float(metrics["num-examples"]), int(metrics["partition-id"])
        except (KeyError, TypeError, ValueError):
            return "metrics lack num-examples / partition-id"
        if not weight > 0 or not np.isfinite(weight):
            return f"num-examples must be a positive number, got {weight}"
        record = content["arrays"]
        if self.fed.strategy.name == "fedkseed":
            try:
                c = record["coefficients"].numpy()
            except (KeyError, TypeError, ValueError) as err:
                return f"malformed payload: {err}"
            if c.nbytes > cap:
                return f"oversized update: {c.nbytes} bytes > limit {cap}"
            if c.shape != (self.fed.strategy.seeds,):
                return f"wrong shape for coefficients: {c.shape}, expected ({self.fed.strategy.seeds},)"
            if not np.isfinite(c).all():
                return "non-finite values in coefficients"
            return pid, weight, torch.from_numpy(c.astype(np.float64)), int(c.nbytes)
        decode = compression.decode if self.fed.strategy.compeft_density is not None else None
        tensors, reason = check_update(record, self.global_state, cap, decode)
        if reason is not None:
            return reason
        return pid, weight, full_state(tensors, self.global_state), payload_bytes(record)

    def aggregate(self, rnd: int, replies, cap: int) -> RoundOutcome:
        """Check every reply and fold the accepted ones into the global state."""
        valid, errors = self._check_and_log_replies(replies, is_train=True, validate=False)
        out = RoundOutcome(failures=len(errors))
        got: list[tuple[int, float, Any, float]] = []
        for msg in valid:
            checked = self._check(msg, cap)
            if isinstance(checked, str):
                pid = msg.content["metrics"].get("partition-id") if "metrics" in msg.content else None
                out.rejected.append({"node": int(msg.metadata.src_node_id), "partition": pid, "reason": checked})
                self.log(f"round {rnd}: rejected the update of node {msg.metadata.src_node_id}: {checked}")
                continue
            pid, weight, update, size = checked
            loss = float(msg.content["metrics"].get("train-loss", float("nan")))
            got.append((pid, weight, update, loss))
            out.up_bytes.append(size)
        if not got:
            return out
        got.sort(key=lambda g: g[0])  # a fixed order: the same sums whatever order the replies came in
        out.accepted = [g[0] for g in got]
        weights = [g[1] for g in got]
        out.train_loss = float(np.average([g[3] for g in got], weights=weights))
        updates = [g[2] for g in got]
        name = self.fed.strategy.name
        if name == "fedkseed":
            w = np.asarray(weights) / sum(weights)
            self.coefficients = self.coefficients + sum(float(wi) * u for wi, u in zip(w, updates))
            self.node.replay(self.coefficients, kseed_options(self.fed))
            self.global_state = self.node.state()
            out.info["seeds_used"] = int(torch.count_nonzero(self.coefficients))
            return out
        if name == "fedavg_exact":
            merged, out.info = fedavg_exact(updates, weights)
        elif name == "lora_fair":
            merged, out.info = lora_fair(updates, weights, self.fed.strategy.lora_fair_lambda)
        else:  # fedavg, and ffa_lora (A frozen and identical: averaging B is exact)
            merged = fedavg(updates, weights)
        out.info["product_gap"] = naive_gap(updates, weights, merged)
        self.node.load(merged)
        self.global_state = self.node.state()
        return out


def run_server(grid, fed: FederatedConfig, log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """The whole federated run on `grid` (Flower's); returns the summary also written to output_dir."""
    from flwr.app import ConfigRecord
    from tqdm.auto import tqdm

    node = node_for(fed.run)
    strategy = AdapterStrategy(fed, node, log)
    history: list[dict[str, Any]] = []
    start_round = 1
    resumed = latest_round(fed.output_dir)
    if resumed is not None:
        rnd, tensors, state = resumed
        history = state["history"][: rnd + 1]
        if fed.strategy.name == "fedkseed":
            strategy.coefficients = torch.tensor(state["coefficients"], dtype=torch.float64)
            node.replay(strategy.coefficients, kseed_options(fed))
        else:
            node.load(tensors)
        strategy.global_state = node.state()
        start_round = rnd + 1
        log(f"resuming after round {rnd} from {fed.output_dir}")
    else:
        history.append({"round": 0, **_evaluate(node)})
    total = fed.rounds * fed.schedule_unit
    warm = warmup_steps(fed.run.schedule, total)
    theta0 = fingerprint(node.initial)
    bar = tqdm(total=fed.rounds, initial=start_round - 1, desc="rounds", disable=not progress)
    for rnd in range(start_round, fed.rounds + 1):
        t0 = time.perf_counter()
        down = strategy.downlink()
        config = ConfigRecord({"lr-scale": lr_factor(fed.run.schedule.name, (rnd - 1) * fed.schedule_unit, warm,
                                                     total), "theta0": theta0})
        messages = strategy.configure_train(rnd, down, config, grid)
        replies = grid.send_and_receive(messages, timeout=fed.round_timeout)
        outcome = strategy.aggregate(rnd, replies, strategy.cap(down))
        row = {"round": rnd, **_evaluate(node), "sampled": len(list(messages)), "accepted": outcome.accepted,
               "rejected": outcome.rejected, "failures": outcome.failures,
               "up_bytes": float(np.mean(outcome.up_bytes)) if outcome.up_bytes else 0.0,
               "down_bytes": int(_record_bytes(down)), "train_loss": outcome.train_loss,
               "seconds": round(time.perf_counter() - t0, 3), **outcome.info}
        history.append(row)
        state = {"history": history}
        if fed.strategy.name == "fedkseed":
            state["coefficients"] = strategy.coefficients.tolist()
        save_round(fed.output_dir, rnd, node.model, state)
        bar.update(1)
        bar.set_postfix(valid=f"{headline(row):.3f}", accepted=len(outcome.accepted))
    bar.close()
    summary = {"config": fed.to_dict(), "history": history, "final": history[-1]}
    from pathlib import Path
    out = Path(fed.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "history.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def headline(row: dict) -> float:
    """The round's validation score: accuracy (classification) or token accuracy (causal LM)."""
    return float(row.get("valid_accuracy", row.get("valid_token_accuracy", float("nan"))))


def _record_bytes(record) -> int:
    return sum(int(a.numpy().nbytes) for a in record.values())


def _evaluate(node: Node) -> dict[str, float]:
    """valid_/test_ metrics of the node's current adapter (accuracy, loss; token accuracy for causal LM)."""
    out: dict[str, float] = {}
    for split in ("valid", "test"):
        for key, value in node.evaluate(split).items():
            if key != "examples":
                out[f"{split}_{key}"] = float(value)
    return out


def make_server_app(fed: FederatedConfig | None = None, log: Callable[[str], None] = print, progress: bool = True):
    """A ServerApp running `fed` (None: the config path comes from the run config, as in deployment)."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        from .client import config_from_context
        cfg = fed if fed is not None else config_from_context(context)
        run_server(grid, cfg, log, progress)

    return app
