"""The layout rules of the design, checked on the source: arrows point down, the protocol is declared, files stay small."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "unipeft"
UPPER = ("train", "kg", "serve", "federated", "search", "merge", "compress", "continual", "interop", "data")
PROTOCOL = ("training_callbacks", "optimizer_groups", "resolved_fields", "make_bank", "needs_calibration",
            "state_prefix", "call_inputs", "forward_grouped", "example_fields", "identity_at_init", "base_edits",
            "calibrated_fields", "loads_without_calibration", "parameter_targets", "peft_class")


def _files(folder: str) -> list[Path]:
    return sorted((SRC / folder).rglob("*.py"))


def test_methods_import_only_core():
    pattern = re.compile(rf"^\s*(from|import)\s+(unipeft\.|\.\.+)({'|'.join(UPPER)})\b", re.M)
    offenders = [f"{p.relative_to(SRC)}: {m.group(0).strip()}" for p in _files("methods")
                 for m in pattern.finditer(p.read_text())]
    assert not offenders, offenders


def test_core_imports_no_method_or_upper_layer():
    pattern = re.compile(rf"^\s*(from|import)\s+(unipeft\.|\.\.+)(methods|{'|'.join(UPPER)})\b", re.M)
    offenders = [f"{p.relative_to(SRC)}: {m.group(0).strip()}" for p in _files("core")
                 for m in pattern.finditer(p.read_text())]
    assert not offenders, offenders


@pytest.mark.parametrize("folder", ["core", "train"])
def test_method_protocol_is_never_probed(folder):
    pattern = re.compile(rf"(getattr|hasattr)\([^)]*({'|'.join(PROTOCOL)})")
    offenders = [f"{p.relative_to(SRC)}: {m.group(0)}" for p in _files(folder) for m in pattern.finditer(p.read_text())]
    assert not offenders, offenders


def test_only_core_layers_knows_conv1d():
    """GPT-2's transposed Conv1D (and quantized layers) are core/layers.py's business alone."""
    offenders = []
    for p in SRC.rglob("*.py"):
        if p.relative_to(SRC).as_posix() == "core/layers.py":
            continue
        tree = ast.parse(p.read_text())
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        if {"Conv1D", "bitsandbytes"} & names:
            offenders.append(str(p.relative_to(SRC)))
    assert not offenders, offenders


def test_no_file_over_400_lines():
    big = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not big, big
