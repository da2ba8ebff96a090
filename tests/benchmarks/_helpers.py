"""Checks shared by the reproduction smoke tests."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_png(path: Path, min_bytes: int = 20_000) -> tuple[int, int]:
    """A real, non-trivial PNG that matplotlib reads back at the size its header states; returns (width, height)."""
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > min_bytes, f"{path}: only {len(data)} bytes"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (height, width) and min(width, height) >= 300
    assert image[..., :3].std() > 0.05  # not a blank canvas
    return width, height


def load_json(path: Path) -> dict[str, Any]:
    """The JSON a script wrote."""
    assert path.exists(), f"{path} was not written"
    return json.loads(path.read_text())
