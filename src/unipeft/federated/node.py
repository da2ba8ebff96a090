"""One federation member's model: the run's base model with its adapter, the data parts, local training.

Server and clients build the same `Node` from the same run config, so the adapter starts identical on all
of them (theta_0, from the run's seed). A process keeps one Node per run config (`node_for`): a simulation
actor that serves many rounds and partitions loads the model once. (On the deployment engine every message
starts a fresh `flwr-clientapp` process, so there a client builds its Node every round: allow for that in
`round_timeout`.)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.errors import ConfigError
from ..core.hooks import method_param_groups
from ..core.state import adapter_state_dict, load_tensors
from ..train.config import RunConfig
from ..train.evaluate import evaluate
from ..train.optim import build_optimizer, build_scheduler
from ..train.run import make_accelerator
from ..train.setup import build_parts
from ..train.threads import apply_threads
from .fedkseed import KSeedZO, build_kseed, candidate_seeds
from .partition import partition

ADAPTER = "default"
_NODES: dict[str, "Node"] = {}


@dataclass
class LocalResult:
    """What one client's round produced."""

    state: dict[str, torch.Tensor]
    examples: int
    loss: float
    loop: dict[str, int] = field(default_factory=dict)
    coefficients: torch.Tensor | None = None  # FedKSeed: -lr g summed per candidate seed


class Node:
    """The run's adapted model on this process, with its splits and the clients' parts of the training set."""

    def __init__(self, run: RunConfig) -> None:
        apply_threads(run.threads)
        torch.manual_seed(run.seed)  # as train_run: the adapter's init comes from the run's seed
        self.run = run
        self.parts = build_parts(run)
        if not hasattr(self.parts.model, "peft_config"):
            raise ConfigError("method.name: federated training exchanges adapters; 'full' has none")
        self.model = self.parts.model
        self.acc = make_accelerator()
        self.initial = self.state()
        self._encoded: dict[Any, Any] = {}

    def state(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors (PEFT key names, copies)."""
        return {k: v.detach().clone() for k, v in adapter_state_dict(self.model, ADAPTER).items()}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the adapter to `tensors` (validated against the model first; nothing changes on a mismatch)."""
        load_tensors(self.model, ADAPTER, tensors)

    def split(self, name: str):
        if name not in self._encoded:
            self._encoded[name] = self.parts.encode(name)
        return self._encoded[name]

    def client_parts(self, clients: int, kind: str, alpha: float, seed: int) -> list[list[int]]:
        """Indices into the training split of every client's part."""
        labels = getattr(self.parts.splits.train, "labels", None)
        if labels is None:
            if kind != "iid":
                raise ConfigError("partition.kind: dirichlet needs labels (a classification task); use iid")
            labels = [0] * len(self.parts.splits.train)
        return partition(labels, clients, kind, alpha, seed)

    def client_set(self, key: tuple, indices: list[int]):
        if key not in self._encoded:
            full = self.split("train")
            from ..data.encode import EncodedSet
            self._encoded[key] = EncodedSet([full.rows[i] for i in indices], [full.weights[i] for i in indices],
                                            [full.lengths[i] for i in indices])
        return self._encoded[key]

    def evaluate(self, split: str) -> dict[str, float]:
        """Metrics of the current adapter on a split (the server's per-round evaluation)."""
        return evaluate(self.model, self.split(split), self.run.task, self.run.eval_batch_size, self.parts.pad_id,
                        len(self.parts.label_names), self.acc)

    def train_local(self, data, steps: int, lr_scale: float, loop: dict[str, int], seed: int,
                    kseed: dict | None = None) -> LocalResult:
        """`steps` optimizer steps of the run's method on `data` from the current adapter, at lr * lr_scale.

        `loop` (step, epoch, batch_in_epoch) continues the client's pass over its data from its last round;
        `kseed` ({seeds, eps, run_seed}) makes it a FedKSeed client (forward-only steps over the seed pool)."""
        from ..train.trainer import LoopState, Trainer
        run = self.run
        torch.manual_seed(seed)  # dropout masks etc. depend on (round, partition) only: a rerun is identical
        if kseed is not None:
            opt = build_kseed(self.model, run.optimizer.lr * lr_scale, kseed["eps"],
                              candidate_seeds(kseed["seeds"], kseed["run_seed"]), choice_seed=seed)
        else:
            opt = build_optimizer(self.model, run.optimizer, method_param_groups(self.model))
            for group in opt.param_groups:
                group["lr"] *= lr_scale
        sched = build_scheduler(opt, type(run.schedule)(name="constant"), steps)
        trainer = Trainer(self.model, run, data, None, opt, sched, self.acc, self.parts.pad_id,
                          len(self.parts.label_names), None, None, show_progress=False)
        trainer.state = LoopState(step=0, epoch=loop.get("epoch", 0), batch_in_epoch=loop.get("batch_in_epoch", 0))
        trainer.max_steps = steps
        losses: list[float] = []

        # the round's mean training loss, from the windows the trainer logs (no metrics file on a client)
        trainer.log.write = lambda record: losses.append(record["loss"]) if "loss" in record else None
        st = trainer.fit()
        self.model.train(False)
        return LocalResult(self.state(), len(data), sum(losses) / max(1, len(losses)),
                           {"epoch": st.epoch, "batch_in_epoch": st.batch_in_epoch},
                           opt.coefficients.clone() if isinstance(opt, KSeedZO) else None)

    def replay(self, coefficients: torch.Tensor, kseed: dict) -> None:
        """FedKSeed: set the adapter to theta_0 + sum_k c_k z_k."""
        self.load(self.initial)
        opt = build_kseed(self.model, 0.0, kseed["eps"], candidate_seeds(kseed["seeds"], kseed["run_seed"]))
        opt.replay(coefficients)


def node_for(run: RunConfig) -> Node:
    """This process's Node for `run` (built on first use)."""
    key = json.dumps({k: v for k, v in run.to_dict().items() if k != "output_dir"}, sort_keys=True, default=str)
    if key not in _NODES:
        _NODES[key] = Node(run)
    return _NODES[key]
