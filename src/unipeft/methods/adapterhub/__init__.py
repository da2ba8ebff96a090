"""Methods from AdapterHub's `adapters` library that PEFT lacks: Compacter / Compacter++ (PHM bottleneck
adapters), the ReFT family (LoReFT, NoReFT, DiReFT), Adapter+ and UniPELT (gated LoRA + gated adapter).

Each module registers its methods on import (unipeft.methods imports every module of this package).
"""
