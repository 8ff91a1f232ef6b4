"""DSA annotation documents (large_image's annotation schema).

One document per run: ``{"name", "description", "elements", "attributes"}``.
Elements are ``polyline`` (closed, nucleus outline), ``point`` or
``rectangle``, coloured by class, with the class name as ``group`` and the
per-nucleus score and measurements under ``user``, and the nucleus's row
``id`` in the CSV (and the GeoJSON feature's ``id``) as ``user.nucleus_id``:
Girder stores a large annotation's elements 10000 at a time in parallel
threads, so their order as read back is not the file's. (Named apart from
the element's own ``id``, the ObjectId Girder gives it.)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ..types import Nuclei
from .atomic import atomic_write, compact_json, write_json_in_batches

__all__ = [
    "annotation_batches",
    "annotation_document",
    "write_annotation",
    "write_annotation_document",
    "FORMS",
]

FORMS = ("polygon", "point", "box")
_ALIASES = {"boundary": "polygon", "bbox": "box"}


def _fill(color: str, alpha: float = 0.25) -> str:
    if color.startswith("rgb(") and color.endswith(")"):
        return f"rgba({color[4:-1]},{alpha})"
    return color


def _check_form(nuclei: Nuclei, form: str, class_names: Sequence[str]) -> str:
    form = _ALIASES.get(form, form)
    if form not in FORMS:
        raise ValueError(f"unknown annotation form {form!r}; use one of {FORMS}")
    if len(nuclei) and int(nuclei.labels.max()) >= len(class_names):
        raise ValueError(
            f"nucleus label {int(nuclei.labels.max())} has no class name in {list(class_names)}"
        )
    return form


def _elements(
    nuclei: Nuclei,
    form: str,
    class_names: Sequence[str],
    class_colors: Sequence[str],
    decimals: int,
    first_id: int = 1,
) -> list[dict[str, Any]]:
    """One annotation element per nucleus (``form`` already checked), the
    first one's ``user.nucleus_id`` ``first_id``."""
    colors = list(class_colors) + ["rgb(255,255,0)"] * max(0, len(class_names) - len(class_colors))
    fills = [_fill(c) for c in colors]
    meas_keys = [k for k in nuclei.measurements if k != "area_px"]
    meas = {k: np.round(nuclei.measurements[k].astype(float), 3).tolist() for k in meas_keys}
    scores = np.round(nuclei.scores.astype(float), 3).tolist()
    labels = nuclei.labels.tolist()
    elements: list[dict[str, Any]] = []
    cent = np.round(nuclei.centroids, decimals).tolist()
    boxes = np.round(nuclei.boxes, decimals).tolist()
    verts: list[list[float]] = []
    offsets: list[int] = []
    if form == "polygon":  # one conversion for all vertices, sliced per nucleus
        v = np.round(nuclei.polygon_vertices.astype(float), decimals)
        verts = np.c_[v, np.zeros(len(v))].tolist()
        offsets = nuclei.polygon_offsets.tolist()
    for i in range(len(nuclei)):
        lab = labels[i]
        el: dict[str, Any]
        if form == "polygon":
            el = {
                "type": "polyline",
                "closed": True,
                "points": verts[offsets[i] : offsets[i + 1]],
                "fillColor": fills[lab],
            }
        elif form == "point":
            el = {"type": "point", "center": [cent[i][0], cent[i][1], 0]}
        else:
            x0, y0, x1, y1 = boxes[i]
            el = {
                "type": "rectangle",
                "center": [round((x0 + x1) / 2, decimals), round((y0 + y1) / 2, decimals), 0],
                "width": round(x1 - x0, decimals),
                "height": round(y1 - y0, decimals),
                "rotation": 0,
                "fillColor": fills[lab],
            }
        el["lineColor"] = colors[lab]
        el["lineWidth"] = 1
        el["group"] = class_names[lab]
        user = {"nucleus_id": first_id + i, "score": scores[i]}
        for k in meas_keys:
            user[k] = meas[k][i]
        el["user"] = user
        elements.append(el)
    return elements


def _tail(description: str, attributes: dict[str, Any] | None) -> dict[str, Any]:
    tail: dict[str, Any] = {}
    if description:
        tail["description"] = description
    if attributes is not None:
        tail["attributes"] = attributes
    return tail


def annotation_document(
    nuclei: Nuclei,
    *,
    name: str,
    form: str = "polygon",
    class_names: Sequence[str] = ("nucleus",),
    class_colors: Sequence[str] = ("rgb(0,200,255)",),
    description: str = "",
    attributes: dict[str, Any] | None = None,
    decimals: int = 1,
) -> dict[str, Any]:
    """Build an annotation document for ``nuclei`` (base-pixel coordinates).

    Parameters
    ----------
    form : {"polygon", "point", "box"}
        Element type per nucleus (HistomicsTK's ``boundary``/``bbox`` accepted).
    attributes : dict
        Provenance (parameters, model, sha256, version, counts, timings).
    """
    form = _check_form(nuclei, form, class_names)
    doc: dict[str, Any] = {
        "name": name,
        "elements": _elements(nuclei, form, class_names, class_colors, decimals),
    }
    return {**doc, **_tail(description, attributes)}


def write_annotation_document(
    path: str,
    nuclei: Nuclei,
    *,
    name: str,
    form: str = "polygon",
    class_names: Sequence[str] = ("nucleus",),
    class_colors: Sequence[str] = ("rgb(0,200,255)",),
    description: str = "",
    attributes: dict[str, Any] | None = None,
    decimals: int = 1,
    batch: int = 5000,
) -> None:
    """Write :func:`annotation_document`'s document for ``nuclei`` to ``path``
    (the same bytes as :func:`write_annotation` of it), atomically, building
    ``batch`` elements at a time instead of all of them: a whole slide's
    million nuclei would take ~3 GB as Python objects."""
    batches = annotation_batches(
        nuclei,
        form=form,
        class_names=class_names,
        class_colors=class_colors,
        decimals=decimals,
        batch=batch,
    )
    write_json_in_batches(path, {"name": name}, "elements", batches, _tail(description, attributes))


def annotation_batches(
    nuclei: Nuclei,
    *,
    form: str = "polygon",
    class_names: Sequence[str] = ("nucleus",),
    class_colors: Sequence[str] = ("rgb(0,200,255)",),
    decimals: int = 1,
    batch: int = 5000,
) -> Iterator[list[dict[str, Any]]]:
    """:func:`annotation_document`'s elements, ``batch`` at a time (the form
    and class names are checked before the first batch is made).

    >>> from nucleus_models.types import Nuclei
    >>> sq = np.array([[0, 0], [2, 0], [2, 2], [0, 2]], float)
    >>> parts = annotation_batches(Nuclei.from_polygons([sq, sq + 5, sq + 9]), form="point", batch=2)
    >>> [[e["center"] for e in part] for part in parts]
    [[[1.0, 1.0, 0], [6.0, 6.0, 0]], [[10.0, 10.0, 0]]]
    """
    form = _check_form(nuclei, form, class_names)

    def gen() -> Iterator[list[dict[str, Any]]]:
        for a, part in nuclei.chunks(batch):
            yield _elements(part, form, class_names, class_colors, decimals, first_id=a + 1)

    return gen()


def write_annotation(path: str, doc: dict[str, Any]) -> None:
    """Write an annotation document as compact JSON, atomically."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(compact_json(doc))
