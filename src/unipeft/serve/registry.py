"""Adapters the server knows by name: loaded from folders at runtime, at most `max_resident` in memory.

An adapter is *registered* (name -> folder) and, while it is in use or recently used, *resident* (loaded
into the model). The least recently used idle adapter is unloaded when one more must come in; a request
for it loads it again from its folder. Every change to the model runs through `engine.run_exclusive`,
so it happens between two decoding steps and never under a running batch.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.errors import UnipeftError
from .api import ApiError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def check_folder(path: str) -> Path:
    """The adapter folder, if it holds a config and safetensors weights; pickle-only folders are refused."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ApiError(400, f"path: adapter folder {path!r} does not exist or is not a folder", "path")
    if not (folder / CONFIG_FILE).is_file():
        raise ApiError(400, f"path: {path!r} has no {CONFIG_FILE}; it is not an adapter folder", "path")
    if not (folder / WEIGHTS_FILE).is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLES)
        found = f" (found only {', '.join(pickles)}: pickle files are never loaded by the server)" if pickles else ""
        raise ApiError(400, f"path: {path!r} has no {WEIGHTS_FILE}{found}; save the adapter as safetensors",
                       "path")
    return folder


class AdapterRegistry:
    """Name -> folder for every registered adapter, with an LRU of the resident ones."""

    def __init__(self, model: Any, run_exclusive: Callable[[Callable[[], Any]], Any], max_resident: int = 8,
                 base_name: str = "base"):
        if max_resident < 1:
            raise ValueError(f"max_adapters must be at least 1, got {max_resident}")
        self.model, self._exclusive = model, run_exclusive
        self.max_resident, self.base_name = max_resident, base_name
        self.paths: dict[str, Path | None] = {}
        self.resident: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.in_use: dict[str, int] = {}
        self.loads = self.evictions = 0
        self._lock = threading.RLock()

    def adopt(self, name: str, path: str | Path | None) -> None:
        """Record an adapter already loaded in the model (at startup) under its folder (None: never evicted)."""
        with self._lock:
            self.paths[name] = None if path is None else Path(path)
            self.resident[name] = None

    def names(self) -> list[str]:
        """Every registered adapter, resident or not, sorted."""
        with self._lock:
            return sorted(self.paths)

    def register(self, name: str, path: str) -> None:
        """Load `path` as adapter `name` (validated by the library's loader; the model is unchanged on failure)."""
        if name == self.base_name:
            raise ApiError(400, f"name: {name!r} is the base model's name; choose another", "name")
        folder = check_folder(path)
        with self._lock:
            if name in self.paths:
                raise ApiError(409, f"name: adapter {name!r} is already loaded (from {self.paths[name]}); "
                                    f"DELETE /v1/adapters/{name} first", "name", "conflict_error")
            self._make_room()
            self._load(name, folder)
            self.paths[name] = folder
            self.resident[name] = None

    def unregister(self, name: str) -> None:
        """Forget adapter `name` and unload it (refused while requests are running on it)."""
        with self._lock:
            if name not in self.paths:
                raise ApiError(404, f"model: no adapter named {name!r}; adapters: {self.names()}", "model",
                               "not_found_error")
            if self.in_use.get(name):
                raise ApiError(409, f"adapter {name!r} has {self.in_use[name]} requests running; retry when "
                                    f"they finish", "model", "conflict_error")
            if name in self.resident:
                self._unload(name)
            del self.paths[name]

    def acquire(self, name: str | None) -> str | None:
        """Make adapter `name` resident (reloading it if it was evicted) and pin it until release()."""
        if name is None or name == self.base_name:
            return None
        with self._lock:
            if name not in self.paths:
                raise ApiError(404, f"model: no model or adapter named {name!r}; available: "
                                    f"{[self.base_name, *self.names()]}", "model", "not_found_error")
            if name in self.resident:
                self.resident.move_to_end(name)
            else:
                self._make_room()
                self._load(name, self.paths[name])
                self.resident[name] = None
            self.in_use[name] = self.in_use.get(name, 0) + 1
            return name

    def release(self, name: str | None) -> None:
        """Unpin an adapter acquired for a request."""
        if name is None:
            return
        with self._lock:
            self.in_use[name] -= 1
            if not self.in_use[name]:
                del self.in_use[name]
            self._make_room(0)  # pinned adapters may have pushed the count over the limit

    def _make_room(self, incoming: int = 1) -> None:
        """Unload idle adapters, least recently used first, until `incoming` more fit."""
        for name in list(self.resident):
            if len(self.resident) + incoming <= self.max_resident:
                return
            if not self.in_use.get(name) and self.paths.get(name) is not None:
                self._unload(name)
                self.evictions += 1

    def _load(self, name: str, folder: Path) -> None:
        """Load through the scheduler thread; the library's loader errors become a 400 naming the problem."""
        def load():
            self.model.load_adapter(str(folder), name)

        try:
            self.run(load)
        except ApiError:
            raise
        except (UnipeftError, FileNotFoundError, OSError, ValueError, KeyError) as exc:
            msg = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
            raise ApiError(400, f"path: cannot load adapter {name!r} from {str(folder)!r}: {msg}", "path") from None
        self.loads += 1

    def _unload(self, name: str) -> None:
        """Delete the adapter from the model between two steps."""
        self.run(lambda: self.model.delete_adapter(name))
        del self.resident[name]

    def run(self, fn: Callable[[], Any]) -> Any:
        """fn on the scheduler thread; its exception (if any) is raised here."""
        box: dict[str, Any] = {}

        def call():
            try:
                box["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 - carried back to the calling thread
                box["error"] = exc

        self._exclusive(call)
        if "error" in box:
            raise box["error"]
        return box.get("value")
