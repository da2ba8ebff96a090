"""FourierFT: a weight update learned as a few coefficients of its 2-D Fourier spectrum.

For an (out, in) weight, `n_frequency` spectral entries train and every other entry of the spectrum is
zero: dW = Re(IFFT2(spectrum)) * scaling, added as out = base(x) + x @ dW^T. The entries sit at the
first n_frequency positions of a random permutation of the out*in positions, drawn from a CPU
generator seeded with `random_loc_seed` (the draw PEFT makes, in the same order). As in PEFT the
locations are never stored: a file holds only `fourierft_spectrum`, and loading regenerates the
locations from the seed in the config. PEFT's default init draws the spectrum from a standard normal
(init_weights=False), so a fresh adapter is not the identity; init_weights=True starts at zeros.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core import layers
from ...core.config import AdapterConfig
from ...core.fields import choice, positive_int
from ...core.registry import Capabilities, register
from ._common import DenseDelta, finite_number, integer, module_error, per_module, positive_int_dict


@dataclass
class FourierFTConfig(AdapterConfig):
    """FourierFT (PEFT's FourierFTConfig): n_frequency trained spectral coefficients per target, at
    locations regenerated from random_loc_seed; n_frequency_pattern sets it per module."""

    peft_class = "FourierFTConfig"
    peft_type = "FOURIERFT"

    n_frequency: int = positive_int(1000)
    scaling: float = finite_number(150.0)
    random_loc_seed: int = integer(777)
    fan_in_fan_out: bool = False
    bias: str = choice("none", ["none"])
    n_frequency_pattern: dict[str, int] = positive_int_dict()
    init_weights: bool = False

    def resolved_fields(self, model, targets) -> dict[str, Any]:
        """What PEFT records for GPT-2's transposed Conv1D."""
        return {"fan_in_fan_out": any(layers.is_transposed(m) for _, m in targets)}

    @classmethod
    def example_fields(cls, candidates: list[str]) -> dict[str, Any]:
        """Few enough coefficients for the smallest toy layer, scaled to a visible change."""
        return {"n_frequency": 8, "scaling": 10.0}


def spectral_locations(seed: int, out_features: int, in_features: int, n: int) -> torch.Tensor:
    """(2, n) int64 (row, column) of the trained spectral entries: the first n positions of a
    permutation of the out*in positions drawn from `seed`."""
    flat = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(int(seed)))[:n]
    return torch.stack([flat // in_features, flat % in_features])


class FourierFTDelta(DenseDelta):
    """The spectrum `fourierft_spectrum` (n,) and its regenerated locations `indices` (not saved)."""

    identity_at_init = False  # PEFT's default spectrum is random (init_weights=False)

    def __init__(self, base: nn.Module, config: FourierFTConfig, path: str, bank=None) -> None:
        super().__init__(base, config, path, bank)
        n, label = per_module(config, "n_frequency", "n_frequency_pattern", path)
        size = self.in_features * self.out_features
        if n > size:
            raise module_error(label, path, base, f"at most out*in = {size} coefficients", n)
        self.register_buffer("indices", spectral_locations(config.random_loc_seed, self.out_features,
                                                           self.in_features, n), persistent=False)
        self.scaling = float(config.scaling)
        self.fourierft_spectrum = nn.Parameter(torch.zeros(n) if config.init_weights else torch.randn(n))
        self.identity_at_init = bool(config.init_weights)

    def matrix(self) -> torch.Tensor:
        # The inverse FFT runs in float32 (no half-precision FFT on CPU), then returns to the spectrum's dtype.
        spectrum = self.fourierft_spectrum
        rows, cols = self.indices.to(spectrum.device)
        dense = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=spectrum.device)
        dense = dense.index_put((rows, cols), spectrum.float())
        return (torch.fft.ifft2(dense).real * self.scaling).to(spectrum.dtype)


register("fourierft", FourierFTConfig, FourierFTDelta,
         Capabilities(mergeable=True, mixed_batch=True, layer_types=layers.MATRIX_LAYERS, peft_compatible=True))
