"""Every PEFT tuner type and what unipeft does with it, as a markdown table made from the registry.

    python -m unipeft.interop.peft_types          # the table the README shows (a test keeps them equal)

One row per `PeftType` of the installed peft: the unipeft config reading and writing that type and
its declared capabilities (`up.capability_table()`), or the reason when no method does.
"""
from __future__ import annotations

from ..core.registry import public_methods

HEADER = ["| PEFT type | unipeft config (method) | mergeable | mixed batch | quantized base | layers |",
          "|---|---|---|---|---|---|"]
# Types no unipeft method reads or writes, with the reason (empty while every type has a method).
NOT_SUPPORTED: dict[str, str] = {}


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def peft_type_table() -> str:
    """The markdown table (rows in PEFT's own order of its PeftType enum)."""
    from peft.utils.peft_types import PeftType

    by_type: dict[str, list] = {}
    for spec in sorted(public_methods().values(), key=lambda s: s.name):
        if spec.capabilities.peft_compatible:
            by_type.setdefault(spec.config_cls.peft_type, []).append(spec)
    rows = list(HEADER)
    for member in PeftType:
        specs = by_type.get(member.value, [])
        if not specs:
            reason = NOT_SUPPORTED.get(member.value, "not supported")
            rows.append(f"| {member.value} | {reason} | | | | |")
            continue
        for s in specs:
            c = s.capabilities
            layer_names = ", ".join(t.__name__ for t in c.layer_types) or "-"
            rows.append(f"| {member.value} | `{s.config_cls.__name__}` (`{s.name}`) | {_yes(c.mergeable)} | "
                        f"{_yes(c.mixed_batch)} | {_yes(c.quantized_base)} | {layer_names} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(peft_type_table(), end="")
