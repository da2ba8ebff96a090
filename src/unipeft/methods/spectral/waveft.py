"""WaveFT: a weight update learned as a few coefficients of its 2-D wavelet transform.

For an (out, in) weight, `n_frequency` wavelet coefficients train; every other coefficient is zero.
They sit at the first n_frequency positions of a random permutation of the out*in positions, drawn
from a CPU generator seeded with `random_loc_seed` (the draw PEFT makes). The coefficient matrix is
padded by the wavelet's boundary loss (L - 2 rows and columns for a filter of length L, plus one to make
each side even), the coefficients are placed centred in it, and the matrix is read as the four sub-bands
of one level (approximation top-left, then horizontal, vertical, diagonal details). One inverse DWT
(_wavelets.py) and a centred crop give the dense dW (out, in), scaled by `scaling`: out = base(x) + x @ dW^T.
With use_idwt=False the coefficients are used directly as sparse entries of dW.

As in PEFT the locations are never stored: the file holds only `waveft_spectrum`, and loading draws the
locations again from the seed. proportional_parameters=True spreads a budget of n_frequency per target
over the targets in proportion to their out*in (PEFT's rounding); the resolved config records the
resulting counts in n_frequency_pattern. PEFT's init (init_weights=True) is zeros: the identity;
init_weights=False draws N(0, 0.01^2). The filters are the Daubechies family db1 (Haar, the default)
to db10, computed here; PEFT's symlet and coiflet families are not offered.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core import layers
from ...core.config import AdapterConfig
from ...core.fields import choice, positive_int
from ...core.registry import Capabilities, register
from ._common import DenseDelta, finite_number, integer, module_error, per_module, positive_int_dict
from ._wavelets import daubechies_families, filter_length, idwt2


@dataclass
class WaveFTConfig(AdapterConfig):
    """WaveFT (PEFT's WaveFTConfig): n_frequency trained wavelet coefficients per target at locations drawn
    from random_loc_seed; n_frequency_pattern sets the count per module, proportional_parameters by size."""

    peft_class = "WaveFTConfig"
    peft_type = "WAVEFT"

    n_frequency: int = positive_int(2592)
    scaling: float = finite_number(25.0)
    wavelet_family: str = choice("db1", daubechies_families())
    use_idwt: bool = True
    random_loc_seed: int = integer(777)
    fan_in_fan_out: bool = False
    bias: str = choice("none", ["none"])
    n_frequency_pattern: dict[str, int] = positive_int_dict()
    proportional_parameters: bool = False
    init_weights: bool = True

    def resolved_fields(self, model, targets) -> dict[str, Any]:
        """fan_in_fan_out for GPT-2's Conv1D; with proportional_parameters, each target's share of the budget."""
        out: dict[str, Any] = {"fan_in_fan_out": any(layers.is_transposed(m) for _, m in targets)}
        if self.proportional_parameters:
            out["n_frequency_pattern"] = proportional_counts(self.n_frequency, targets)
        return out

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        """Few enough coefficients for the smallest toy layer, scaled to a visible change, through db2."""
        return {"n_frequency": 8, "scaling": 10.0, "wavelet_family": "db2"}


def proportional_counts(n_frequency: int, targets: list[tuple[str, nn.Module]]) -> dict[str, int]:
    """{escaped module path: coefficients}: n_frequency * len(targets) shared by out*in, at least one each."""
    sizes = []
    for path, module in targets:
        geo = layers.geometry(module)
        sizes.append((path, geo.in_features * geo.out_features))
    total = sum(size for _, size in sizes)
    budget = n_frequency * len(sizes)
    return {re.escape(path): max(1, round(size / total * budget)) for path, size in sizes}


def wavelet_locations(seed: int, out_features: int, in_features: int, n: int) -> torch.Tensor:
    """(2, n) int64 (row, column) of the trained coefficients: the first n positions of a seeded permutation."""
    flat = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(int(seed)))[:n]
    return torch.stack([flat // in_features, flat % in_features])


class WaveFTDelta(DenseDelta):
    """The coefficients `waveft_spectrum` (n,) and their regenerated locations `indices` (not saved)."""

    def __init__(self, base: nn.Module, config: WaveFTConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        n, label = per_module(config, "n_frequency", "n_frequency_pattern", path)
        size = self.in_features * self.out_features
        if n > size:
            raise module_error(label, path, base, f"at most out*in = {size} coefficients", n)
        self.register_buffer("indices", wavelet_locations(config.random_loc_seed, self.out_features,
                                                          self.in_features, n), persistent=False)
        self.scaling = float(config.scaling)
        self.family = config.wavelet_family
        self.use_idwt = bool(config.use_idwt)
        self.waveft_spectrum = nn.Parameter(torch.zeros(n) if config.init_weights else torch.randn(n) * 0.01)
        self.identity_at_init = bool(config.init_weights)

    def matrix(self) -> torch.Tensor:
        spectrum = self.waveft_spectrum
        rows, cols = self.indices.to(spectrum.device)
        if not self.use_idwt:
            dense = torch.zeros(self.out_features, self.in_features, dtype=spectrum.dtype, device=spectrum.device)
            return dense.index_put((rows, cols), spectrum) * self.scaling
        grow = filter_length(self.family) - 2  # what one inverse level loses at the borders
        height, width = self.out_features + grow, self.in_features + grow
        height, width = height + height % 2, width + width % 2
        top, left = (height - self.out_features) // 2, (width - self.in_features) // 2
        coeffs = torch.zeros(height, width, dtype=spectrum.dtype, device=spectrum.device)
        coeffs = coeffs.index_put((rows + top, cols + left), spectrum)
        h2, w2 = height // 2, width // 2
        dw = idwt2(coeffs[:h2, :w2], coeffs[:h2, w2:], coeffs[h2:, :w2], coeffs[h2:, w2:], self.family)
        dw = dw * self.scaling
        r0, c0 = (dw.shape[0] - self.out_features) // 2, (dw.shape[1] - self.in_features) // 2
        return dw[r0:r0 + self.out_features, c0:c0 + self.in_features]


register("waveft", WaveFTConfig, WaveFTDelta,
         Capabilities(mergeable=True, mixed_batch=True, layer_types=layers.MATRIX_LAYERS, peft_compatible=True))
