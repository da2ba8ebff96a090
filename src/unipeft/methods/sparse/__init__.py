"""Sparse and selective methods: index + value deltas (SaRA, SpIEL, SPT, diff pruning), dense updates
trained in turns (LISA, HFT) and structured column updates (S2FT); shared machinery in base.py."""
