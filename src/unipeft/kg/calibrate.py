"""Train a CQD^A calibrator: the predictor stays frozen, only the adapter's affine map learns.

The loss is CQD^A's binary cross-entropy on the truth degree the whole query gets through
CQD's t-norm pipeline: -mean log p(answer) - mean log(1 - p(non-answer)), per query, so the
gradient flows from complex queries back through beam search into the calibrator's coefficients.
"""
from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from ..core.errors import ConfigError
from ..core.model import AdaptedModel
from ..core.state import load_tensors
from .cqd import TNORMS, CQDConfig, answer_queries
from .evaluate import evaluate_queries
from .querygen import QuerySet
from .structures import check_structures

# BetaE's training structures; ip, pi, 2u and up are left for testing generalisation.
TRAIN_STRUCTURES: tuple[str, ...] = ("1p", "2p", "3p", "2i", "3i", "2in", "3in", "inp", "pin", "pni")


@dataclass
class CalibrationConfig:
    """Hyper-parameters of calibrator training (defaults suit UMLS on one CPU core)."""

    structures: list[str] = field(default_factory=lambda: list(TRAIN_STRUCTURES))
    fraction: float = 1.0    # share of each structure's training queries used (CQD^A's 1% runs: 0.01)
    steps: int = 300         # optimizer steps, the same budget whatever the fraction
    batch_size: int = 64
    lr: float = 0.003
    tnorm: str = "prod"
    beam: int | None = None  # CQD beam while training; None = every entity
    eval_every: int = 50     # validation (when given) every so many steps; the best state is kept
    seed: int = 0

    def __post_init__(self) -> None:
        self.structures = check_structures(self.structures)
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"CalibrationConfig.fraction: expected a share in (0, 1], got {self.fraction!r}")
        for key in ("steps", "batch_size", "eval_every"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                raise ConfigError(f"CalibrationConfig.{key}: expected a positive integer, got {getattr(self, key)!r}")
        if not self.lr > 0:
            raise ConfigError(f"CalibrationConfig.lr: expected a positive learning rate, got {self.lr!r}")
        if self.tnorm not in TNORMS:
            raise ConfigError(f"CalibrationConfig.tnorm: expected one of {TNORMS}, got {self.tnorm!r}")

    def cqd(self) -> CQDConfig:
        """The CQD settings used both in training and in evaluation of this calibrator."""
        return CQDConfig(tnorm=self.tnorm, beam=self.beam)


def subsample(queries: dict[str, QuerySet], structures: list[str], fraction: float, seed: int) -> dict[str, QuerySet]:
    """A seeded share `fraction` (at least one query) of each listed structure's queries."""
    out = {}
    for s in structures:
        if s not in queries or len(queries[s]) == 0:
            raise ConfigError(f"no training queries of structure {s!r}; generated: "
                              f"{sorted(k for k, v in queries.items() if len(v))}")
        qs = queries[s]
        keep = max(1, math.ceil(fraction * len(qs)))
        g = torch.Generator().manual_seed(seed * 1000003 + sum(map(ord, s)))
        out[s] = qs.subset(torch.randperm(len(qs), generator=g)[:keep].sort().values)
    return out


def query_loss(truth: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """Per-query binary cross-entropy: mean over answers of -log p, plus mean over the rest of -log(1-p)."""
    p = truth.clamp(1e-12, 1 - 1e-12)
    pos, neg = answers.double(), (~answers).double()
    pos_term = -(torch.log(p) * pos).sum(1) / pos.sum(1).clamp_min(1)
    neg_term = -(torch.log1p(-p) * neg).sum(1) / neg.sum(1).clamp_min(1)
    return (pos_term + neg_term).mean()


def _batches(queries: dict[str, QuerySet], batch_size: int, rng: random.Random) -> list[tuple[str, torch.Tensor]]:
    """One shuffled pass: (structure, query indices) batches, structures interleaved."""
    out = []
    for s, qs in queries.items():
        order = list(range(len(qs)))
        rng.shuffle(order)
        out += [(s, torch.tensor(order[i:i + batch_size])) for i in range(0, len(order), batch_size)]
    rng.shuffle(out)
    return out


def adapter_state(model: AdaptedModel, adapter_name: str) -> dict[str, torch.Tensor]:
    """A detached copy of one adapter's parameters (for keeping the best validation state)."""
    return {k: v.detach().clone() for k, v in model.adapter_state_dict(adapter_name).items()}


def parameter_counts(model: AdaptedModel, adapter_name: str = "default") -> tuple[int, int]:
    """(parameters of adapter `adapter_name`, parameters of the frozen predictor)."""
    deltas = model.deltas(adapter_name)
    own = {id(p) for n in model.peft_config for d in model.deltas(n) for p in d.parameters()}
    n_adapter = sum(p.numel() for d in deltas for p in d.parameters())
    return n_adapter, sum(p.numel() for p in model.base_model.parameters() if id(p) not in own)


def train_calibrator(model: AdaptedModel, train: dict[str, QuerySet], n_entities: int,
                     cfg: CalibrationConfig | None = None, adapter_name: str = "default",
                     valid: dict[str, QuerySet] | None = None, progress: bool = True) -> dict:
    """Train adapter `adapter_name` of `model` (a calibrated predictor) in place; returns a report.

    With `valid` queries the adapter is evaluated every `eval_every` steps and the state with the
    best average validation MRR is kept (the identity at step 0 included, so it never gets worse
    on validation than plain CQD).
    """
    cfg = cfg or CalibrationConfig()
    model.set_adapter(adapter_name)
    data = subsample(train, cfg.structures, cfg.fraction, cfg.seed)
    params = [p for d in model.deltas(adapter_name) for p in d.parameters()]
    if not params:
        raise ConfigError(f"adapter '{adapter_name}' has no trainable parameters to calibrate")
    torch.manual_seed(cfg.seed)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    rng = random.Random(cfg.seed)
    cqd = cfg.cqd()
    history: list[dict] = []

    def validate(step: int) -> float:
        res = evaluate_queries(model, valid, n_entities, cqd)
        history.append({"step": step, "valid_avg_mrr": res["avg_mrr"]})
        return res["avg_mrr"]

    best = (validate(0), 0, adapter_state(model, adapter_name)) if valid else None
    t0, step, losses = time.perf_counter(), 0, []
    with tqdm(total=cfg.steps, desc=f"calibrate {adapter_name}", disable=not progress, leave=False) as bar:
        while step < cfg.steps:
            for s, idx in _batches(data, cfg.batch_size, rng):
                qs = data[s]
                truth = answer_queries(model, s, qs.queries[idx], n_entities, cqd)
                loss = query_loss(truth, qs.answers[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
                if valid and (step % cfg.eval_every == 0 or step == cfg.steps):
                    score = validate(step)
                    if score > best[0]:
                        best = (score, step, adapter_state(model, adapter_name))
                if step >= cfg.steps:
                    break
    if best is not None:
        load_tensors(model, adapter_name, best[2])
    n_adapter, n_base = parameter_counts(model, adapter_name)
    return {"config": asdict(cfg), "train_queries": {s: len(q) for s, q in data.items()},
            "train_seconds": round(time.perf_counter() - t0, 2),
            "first_loss": round(sum(losses[:20]) / len(losses[:20]), 4),
            "last_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
            "best_step": best[1] if best else step, "best_valid_avg_mrr": best[0] if best else None,
            "history": history, "adapter_parameters": n_adapter, "predictor_parameters": n_base,
            "parameter_fraction": n_adapter / n_base}


def calibrated_copy(predictor: torch.nn.Module, config=None, adapter_name: str = "default") -> AdaptedModel:
    """Adapt a deep copy of `predictor` with a fresh (identity) calibrator; the original stays untouched."""
    from ..core.model import adapt
    from .calibrator import CQDCalibratorConfig
    return adapt(copy.deepcopy(predictor), config or CQDCalibratorConfig(), adapter_name)
