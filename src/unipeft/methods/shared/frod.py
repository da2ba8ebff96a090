"""FRoD: each weight rewritten in a basis shared by its role across layers, W = U diag(lambda) V^T; training
moves the diagonal and a fixed sparse set of off-diagonal entries.

Targets are grouped by role ("category", from the last parts of their path, e.g. self_query; BERT's
attention output apart from the MLP's output.dense) and by block index. Per category the bank
holds V (in, in), built from the stacked weights of its layers (an SVD when they have fewer rows
than columns; otherwise QR, an averaged ridge-regularised inverse Gram of the per-layer Q slices
with `regularization_alpha`, and its eigenvectors), plus a sparse pattern S of off-diagonal
positions (a `sparse_rate` share of in*in, at least one, drawn by randperm from one CPU generator
at `projection_prng_key`, categories in sorted order). Each site solves W = B V^T and splits B
into unit columns U and their norms lambda_0. The adapted weight is U (S + diag(lambda)) V^T;
lambda (`frod_lambda_l`) starts at lambda_0 and S's values (`frod_lambda_s_values`) at zero, so the
update U (S + diag(lambda - lambda_0)) V^T is exactly zero at init. U and lambda_0 are recomputed
from the base weight (from the file's V when the file stores it). With `save_projection` the bank
is stored as `base_model.frod_V.<category>`, `base_model.frod_s_indices.<category>` and
`base_model.frod_s_size.<category>` (PEFT's layout); a stored pattern must be the one the seed draws.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core import layers
from ...core.bank import Bank
from ...core.config import AdapterConfig
from ...core.delta import Delta
from ...core.fields import Rule, choice, fraction, non_negative, ruled
from ...core.registry import Capabilities, register
from ._common import LAYERS, seeded, transposed

_SEED_FIELD = "FrodConfig.projection_prng_key"


@dataclass
class FrodConfig(AdapterConfig):
    """FRoD (PEFT's FrodConfig): a shared per-role basis; trains a diagonal and a sparse_rate share of S."""

    peft_class = "FrodConfig"
    peft_type = "FROD"
    not_in_peft = ("exclude_modules",)
    # Keeping base weights on the CPU while an accelerator runs the adapter: nothing to do on CPU.
    peft_inert = {"runtime_offload_base_weight": False}

    projection_prng_key: int = 0
    save_projection: bool = True
    frod_dropout: float = fraction(0.0, "0 <= frod_dropout < 1")
    fan_in_fan_out: bool = False
    bias: str = choice("none", ["none"])
    init_weights: bool = True
    sparse_rate: float = ruled(0.01, Rule(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                                          and 0.0 <= v <= 1.0, "a number with 0 <= sparse_rate <= 1"))
    regularization_alpha: float = non_negative(1e-3)
    progressbar: bool = True  # accepted for PEFT's files; building the bases prints nothing here

    def resolved_fields(self, model, targets) -> dict[str, Any]:
        return {"fan_in_fan_out": transposed(targets)}

    def make_bank(self, model, targets) -> "FrodBank":
        return FrodBank(self, targets)

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        return {"sparse_rate": 0.1, "save_projection": False}


def category_of(path: str) -> str:
    """The role a module plays in its block: `layer.0.attention.self.query` -> `self_query`."""
    parts = path.split(".")
    if len(parts) == 1:
        return parts[0]
    if parts[-2].isdigit():
        return parts[-1]
    category = f"{parts[-2]}_{parts[-1]}"
    if category == "output_dense" and len(parts) >= 3 and parts[-3] == "attention":
        return "attention_output"  # BERT's attention output, apart from the MLP's output.dense
    return category


def block_index(path: str, fallback: int) -> int:
    """The block a module belongs to: the number after `layers`, else the first number in the path."""
    parts = path.split(".")
    if "layers" in parts:
        try:
            return int(parts[parts.index("layers") + 1])
        except (ValueError, IndexError):
            pass
    return next((int(p) for p in parts if p.isdigit()), fallback)


def shared_basis(matrices: list[torch.Tensor], ridge: float) -> torch.Tensor:
    """V (in, in) of one category from its layers' (out, in) weights (float32)."""
    stacked = torch.cat(matrices, dim=0)
    if stacked.shape[0] < stacked.shape[1]:
        return torch.linalg.svd(stacked, full_matrices=True)[2].T
    q, r = torch.linalg.qr(stacked)
    dim = r.shape[1]
    eye = ridge * torch.eye(dim, dtype=r.dtype)
    starts = torch.tensor([0] + [m.shape[0] for m in matrices]).cumsum(0).tolist()
    t_pi = torch.zeros((dim, dim), dtype=r.dtype)
    for lo, hi in zip(starts[:-1], starts[1:]):  # the ridge keeps correlated layers' inverses stable
        t_pi += torch.linalg.inv(q[lo:hi].T @ q[lo:hi] + eye)
    return r.T @ torch.linalg.eigh(t_pi / len(matrices))[1]


def sparse_pattern(dim: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """(2, nnz) off-diagonal (row, col) positions of S for a dim x dim basis."""
    rows, cols = torch.meshgrid(torch.arange(dim), torch.arange(dim), indexing="ij")
    pairs = torch.stack([rows.flatten(), cols.flatten()], dim=1)
    off = pairs[pairs[:, 0] != pairs[:, 1]]
    nnz = min(int(dim * dim * rate), off.shape[0])
    if rate > 0 and off.shape[0] > 0:
        nnz = max(1, nnz)
    if not nnz:
        return torch.empty(2, 0, dtype=torch.long)
    return off[torch.randperm(off.shape[0], generator=generator)[:nnz]].t().contiguous()


class FrodBank(Bank):
    """Per category: the shared basis V, S's positions and S's size (saved only with save_projection)."""

    def __init__(self, config: FrodConfig, targets) -> None:
        super().__init__()
        weights: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
        for fallback, (path, module) in enumerate(targets):
            weights[block_index(path, fallback)][category_of(path)] = layers.dense_weight(module)
        self._file_keys: dict[str, str] = {}
        self._deltas: list["FrodDelta"] = []  # refreshed when a file's bases are loaded
        generator = seeded(config.projection_prng_key)
        self.seed_value = config.projection_prng_key
        for category in sorted({c for per_block in weights.values() for c in per_block}):
            mats = [per_block[category].detach().float().cpu() for _, per_block in sorted(weights.items())
                    if category in per_block]
            v = shared_basis(mats, config.regularization_alpha).to(mats[0].dtype)
            dim = v.shape[0]
            for kind, value in (("V", v), ("s_indices", sparse_pattern(dim, config.sparse_rate, generator)),
                                ("s_size", torch.tensor([dim, dim], dtype=torch.long))):
                name = f"{kind}__{category}"
                self.register_buffer(name, value, persistent=config.save_projection)
                self._file_keys[name] = f"base_model.frod_{kind}.{category}"
        self.register_load_state_dict_post_hook(lambda module, keys: module._refresh())

    def tensors(self, category: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(V, S's positions) of `category`."""
        return getattr(self, f"V__{category}"), getattr(self, f"s_indices__{category}")

    def attach(self, delta: "FrodDelta") -> None:
        """Remember a site so a loaded basis reaches its U and lambda_0."""
        self._deltas.append(delta)

    def _refresh(self) -> None:
        for delta in self._deltas:
            delta.decompose()

    def saved_key(self, key: str) -> str:
        return self._file_keys[key]

    def check_state(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        problems = []
        for key, tensor in tensors.items():
            if key.startswith(("s_indices__", "s_size__")) and not torch.equal(tensor.long(), getattr(self, key)):
                problems.append(f"the stored {self._file_keys[key]} differs from the pattern {_SEED_FIELD}="
                                f"{self.seed_value} draws for this model; the file was written with another seed "
                                f"(set {_SEED_FIELD} to the one it was trained with)")
        return problems


class FrodDelta(Delta):
    """Per-site frod_lambda_l (in) and frod_lambda_s_values (nnz); U and lambda_0 are derived buffers."""

    commutes = True  # additive in weight space
    # Alone at its site, trained, and over the very weight it decomposed (no merge or load has written it
    # since: its in-place version counter is unchanged), the output is U (S + diag lambda) V^T x + b: two
    # products, as PEFT computes it, instead of W x + b plus the update (three). Otherwise base + update.
    fuses_base = True

    def __init__(self, base: nn.Module, config: FrodConfig, path: str, bank: FrodBank | None = None) -> None:
        super().__init__(base, config, path, bank)
        self.category = category_of(path)
        self.dropout = nn.Dropout(config.frod_dropout) if config.frod_dropout > 0 else nn.Identity()
        nnz = bank.tensors(self.category)[1].shape[1]
        self.in_features = layers.geometry(base).in_features
        self.register_buffer("U", torch.empty(0), persistent=False)
        self.register_buffer("lambda_0", torch.empty(0), persistent=False)
        self.frod_lambda_l = nn.Parameter(torch.zeros(self.in_features))
        self.frod_lambda_s_values = nn.Parameter(torch.zeros(nnz))
        self.decompose()
        with torch.no_grad():
            self.frod_lambda_l.copy_(self.lambda_0)
            if not config.init_weights:  # PEFT's perturbed start: not the identity
                self.frod_lambda_s_values.normal_(std=0.1)
                self.frod_lambda_l.add_(torch.randn_like(self.frod_lambda_l) * 0.1)
        bank.attach(self)

    def decompose(self) -> None:
        """U (unit columns) and lambda_0 (their norms) with W = U diag(lambda_0) V^T, in float64."""
        w = layers.dense_weight(self.base).detach().to(torch.float64).cpu()
        v = self.bank.tensors(self.category)[0].detach().to(torch.float64).cpu()
        try:
            b = torch.linalg.solve(v, w.T).T
        except RuntimeError:  # a singular basis: least squares instead
            b = w @ torch.linalg.pinv(v, rtol=1e-6).T
        norms = torch.linalg.norm(b, dim=0)
        u = torch.zeros_like(b)
        keep = norms > 1e-12
        u[:, keep] = b[:, keep] / norms[keep]
        dtype, device = self.frod_lambda_l.dtype, self.frod_lambda_l.device
        self.U = u.to(device=device, dtype=dtype)
        self.lambda_0 = norms.to(device=device, dtype=dtype)
        self._weight_version = self.base.weight._version  # W = U diag(lambda_0) V^T holds for this version

    def _mix(self, z: torch.Tensor) -> torch.Tensor:
        """z (S + diag(lambda - lambda_0))^T for rows z in the basis V. S is a sparse (in, in) matrix whose
        entries are the trained values: one sparse-dense product, never a (rows, nnz) gather of z."""
        index = self.bank.tensors(self.category)[1]
        diag = z * (self.frod_lambda_l - self.lambda_0).to(z.dtype)
        if index.shape[1] == 0:
            return diag
        n = z.shape[-1]
        s = torch.sparse_coo_tensor(index.to(z.device, torch.long), self.frod_lambda_s_values.to(z.dtype), (n, n),
                                    check_invariants=False)  # indices drawn here: in range, no duplicates
        flat = z.reshape(-1, n)
        return torch.sparse.mm(s.coalesce(), flat.T).T.reshape(z.shape) + diag

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        v = self.bank.tensors(self.category)[0]
        h = self.dropout(x.to(v.dtype))
        out = self._mix(h @ v) @ self.U.T
        return base_out + out.to(base_out.dtype)

    def fused_call(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.training and isinstance(self.dropout, nn.Dropout):
            return None  # the base reads x, the update dropout(x)
        if self.base.weight._version != self._weight_version:
            return None  # the weight was written since it was decomposed (a merge, a load)
        if torch.equal(self.frod_lambda_l, self.lambda_0) and not bool(self.frod_lambda_s_values.any()):
            return None  # untrained: the base output exactly
        v = self.bank.tensors(self.category)[0]
        z = x.to(v.dtype) @ v
        out = (self._mix(z) + z * self.lambda_0.to(z.dtype)) @ self.U.T
        bias = self.base.bias
        return (out if bias is None else out + bias.to(out.dtype)).to(x.dtype)

    def delta_weight(self) -> dict[str, torch.Tensor]:
        v = self.bank.tensors(self.category)[0]
        m = self._mix(torch.eye(self.in_features, dtype=v.dtype, device=v.device)).T  # S + diag(lambda - lambda_0)
        return {"weight": layers.to_param_layout(self.base, self.U @ m @ v.T)}


register("frod", FrodConfig, FrodDelta, Capabilities(mergeable=True, mixed_batch=True, layer_types=LAYERS,
                                                     peft_compatible=True))
