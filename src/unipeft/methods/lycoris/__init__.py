"""The LyCORIS family as PEFT has it: LoHa (Hadamard product of low-rank factors) and LoKr (Kronecker
product), both output-side deltas on Linear / Conv1d / Conv2d layers that rebuild a dense update of the
base weight's shape (mergeable, PEFT's on-disk layout). Shared fields and the delta live in _common.py."""
from .loha import LoHaConfig, LoHaDelta
from .lokr import LoKrConfig, LoKrDelta, factorization

__all__ = ["LoHaConfig", "LoHaDelta", "LoKrConfig", "LoKrDelta", "factorization"]
