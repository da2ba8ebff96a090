"""Train the ComplEx-N3 link predictor (1-vs-all cross-entropy, reciprocal relations) and rank test triples."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..core.errors import ConfigError
from .complex import LinkPredictor
from .datasets import KGDataset


@dataclass
class LinkConfig:
    """Hyper-parameters of link-predictor training (defaults suit UMLS/Kinships/Nations on CPU)."""

    rank: int = 200
    epochs: int = 60
    batch_size: int = 256
    lr: float = 0.1
    reg: float = 5e-3  # N3 weight
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("rank", "epochs", "batch_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"LinkConfig.{key}: expected a positive integer, got {getattr(self, key)!r}")
        if self.lr <= 0 or self.reg < 0:
            raise ConfigError(f"LinkConfig: expected lr > 0 and reg >= 0, got lr={self.lr}, reg={self.reg}")


def with_reciprocals(triples: torch.Tensor, n_relations: int) -> torch.Tensor:
    """(h, r, t) rows plus (t, r + R, h) rows."""
    h, r, t = triples.unbind(1)
    return torch.cat([triples, torch.stack([t, r + n_relations, h], 1)], 0)


def train_link_predictor(data: KGDataset, cfg: LinkConfig | None = None, log=None) -> LinkPredictor:
    """Train ComplEx-N3 on data's train split with Adagrad and 1-vs-all cross-entropy; seeded."""
    cfg = cfg or LinkConfig()
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = LinkPredictor(data.n_entities, 2 * data.n_relations, cfg.rank)
    examples = with_reciprocals(data.triples["train"], data.n_relations)
    opt = torch.optim.Adagrad(model.parameters(), lr=cfg.lr)
    model.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(examples.shape[0], generator=gen)
        total = 0.0
        for start in range(0, examples.shape[0], cfg.batch_size):
            batch = examples[order[start:start + cfg.batch_size]]
            scores, n3 = model.scorer.forward_with_factors(batch[:, :2], batch[:, 2])
            loss = F.cross_entropy(scores, batch[:, 2]) + cfg.reg * n3 / batch.shape[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * batch.shape[0]
        if log is not None and (epoch + 1) % max(1, cfg.epochs // 5) == 0:
            log(f"link epoch {epoch + 1}/{cfg.epochs}: loss {total / examples.shape[0]:.4f}")
    model.eval()
    return model


def ranking_metrics(ranks: torch.Tensor) -> dict[str, float]:
    """MRR and Hits@1/3/10 of 1-based (possibly fractional) ranks."""
    ranks = ranks.double()
    return {"mrr": (1.0 / ranks).mean().item(),
            **{f"hits@{k}": (ranks <= k).double().mean().item() for k in (1, 3, 10)}}


def filtered_ranks(scores: torch.Tensor, targets: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Rank of each target among entities that are not other known answers; ties count half."""
    target_score = scores.gather(1, targets[:, None])
    others = known.clone()
    others[torch.arange(len(targets)), targets] = False
    better = ((scores > target_score) & ~others).sum(1)
    ties = ((scores == target_score) & ~others).sum(1) - 1  # minus the target itself
    return 1.0 + better.double() + ties.double() / 2


@torch.no_grad()
def evaluate_link_predictor(model: torch.nn.Module, data: KGDataset, split: str = "test",
                            batch_size: int = 512) -> dict[str, float]:
    """Filtered MRR/Hits@k on `split`, tails and heads (via reciprocals), filtering all known triples."""
    if split not in data.triples:
        raise ConfigError(f"evaluate_link_predictor: unknown split {split!r}; available: {sorted(data.triples)}")
    adj = data.graph(*data.triples)
    queries = with_reciprocals(data.triples[split], data.n_relations)
    ranks = []
    for start in range(0, queries.shape[0], batch_size):
        q = queries[start:start + batch_size]
        scores = model(q[:, :2])
        ranks.append(filtered_ranks(scores, q[:, 2], adj[q[:, 1], q[:, 0]]))
    out = ranking_metrics(torch.cat(ranks))
    out["n_queries"] = int(queries.shape[0])
    return out


def save_link_predictor(model: LinkPredictor, directory: str | Path, meta: dict | None = None) -> None:
    """Write predictor.safetensors and predictor.json (hyper-parameters, optional metadata)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "predictor.safetensors"))
    (directory / "predictor.json").write_text(json.dumps({**model.hparams(), "meta": meta or {}}, indent=2) + "\n")


def load_link_predictor(directory: str | Path) -> LinkPredictor:
    """Read a predictor written by `save_link_predictor`."""
    directory = Path(directory)
    cfg_path = directory / "predictor.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no predictor.json in {directory} (write one with save_link_predictor)")
    try:
        hp = json.loads(cfg_path.read_text())
        model = LinkPredictor(int(hp["n_entities"]), int(hp["n_relations"]), int(hp["rank"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{cfg_path}: expected JSON with n_entities, n_relations and rank ({exc!r})") from None
    weights = directory / "predictor.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"no predictor.safetensors in {directory}")
    state = load_file(str(weights))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"{weights} does not fit predictor.json's sizes: {str(exc).splitlines()[0]}") from None
    return model.eval()


def train_and_report(data: KGDataset, cfg: LinkConfig, log=None) -> tuple[LinkPredictor, dict]:
    """Train, then evaluate on valid and test; returns the model and a JSON-ready report."""
    t0 = time.perf_counter()
    model = train_link_predictor(data, cfg, log)
    seconds = time.perf_counter() - t0
    return model, {"config": asdict(cfg), "train_seconds": round(seconds, 2),
                   "valid": evaluate_link_predictor(model, data, "valid"),
                   "test": evaluate_link_predictor(model, data, "test")}
