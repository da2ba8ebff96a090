"""What the shared-basis methods have in common: the widest target geometry, seeded bases, a bank
that checks loaded bases against its seed, and a linear delta computed from per-site factors.

Every method here writes its update of a matrix layer as two factors, A (k, in) and B (out, k)
(scaling included), built from the adapter's shared bank and the site's own small tensors:
out = base(x) + B (A dropout(x)), and delta_weight = B @ A in the layer's storage layout.
"""
from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
from torch import nn

from ...core import layers
from ...core.bank import Bank
from ...core.delta import Delta

LAYERS = layers.MATRIX_LAYERS  # nn.Linear and GPT-2's Conv1D


def widest(targets: list[tuple[str, nn.Module]]) -> tuple[int, int]:
    """(largest out_features, largest in_features) over the targets: the size of a shared basis
    that every site slices from its top-left corner."""
    geos = [layers.geometry(m) for _, m in targets]
    return max(g.out_features for g in geos), max(g.in_features for g in geos)


def transposed(targets: list[tuple[str, nn.Module]]) -> bool:
    """PEFT records GPT-2's transposed Conv1D weights as fan_in_fan_out=True."""
    return any(layers.is_transposed(m) for _, m in targets)


def seeded(seed: int) -> torch.Generator:
    """A CPU generator at `seed` (the same stream on every call)."""
    return torch.Generator(device="cpu").manual_seed(int(seed))


def kaiming_uniform(shape: tuple[int, ...], generator: torch.Generator, a: float = 0.0,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A new tensor drawn by Kaiming-uniform (fan_in) from `generator`."""
    return nn.init.kaiming_uniform_(torch.empty(shape, dtype=dtype), a=a, generator=generator)


def fingerprint(*tensors: torch.Tensor) -> torch.Tensor:
    """CRC-32 of each tensor's float32 bytes, as int64 (a dtype cast of the model leaves it alone): a
    regenerated basis must reproduce it, which catches a changed seed or another random stream."""
    crcs = [zlib.crc32(t.detach().to(torch.float32).contiguous().numpy().tobytes()) for t in tensors]
    return torch.tensor(crcs, dtype=torch.int64)


class SeededBank(Bank):
    """A bank whose frozen bases come from a seed: saved only when `save_bases`, and checked on load.

    `seed_field` names the config field (e.g. "VeraConfig.projection_prng_key") the error message
    points at when a loaded basis (or its stored fingerprint) differs from what the seed regenerates.
    """

    def __init__(self, seed_field: str, seed_value: int, save_bases: bool) -> None:
        super().__init__()
        self.seed_field, self.seed_value = seed_field, seed_value
        self.save_bases = save_bases
        self._basis_names: list[str] = []

    def add_basis(self, name: str, tensor: torch.Tensor) -> None:
        """Register a frozen basis buffer (persistent only when bases are saved)."""
        self.register_buffer(name, tensor, persistent=self.save_bases)
        self._basis_names.append(name)

    def add_fingerprint(self) -> None:
        """Store a fingerprint of the bases (for methods that never save them)."""
        self.register_buffer("basis_fingerprint", fingerprint(*(getattr(self, n) for n in self._basis_names)))

    def check_state(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        problems = []
        differ = [self.saved_key(n) for n in self._basis_names
                  if n in tensors and not torch.equal(tensors[n].to(getattr(self, n).dtype), getattr(self, n))]
        if differ:
            problems.append(f"the stored {' and '.join(differ)} differ from the bases {self.seed_field}="
                            f"{self.seed_value} regenerates; the file was written with another seed (set "
                            f"{self.seed_field} to the one it was trained with)")
        if "basis_fingerprint" in tensors:
            if not torch.equal(tensors["basis_fingerprint"].to(torch.int64), self.basis_fingerprint):
                problems.append(f"{self.seed_field}={self.seed_value} regenerates bases that differ from those the "
                                f"adapter was trained with (basis_fingerprint mismatch); set {self.seed_field} to "
                                f"the seed it was trained with")
        return problems


class FactorDelta(Delta):
    """A linear-layer delta given by factors (A (k, in), B (out, k)) that subclasses build in `factors()`."""

    commutes = True  # additive in weight space

    def __init__(self, base: nn.Module, config, path: str, bank=None, dropout: float = 0.0) -> None:
        super().__init__(base, config, path, bank)
        geo = layers.geometry(base)
        self.in_features, self.out_features = geo.in_features, geo.out_features
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        h = F.linear(F.linear(self.dropout(x.to(a.dtype)), a), b)
        return base_out + h.to(base_out.dtype)

    def delta_weight(self) -> dict[str, torch.Tensor]:
        a, b = self.factors()
        return {"weight": layers.to_param_layout(self.base, b @ a)}
