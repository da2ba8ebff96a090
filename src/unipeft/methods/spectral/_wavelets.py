"""Daubechies wavelet filters and a one-level 2-D inverse discrete wavelet transform, in torch.

The filters are computed, not tabulated: the Daubechies lowpass filter with N vanishing moments
(length 2N) is sqrt(2) * ((1 + z^-1) / 2)^N * Q(z), where |Q(e^iw)|^2 = P(sin^2(w/2)) and
P(y) = sum_k C(N-1+k, k) y^k. Each root y of P gives a reciprocal pair of roots z of Q
(z + 1/z = 2 - 4y); keeping the one inside the unit circle gives the minimum-phase ("extremal phase")
filter, the one the dbN names denote. The highpass filter is the alternating flip of the lowpass one.

The inverse transform upsamples the four sub-bands by two and filters them with the outer products of
the reconstruction filters (one transposed convolution), then trims the (2L - 3) // 2 boundary samples
that the periodic-free ("zero") extension adds on each side, for a filter of length L.
"""
from __future__ import annotations

import math
from functools import lru_cache
from math import comb

import numpy as np
import torch
import torch.nn.functional as F

MAX_DAUBECHIES = 10  # root finding stays exact to ~1e-12 up to here


def daubechies_families() -> tuple[str, ...]:
    """The wavelet names this module computes: db1 (Haar) .. db10."""
    return tuple(f"db{n}" for n in range(1, MAX_DAUBECHIES + 1))


@lru_cache(maxsize=None)
def daubechies_lowpass(n: int) -> tuple[float, ...]:
    """The reconstruction lowpass filter of dbN (length 2N, sum sqrt(2)), largest taps first."""
    p = [comb(n - 1 + k, k) for k in range(n)]
    y_roots = np.roots(p[::-1]) if n > 1 else np.array([])
    poly = np.array([1.0 + 0j])
    for _ in range(n):
        poly = np.convolve(poly, [1.0, 1.0])
    for y in y_roots:
        pair = np.roots([1.0, -(2.0 - 4.0 * y), 1.0])
        poly = np.convolve(poly, [1.0, -min(pair, key=abs)])
    taps = np.real(poly)
    return tuple(float(t) for t in taps * math.sqrt(2.0) / taps.sum())


def reconstruction_filters(family: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(lowpass, highpass) reconstruction filters of `family` ("db1" .. "db10")."""
    if family not in daubechies_families():
        raise ValueError(f"unsupported wavelet family {family!r}; supported: {list(daubechies_families())}")
    lo = daubechies_lowpass(int(family[2:]))
    length = len(lo)
    hi = tuple((-1) ** i * lo[length - 1 - i] for i in range(length))
    return lo, hi


def filter_length(family: str) -> int:
    """L, the length of the family's filters."""
    return 2 * int(family[2:])


def idwt2(approx: torch.Tensor, horizontal: torch.Tensor, vertical: torch.Tensor, diagonal: torch.Tensor,
          family: str) -> torch.Tensor:
    """One level of the 2-D inverse DWT of four (h, w) sub-bands: a (2h - L + 2, 2w - L + 2) matrix.

    `horizontal` is synthesised highpass over dim 0 and lowpass over dim 1, `vertical` lowpass over dim 0 and
    highpass over dim 1, `diagonal` highpass over both (the order in which PEFT passes the sub-bands)."""
    lo, hi = reconstruction_filters(family)
    dtype, device = approx.dtype, approx.device
    lo_t = torch.tensor(lo, dtype=torch.float64).to(device=device, dtype=dtype)
    hi_t = torch.tensor(hi, dtype=torch.float64).to(device=device, dtype=dtype)
    bank = torch.stack([torch.outer(lo_t, lo_t), torch.outer(hi_t, lo_t), torch.outer(lo_t, hi_t),
                        torch.outer(hi_t, hi_t)]).unsqueeze(1)  # (4, 1, L, L)
    bands = torch.stack([approx, horizontal, vertical, diagonal]).unsqueeze(0)  # (1, 4, h, w)
    full = F.conv_transpose2d(bands, bank, stride=2)[0, 0]
    trim = (2 * len(lo) - 3) // 2
    if trim > 0:
        full = full[trim:-trim, trim:-trim]
    return full
