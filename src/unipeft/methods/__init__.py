"""Built-in methods: every module here (and in the packages here) registers its methods on import.

The modules are found by walking the package, so adding a method is adding a file (or a
package) with its `register(...)` call: no list here or in `unipeft/__init__.py` changes.
"""
import importlib
import pkgutil


def _import_all() -> None:
    for info in sorted(pkgutil.walk_packages(__path__, f"{__name__}."), key=lambda i: i.name):
        if not info.name.rsplit(".", 1)[-1].startswith("_"):
            importlib.import_module(info.name)


_import_all()
