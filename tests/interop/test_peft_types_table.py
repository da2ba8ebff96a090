"""The README's table of PEFT types is the registry's (unipeft.interop.peft_types), every PEFT type has a
method, and every method claiming PEFT's format has a parity test naming its config class."""
from __future__ import annotations

import re
from pathlib import Path

from peft.utils.peft_types import PeftType

import unipeft as up
from unipeft.interop.peft_types import peft_type_table

ROOT = Path(__file__).resolve().parents[2]


def _readme_block() -> str:
    text = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- peft-types:start -->\n(.*?)<!-- peft-types:end -->", text, re.S)
    assert found, "README.md lacks the peft-types block"
    return found.group(1)


def test_readme_table_is_the_generated_one():
    assert _readme_block() == peft_type_table(), "regenerate: python -m unipeft.interop.peft_types"


def test_every_peft_type_has_a_method_with_a_parity_test():
    table = peft_type_table()
    assert len(list(PeftType)) == 45
    for member in PeftType:
        assert f"| {member.value} | `" in table, f"{member.value} has no unipeft method"
    parity = "\n".join(p.read_text() for p in (ROOT / "tests" / "interop").glob("test_*parity*.py"))
    for spec in up.public_methods().values():
        if spec.capabilities.peft_compatible:
            cls = spec.config_cls
            names = {cls.__name__, cls.peft_class or cls.__name__}  # LoRA+ and LoRA-FA write LoRA folders
            assert any(n in parity for n in names), f"{spec.name}: no parity test names {sorted(names)}"
