"""AdaMSS: low-rank updates inside clustered subspaces of a Linear layer's SVD.

At injection the frozen [W | b] (out, in (+1 with a bias)) is decomposed by a seeded randomized SVD of rank
R = min(r, out, in): U (out, R), V (in (+1), R). The rows of U (one per output channel) are clustered into K
subspaces by K-means; subspace i owns the output rows S_i. The frozen projection `adamss_newB` = V^T (R, in (+1))
maps the input into the SVD space; each subspace trains A_i (r_i, R), initialised from an orthonormal basis of
its rows of U, and B_i (|S_i|, r_i), zero at init (the identity):

  out[..., S_i] += B_i A_i newB [x, 1]

r_i = min(|S_i|, subspace_rank) (with use_dynamic_rank: also at most the number of singular values of the
subspace's Gram matrix above svd_threshold * the largest). The update is the dense (out, in (+1)) matrix
scatter_i(B_i A_i newB), so core merges it into the weight and the bias. The clustering is computed exactly as
PEFT computes it (the SVD under `random_seed`, scikit-learn's K-means with PEFT's fixed settings) and, as in
PEFT's file, it is not saved: a folder loads onto the base it was made on; on other base weights the subspace
sizes change and loading is refused by the shape check, naming the module.

use_asa: Adaptive Subspace Allocation, a training callback that keeps an EMA of each subspace's importance
|p * grad| and its uncertainty during [init_warmup, final_warmup], and every mask_interval steps keeps only the
globally top-scoring subspaces trainable, their number falling from all to asa_target_subspaces along
PEFT's schedule. It runs before the optimizer step (PEFT's runs after it), so both freeze the same subspaces at
the same step, but a frozen subspace here skips that step's update.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core import layers
from ..core.config import AdapterConfig
from ..core.delta import Delta
from ..core.errors import ConfigError
from ..core.fields import Rule, fraction, is_int, non_negative_int, positive_int, positive_number, ruled
from ..core.hooks import TrainerCallback
from ..core.registry import Capabilities, register

KMEANS_SEED, KMEANS_ITERS = 123456789, 10  # PEFT's fixed K-means settings


def _number(default: float) -> Any:
    return ruled(default, Rule(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                               and math.isfinite(v), "a finite number"))


@dataclass
class AdamssConfig(AdapterConfig):
    """AdaMSS (PEFT's AdamssConfig): SVD rank r, num_subspaces clusters of output rows, subspace_rank per
    subspace; use_asa prunes subspaces during training (Adaptive Subspace Allocation)."""

    peft_class = "AdamssConfig"
    peft_type = "ADAMSS"
    not_in_peft = ("exclude_modules",)

    r: int = positive_int(100)
    num_subspaces: int = positive_int(5)
    subspace_rank: int = positive_int(1)
    init_weights: str | None = ruled("orthogonal", Rule(lambda v: v == "orthogonal", "'orthogonal' or None",
                                                        optional=True))
    use_asa: bool = False
    asa_target_subspaces: int = ruled(50, Rule(is_int, "an integer"))
    init_warmup: int = non_negative_int(50)
    final_warmup: int = non_negative_int(1000)
    mask_interval: int = ruled(100, Rule(is_int, "an integer"))
    asa_importance_beta: float = fraction(0.85, "0 <= asa_importance_beta < 1")
    asa_uncertainty_beta: float = fraction(0.85, "0 <= asa_uncertainty_beta < 1")
    asa_schedule_exponent: float = _number(3.0)
    use_dynamic_rank: bool = False
    svd_threshold: float = positive_number(0.1)
    random_seed: int = ruled(0, Rule(is_int, "an integer"))

    def __post_init__(self) -> None:
        if self.init_weights is False:  # PEFT's older spelling of None
            self.init_weights = None
        super().__post_init__()

    def validate(self) -> None:
        """The field rules, and PEFT's checks of the ASA schedule when use_asa is on."""
        super().validate()
        if not self.use_asa:
            return
        name = type(self).__name__
        if self.mask_interval <= 0:
            raise ConfigError(f"{name}.mask_interval: expected a positive integer with use_asa=True, "
                              f"got {self.mask_interval!r}")
        if self.init_warmup >= self.final_warmup:
            raise ConfigError(f"{name}.init_warmup: expected less than final_warmup={self.final_warmup} with "
                              f"use_asa=True (a non-empty pruning ramp), got {self.init_warmup!r}")
        if self.asa_target_subspaces <= 0:
            raise ConfigError(f"{name}.asa_target_subspaces: expected a positive integer with use_asa=True, "
                              f"got {self.asa_target_subspaces!r}")
        if self.asa_schedule_exponent <= 0:
            raise ConfigError(f"{name}.asa_schedule_exponent: expected a positive number with use_asa=True, "
                              f"got {self.asa_schedule_exponent!r}")

    def training_callbacks(self, model, adapter_name: str) -> list[TrainerCallback]:
        """ASA's subspace pruning, when use_asa is on."""
        return [AsaCallback(adapter_name, self)] if self.use_asa else []

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        """Rank 4 in one subspace: the toy example does not depend on the base weights' clustering, so it
        also loads onto other base weights (the clustered form is covered by the PEFT parity tests)."""
        return {"r": 4, "num_subspaces": 1, "subspace_rank": 2}


def seeded_svd(matrix: torch.Tensor, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U (m, rank), V^T (rank, n)) of float32 `matrix` by torch.svd_lowrank (2 power iterations), its random
    projection drawn under `seed` in a forked RNG (the global stream is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        u, _, v = torch.svd_lowrank(matrix, q=rank, niter=2, M=None)
    return u[:, :rank].contiguous(), v[:, :rank].T.contiguous()


def cluster_rows(u: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Row indices of each K-means cluster of the rows of `u` (scikit-learn, PEFT's settings), by label."""
    from sklearn.cluster import KMeans  # a core dependency; imported here since it is slow to import

    k = min(k, u.shape[0])
    km = KMeans(n_clusters=k, init="random", n_init=1, max_iter=KMEANS_ITERS, random_state=KMEANS_SEED)
    labels = torch.from_numpy(km.fit_predict(u.detach().cpu().numpy().astype("float32"))).long()
    return [torch.where(labels == i)[0] for i in range(k)]


def _subspace_rank(rows: torch.Tensor, config: AdamssConfig) -> int:
    """r_i: min(|S_i|, subspace_rank), or with use_dynamic_rank the significant singular values of the Gram."""
    if not config.use_dynamic_rank:
        return max(1, min(rows.shape[0], config.subspace_rank))
    gram = rows @ rows.T
    s = torch.svd_lowrank(gram, q=min(gram.shape), niter=2)[1]
    return max(1, min(int((s > config.svd_threshold * s[0]).sum()), config.subspace_rank, len(s)))


class AdamssDelta(Delta):
    """Per subspace i: `adamss_A.i` (r_i, R) and `adamss_B.i` (|S_i|, r_i); the frozen `adamss_newB` (R, in(+1))."""

    commutes = True  # additive, and computed at injection only

    def __init__(self, base: nn.Module, config: AdamssConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        weight = base.weight
        dtype = weight.dtype
        self.has_bias = base.bias is not None
        full = torch.cat((weight, base.bias[:, None]), 1) if self.has_bias else weight
        full = full.detach().to(torch.float32)
        rank = min(config.r, *full.shape)
        u, vt = seeded_svd(full, rank, config.random_seed)
        segments = cluster_rows(u, config.num_subspaces)
        a_params, b_params = [], []
        for seg in segments:
            rows = u[seg, :]
            r_i = _subspace_rank(rows, config)
            if r_i > rank:
                raise ConfigError(f"AdamssConfig.subspace_rank: expected at most the SVD rank {rank} of module "
                                  f"'{path}' (min(r, out, in)), got {config.subspace_rank}")
            basis = torch.svd_lowrank(rows @ rows.T, q=min(rows.shape[0], r_i), niter=2)[0][:, :r_i]
            q, _ = torch.linalg.qr(rows.T @ basis, mode="reduced")
            a_params.append(nn.Parameter(q.T.contiguous().to(dtype)))
            b = (torch.zeros(seg.shape[0], r_i) if config.init_weights == "orthogonal"
                 else torch.randn(seg.shape[0], r_i) * 0.01)
            b_params.append(nn.Parameter(b.to(dtype)))
        self.adamss_A = nn.ParameterList(a_params)
        self.adamss_B = nn.ParameterList(b_params)
        self.register_buffer("adamss_newB", vt.to(dtype))
        self.register_buffer("scatter_index", torch.cat(segments), persistent=False)
        self.out_features, self.in_features = weight.shape
        self.identity_at_init = config.init_weights == "orthogonal"

    @property
    def num_subspaces(self) -> int:
        """K, the number of subspaces."""
        return len(self.adamss_A)

    def _scatter(self, chunks: torch.Tensor, dim: int) -> torch.Tensor:
        """Place the subspaces' concatenated rows (along `dim`) at their output positions."""
        shape = list(chunks.shape)
        shape[dim] = self.out_features
        index = self.scatter_index.to(chunks.device)
        return chunks.new_zeros(shape).index_copy(dim % chunks.dim(), index, chunks)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        newb = self.adamss_newB
        h = x.to(newb.dtype)
        proj = F.linear(h, newb[:, :self.in_features], newb[:, self.in_features] if self.has_bias else None)
        chunks = torch.cat([F.linear(F.linear(proj, a), b) for a, b in zip(self.adamss_A, self.adamss_B)], -1)
        return base_out + self._scatter(chunks, -1).to(base_out.dtype)

    def delta_weight(self) -> dict[str, torch.Tensor]:
        newb = self.adamss_newB
        rows = torch.cat([b @ a @ newb for a, b in zip(self.adamss_A, self.adamss_B)], 0)
        dense = self._scatter(rows, 0)
        out = {"weight": dense[:, :self.in_features]}
        if self.has_bias:
            out["bias"] = dense[:, self.in_features]
        return out


class AsaCallback(TrainerCallback):
    """Adaptive Subspace Allocation for one adapter: importance EMAs, then global top-k subspace masking."""

    def __init__(self, adapter_name: str, config: AdamssConfig) -> None:
        self.adapter_name, self.config = adapter_name, config
        self.ipt: dict[str, torch.Tensor] = {}  # "path.A.i" / "path.B.i" -> EMA of |p * grad|
        self.unc: dict[str, torch.Tensor] = {}  # the same keys -> EMA of the importance's change
        self._frozen: set[str] = set()  # subspaces a restored state had frozen
        self._model_deltas: list[AdamssDelta] = []

    def _deltas(self, model) -> list[AdamssDelta]:
        self._model_deltas = [d for d in model.deltas(self.adapter_name) if isinstance(d, AdamssDelta)]
        return self._model_deltas

    def target(self, step: int, total: int) -> int | None:
        """Subspaces to keep at `step`: PEFT's polynomial ramp from `total` down to asa_target_subspaces."""
        c = self.config
        if step < c.init_warmup:
            return None
        if step > c.final_warmup:
            return c.asa_target_subspaces
        coeff = min(1.0, max(0.0, 1.0 - (step - c.init_warmup) / (c.final_warmup - c.init_warmup)))
        return int(c.asa_target_subspaces + (total - c.asa_target_subspaces) * coeff ** c.asa_schedule_exponent)

    def _update(self, deltas: list[AdamssDelta]) -> None:
        c = self.config
        for d in deltas:
            for side, plist in (("A", d.adamss_A), ("B", d.adamss_B)):
                for i, p in enumerate(plist):
                    if p.grad is None:
                        continue
                    key = f"{d.path}.{side}.{i}"
                    ipt = (p * p.grad).abs().detach()
                    old = self.ipt.get(key, torch.zeros_like(ipt))
                    unc = self.unc.get(key, torch.zeros_like(ipt))
                    self.unc[key] = unc * c.asa_uncertainty_beta + (ipt - old).abs() * (1 - c.asa_uncertainty_beta)
                    self.ipt[key] = old * c.asa_importance_beta + ipt * (1 - c.asa_importance_beta)

    def _mask(self, deltas: list[AdamssDelta], keep: int) -> None:
        scored = []
        for d in deltas:
            for i in range(d.num_subspaces):
                ka, kb = f"{d.path}.A.{i}", f"{d.path}.B.{i}"
                if ka in self.ipt and kb in self.ipt:
                    score = (self.ipt[ka] * self.unc[ka]).mean() + (self.ipt[kb] * self.unc[kb]).mean()
                    scored.append((d, i, score))
        if not scored:
            return
        scores = torch.stack([s for _, _, s in scored])
        threshold = float("-inf") if keep >= len(scored) else -torch.kthvalue(-scores, keep)[0].item()
        for d, i, score in scored:
            active = float(score) > threshold
            for p in (d.adamss_A[i], d.adamss_B[i]):
                p.requires_grad_(active)
                if not active:
                    p.grad = None

    def on_before_optimizer_step(self, ctx) -> None:
        """Gradients are complete: update the EMAs in the warm-up window, and mask at its intervals."""
        c, step = self.config, ctx.step
        if self.adapter_name not in ctx.model.active_adapters or not c.init_warmup <= step <= c.final_warmup:
            return
        deltas = self._deltas(ctx.model)
        self._update(deltas)
        if step % c.mask_interval == 0:
            keep = self.target(step, sum(d.num_subspaces for d in deltas))
            if keep is not None:
                self._mask(deltas, keep)
            self.ipt, self.unc = {}, {}

    def on_train_begin(self, ctx) -> None:
        """On a resume, freeze again the subspaces the saved state had frozen."""
        for d in self._deltas(ctx.model):
            for i in range(d.num_subspaces):
                if f"{d.path}.{i}" in self._frozen:
                    d.adamss_A[i].requires_grad_(False)
                    d.adamss_B[i].requires_grad_(False)

    def state_dict(self) -> dict[str, Any]:
        """The EMAs and the frozen subspaces ("path.i"), read from the parameters' requires_grad."""
        frozen = [f"{d.path}.{i}" for d in self._model_deltas for i in range(d.num_subspaces)
                  if not d.adamss_A[i].requires_grad]
        return {"ipt": dict(self.ipt), "unc": dict(self.unc), "frozen": frozen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict() returned (the masks are applied at on_train_begin)."""
        self.ipt, self.unc = dict(state.get("ipt", {})), dict(state.get("unc", {}))
        self._frozen = set(state.get("frozen", []))


register("adamss", AdamssConfig, AdamssDelta,
         Capabilities(mergeable=True, mixed_batch=True, layer_types=(nn.Linear,), peft_compatible=True))
