"""Merging trained deltas, written once for every mergeable method (on core only).

- adapters.py: `merge_adapters` - a new adapter from existing ones (linear, cat, TIES, DARE, magnitude
  prune, PCB and their `_svd` forms, which write any mergeable method's merge as a LoRA); ops.py holds
  the tensor operations; peft_compat.py gives PEFT's `add_weighted_adapter`.
- atlas.py: aTLAS, per-block coefficients learned from a few labelled batches.
- checkpoint.py: full checkpoints merged tensor by tensor against a base (mergekit's methods and YAML).
"""
from .adapters import METHODS, merge_adapters
from .atlas import atlas_merge
from .checkpoint import merge_checkpoints, run_merge_yaml
from .peft_compat import add_weighted_adapter

__all__ = ["METHODS", "add_weighted_adapter", "atlas_merge", "merge_adapters", "merge_checkpoints", "run_merge_yaml"]
