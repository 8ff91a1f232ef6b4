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


#: colour of an ROI's outline (the area a polygon ROI analysed)
ROI_COLOR = (255, 215, 0)


def render_overlay(
    image: np.ndarray,
    nuclei: Nuclei,
    *,
    origin: tuple[float, float],
    scale: float,
    class_colors: Sequence[str],
    roi_polygons: Sequence[np.ndarray] = (),
) -> np.ndarray:
    """Draw outlines on ``image`` (a region whose base-pixel origin is ``origin``,
    at ``scale`` image pixels per base pixel), and the outline of each of
    ``roi_polygons`` (base pixels), the area a polygon ROI analysed."""
    import cv2

    def points(poly: np.ndarray) -> np.ndarray:
        return ((poly.astype(np.float64) - origin) * scale).round().astype(np.int32)

    out = np.ascontiguousarray(image[..., :3].copy())
    for i, poly in enumerate(nuclei.polygons()):
        color = _rgb(class_colors[int(nuclei.labels[i])])
        cv2.polylines(out, [points(poly).reshape(-1, 1, 2)], True, color, 1)
    for poly in roi_polygons:
        cv2.polylines(out, [points(poly).reshape(-1, 1, 2)], True, ROI_COLOR, 2)
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
