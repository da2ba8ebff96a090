"""Reproducible side-by-side benchmarks of unipeft against its peers (run: python -m benchmarks.run)."""
