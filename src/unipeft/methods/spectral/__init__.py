"""Spectral, circulant and structured-sparse weight updates: FourierFT (a few trained 2-D Fourier
coefficients), C3A (block-circulant matrices applied by FFT), SHiRA (a sparse high-rank update on a fixed
random mask) and MiSS (one shard shared across the weight's column blocks). Each delta is a dense (out, in)
update in weight space, so every method here merges through core's generic code."""
