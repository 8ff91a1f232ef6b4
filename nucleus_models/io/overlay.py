"""A PNG overlay of nucleus outlines on the analysed region, for a quick look."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..types import Nuclei
from .atomic import atomic_write

__all__ = ["render_overlay", "write_overlay"]


def _rgb(color: str) -> tuple[int, int, int]:
    inner = color[color.index("(") + 1 : color.index(")")]
    r, g, b = (int(float(v)) for v in inner.split(",")[:3])
    return r, g, b


def render_overlay(
    image: np.ndarray,
    nuclei: Nuclei,
    *,
    origin: tuple[float, float],
    scale: float,
    class_colors: Sequence[str],
) -> np.ndarray:
    """Draw outlines on ``image`` (a region whose base-pixel origin is ``origin``,
    at ``scale`` image pixels per base pixel)."""
    import cv2

    out = np.ascontiguousarray(image[..., :3].copy())
    for i, poly in enumerate(nuclei.polygons()):
        pts = ((poly.astype(np.float64) - origin) * scale).round().astype(np.int32)
        cv2.polylines(
            out, [pts.reshape(-1, 1, 2)], True, _rgb(class_colors[int(nuclei.labels[i])]), 1
        )
    return out


def write_overlay(
    path: str, image: np.ndarray, *, provenance: dict[str, Any] | None = None, **kwargs: Any
) -> None:
    """Render and write a PNG overlay atomically (provenance in a ``nucleus-models`` text chunk)."""
    import json

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    arr = render_overlay(image, **kwargs)
    info = PngInfo()
    if provenance is not None:
        info.add_itxt("nucleus-models", json.dumps(provenance, default=str))
    with atomic_write(path, "wb") as f:
        Image.fromarray(arr).save(f, format="PNG", pnginfo=info)
