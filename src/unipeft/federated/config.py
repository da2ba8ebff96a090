"""The config of `unipeft federated CONFIG.yaml`: a training run (as for `unipeft train`) plus its federation.

    train: examples/fortunes_lora.yaml   # a run config file, or the run config itself as a mapping
    clients: 8                           # SuperNodes, one data part each
    rounds: 10
    fraction: 1.0                        # share of clients sampled per round (Flower's fraction_train)
    min_clients: 2                       # Flower's min_train_nodes / min_available_nodes
    local_steps: 3                       # optimizer steps per client per round (batch_size of the run)
    local_epochs: null                   # or: passes over its own part per round (wins over local_steps)
    strategy: {name: fedavg}             # fedavg | fedavg_exact | ffa_lora | lora_fair | fedkseed
    partition: {kind: dirichlet, alpha: 1.0, seed: 0}
    output_dir: runs/federated           # per-round checkpoints (round-0003/adapter) and history.json

The run config's own `output_dir`, `epochs` and `max_steps` are not used: the federation sets the budget.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..train.config import RunConfig, apply_overrides, config_from_dict, parse_overrides
from ..train.schema import from_dict, parse_yaml, to_dict

STRATEGIES = ("fedavg", "fedavg_exact", "ffa_lora", "lora_fair", "fedkseed")
LORA_ONLY = ("fedavg_exact", "ffa_lora", "lora_fair")


@dataclass
class PartitionConfig:
    """How the training split is dealt to clients."""

    kind: str = "dirichlet"  # iid | dirichlet (over the labels)
    alpha: float = 1.0
    seed: int = 0


@dataclass
class StrategyConfig:
    """The server's aggregation and its options."""

    name: str = "fedavg"
    lora_fair_lambda: float = 1e-2  # ridge of LoRA-FAIR's residual correction of B
    seeds: int = 1024  # FedKSeed: candidate seeds shared by every client
    eps: float = 1e-3  # FedKSeed: perturbation size of the two-point estimate
    compeft_density: float | None = None  # clients send ComPEFT-compressed updates keeping this share of entries


@dataclass
class FederatedConfig:
    """A federated run: every client trains the run's method on its part; the server aggregates."""

    train: Any = "examples/fortunes_lora.yaml"
    clients: int = 8
    rounds: int = 10
    fraction: float = 1.0
    min_clients: int = 2
    local_steps: int = 3
    local_epochs: float | None = None  # passes of each client over its part per round; wins over local_steps
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    max_update_bytes: int | None = None  # reject larger client payloads (None: 4x the global adapter)
    round_timeout: float = 3600.0  # seconds the server waits for a round's replies
    output_dir: str = "runs/federated"
    train_overrides: dict[str, Any] = field(default_factory=dict)  # dotted run-config keys, e.g. optimizer.lr
    base_dir: str = "."  # where a relative `train` path is read from (the config file's folder)

    def __post_init__(self) -> None:
        for key in ("clients", "rounds", "min_clients", "local_steps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key}: expected a positive integer, got {value!r}")
        if self.local_epochs is not None and not self.local_epochs > 0:
            raise ConfigError(f"local_epochs: expected a positive number or null, got {self.local_epochs}")
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"fraction: expected 0 < fraction <= 1, got {self.fraction}")
        if self.min_clients > self.clients:
            raise ConfigError(f"min_clients: {self.min_clients} is more than clients ({self.clients})")
        if self.strategy.name not in STRATEGIES:
            raise ConfigError(f"strategy.name: expected one of {', '.join(STRATEGIES)}, got {self.strategy.name!r}")
        if self.strategy.seeds < 1 or self.strategy.eps <= 0 or self.strategy.lora_fair_lambda < 0:
            raise ConfigError("strategy: seeds must be >= 1, eps > 0 and lora_fair_lambda >= 0")
        density = self.strategy.compeft_density
        if density is not None and (not 0.0 < density <= 1.0 or self.strategy.name == "fedkseed"):
            raise ConfigError(f"strategy.compeft_density: expected 0 < density <= 1 (not with fedkseed, whose update "
                              f"is already K scalars), got {density}")
        if self.max_update_bytes is not None and self.max_update_bytes < 1:
            raise ConfigError(f"max_update_bytes: expected a positive integer or null, got {self.max_update_bytes}")
        if self.round_timeout <= 0:
            raise ConfigError(f"round_timeout: expected a positive number of seconds, got {self.round_timeout}")
        self._run = self._build_run()

    @property
    def schedule_unit(self) -> int:
        """Steps per round on the lr schedule's clock (one per round when clients run whole epochs)."""
        return self.local_steps if self.local_epochs is None else 1

    @property
    def run(self) -> RunConfig:
        """The run config every client (and the server, for evaluation) builds its model from."""
        return self._run

    def _build_run(self) -> RunConfig:
        data = self.train
        where = "train"
        if isinstance(data, str):
            path = Path(data) if Path(data).is_absolute() else Path(self.base_dir) / data
            if not path.is_file():
                raise ConfigError(f"train: run config file {path} does not exist")
            data, where = parse_yaml(path.read_text(encoding="utf-8"), str(path)), str(path)
        if not isinstance(data, dict):
            raise ConfigError(f"train: expected a run config file or mapping, got {type(data).__name__}")
        data = apply_overrides(dict(data), list(self.train_overrides.items()))
        method = data.get("method") or {"name": "lora"}
        method = {"name": method} if isinstance(method, str) else dict(method)
        if self.strategy.name in LORA_ONLY and method.get("name") not in ("lora", "lora_fa"):
            raise ConfigError(f"strategy.name: {self.strategy.name} averages LoRA factors; the run's method is "
                              f"{method.get('name')!r} (use method lora, or strategy fedavg)")
        if self.strategy.name == "ffa_lora":  # A frozen at its seeded init on every client: only B trains
            method = {**method, "name": "lora_fa", "lorafa_projection": False}
        data["method"] = method
        if self.strategy.name == "fedkseed":
            data["optimizer"] = {**(data.get("optimizer") or {}), "name": "mezo"}
        data.update(max_steps=self.local_steps, save_every=None, eval_every=None)
        return config_from_dict(data, where)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict, the run config resolved (written next to the checkpoints)."""
        out = to_dict(self)
        out["train"] = self.run.to_dict()
        return out


def federated_config_from_dict(data: Any, source: str = "config", base_dir: str | Path = ".") -> FederatedConfig:
    """Build and validate a FederatedConfig from a parsed YAML mapping."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping (train, clients, rounds, strategy, partition, ...)")
    data = dict(data)
    if isinstance(data.get("strategy"), str):
        data["strategy"] = {"name": data["strategy"]}
    data.setdefault("base_dir", str(base_dir))
    return from_dict(FederatedConfig, data)


def load_federated_config(path: str | Path, overrides: list[str] | None = None) -> FederatedConfig:
    """Read CONFIG.yaml and apply `--key value` overrides (e.g. --rounds 3 --strategy.name ffa_lora)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = parse_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    if isinstance(data, dict) and isinstance(data.get("strategy"), str):
        data["strategy"] = {"name": data["strategy"]}
    data = _override(data, parse_overrides(overrides or []))
    return federated_config_from_dict(data, str(path), path.parent)


def _override(data: dict[str, Any], pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Overrides: `--train.X v` sets run-config key X (kept in `train_overrides`), others the federation's fields."""
    out = dict(data)
    for key, value in pairs:
        if key.startswith("train."):
            out["train_overrides"] = {**(out.get("train_overrides") or {}), key[len("train."):]: value}
            continue
        head, _, rest = key.partition(".")
        out[head] = {**(out.get(head) or {}), rest: value} if rest else value
    return out
