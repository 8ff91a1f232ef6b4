"""Per-nucleus CSV and GeoJSON (a FeatureCollection QuPath imports as detections)."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..types import Nuclei
from .atomic import atomic_write, compact_json, write_json_in_batches

__all__ = ["write_csv", "geojson_document", "write_geojson", "write_geojson_document"]


def write_csv(
    path: str,
    nuclei: Nuclei,
    *,
    class_names: Sequence[str],
    mpp: float | None = None,
    provenance: dict[str, Any] | None = None,
) -> None:
    """One row per nucleus: id, centroid, box (base pixels), score, class, measurements.

    ``provenance`` is written first as one ``# {json}`` comment line (read the
    table with ``pandas.read_csv(path, comment="#")``).
    """
    table = nuclei.to_table(class_names)
    cols = list(table)
    with atomic_write(path, "w", encoding="utf-8", newline="") as f:
        if provenance is not None:
            f.write("# " + json.dumps(provenance, separators=(",", ":"), default=str) + "\n")
        w = csv.writer(f)
        w.writerow(["id", *cols] + (["x_um", "y_um"] if mpp else []))
        for i in range(len(nuclei)):
            row: list[Any] = [i + 1]
            for c in cols:
                v = table[c][i]
                row.append(round(float(v), 3) if isinstance(v, np.floating | float) else v)
            if mpp:
                row += [round(float(table["x"][i]) * mpp, 2), round(float(table["y"][i]) * mpp, 2)]
            w.writerow(row)


def _rgb_triplet(color: str) -> list[int]:
    inner = color[color.index("(") + 1 : color.index(")")] if "(" in color else "255,255,0"
    return [int(float(v)) for v in inner.split(",")[:3]]


def _features(
    nuclei: Nuclei, class_names: Sequence[str], class_colors: Sequence[str], first_id: int = 1
) -> list[dict[str, Any]]:
    """One GeoJSON Feature per nucleus, numbered from ``first_id``.

    Each ring is closed and has at least 4 positions, as GeoJSON (and JTS,
    which QuPath reads it with) requires: a one-pixel-wide straight nucleus
    has a two-vertex outline (``[a, b, a]`` closed), and one such ring makes
    QuPath refuse the whole file, so it is written as its pixel box instead.
    """
    feats = []
    # one conversion for all vertices, sliced per nucleus
    verts = np.round(nuclei.polygon_vertices.astype(float), 2).tolist()
    offsets = nuclei.polygon_offsets.tolist()
    boxes = np.round(nuclei.boxes, 2).tolist()
    for i in range(len(nuclei)):
        ring = verts[offsets[i] : offsets[i + 1]]
        if len(ring) > 1 and ring[0] == ring[-1]:
            ring.pop()
        if len(ring) < 3:
            x0, y0, x1, y1 = boxes[i]
            ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
        ring.append(ring[0])
        lab = int(nuclei.labels[i])
        # (QuPath keeps a feature's ``id`` only where it is a UUID: the CSV id
        # goes with the measurements, which it keeps, so the two can be joined)
        meas = {"nucleus_id": first_id + i, "score": round(float(nuclei.scores[i]), 4)}
        meas.update({k: round(float(v[i]), 4) for k, v in nuclei.measurements.items()})
        feats.append(
            {
                "type": "Feature",
                "id": first_id + i,
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "detection",
                    "classification": {
                        "name": class_names[lab],
                        "color": _rgb_triplet(class_colors[lab]),
                    },
                    "measurements": meas,
                },
            }
        )
    return feats


def geojson_document(
    nuclei: Nuclei,
    *,
    class_names: Sequence[str],
    class_colors: Sequence[str],
    properties: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """GeoJSON FeatureCollection; each nucleus a Polygon with QuPath's properties."""
    doc: dict[str, Any] = {
        "type": "FeatureCollection",
        "features": _features(nuclei, class_names, class_colors),
    }
    if properties:
        doc["properties"] = properties
    return doc


def write_geojson_document(
    path: str,
    nuclei: Nuclei,
    *,
    class_names: Sequence[str],
    class_colors: Sequence[str],
    properties: dict[str, Any] | None = None,
    batch: int = 5000,
) -> None:
    """Write :func:`geojson_document`'s document to ``path`` (the same bytes
    as :func:`write_geojson` of it), atomically, ``batch`` features at a time."""
    batches = (
        _features(part, class_names, class_colors, first_id=a + 1)
        for a, part in nuclei.chunks(batch)
    )
    tail = {"properties": properties} if properties else {}
    write_json_in_batches(path, {"type": "FeatureCollection"}, "features", batches, tail)


def write_geojson(path: str, doc: dict[str, Any]) -> None:
    """Write a GeoJSON document atomically."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(compact_json(doc))
