"""Interoperability with other libraries' adapter formats (PEFT first)."""
