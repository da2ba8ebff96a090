"""Shared-basis LoRA methods: one bank per adapter (random or learned bases, vector banks, shard
pools) shared by every site, plus small per-site vectors or coefficients.

vera.py (VeRA), vblora.py (VB-LoRA), nola.py (NOLA), randlora.py (RandLoRA), mos.py (Mixture of
Shards), s2lora.py (S2-LoRA); _common.py holds what they share.
"""
