"""Labelled training fields from a slide and its DSA annotation.

The loop a pathologist closes in HistomicsUI: run NucleusDetection on a
region, correct its outlines (delete, redraw, add the missed nuclei), draw a
rectangle around the part that is now right, and download the annotation
(or fetch it with girder-client: ``GET annotation/{id}``). This module cuts
each rectangle out of the slide at its base resolution and draws the
nuclei inside it as an instance label mask, in the ``folder`` dataset's
layout, which ``nucleus-bench eval --dataset folder`` scores and a training
config with ``train.init_from`` fine-tunes on::

    <out>/images/<slide>_<x>_<y>_<w>x<h>.png    RGB field (base pixels)
    <out>/masks/<slide>_<x>_<y>_<w>x<h>.png     uint16, 0 = background, 1..N nuclei
    <out>/mpp.txt                               microns per pixel of every field
    <out>/fields.json                           where each field came from

Nuclei are the closed ``polyline``, ``circle`` and ``ellipse`` elements; a
pixel belongs to a nucleus when its centre lies inside the outline (pixel
``i`` spans ``[i, i + 1]``, as NucleusDetection's outlines are drawn), so
an annotation written by the CLI gives back the label map it was traced
from. Where outlines overlap, the later element wins. Nuclei cut by the
field's edge keep their part inside it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: the largest field side in base pixels (a 40x field of 8192 px is 2 mm)
MAX_FIELD_SIDE = 8192
#: relative difference of resolutions one folder accepts (scanners round)
MPP_TOLERANCE = 0.02
NUCLEUS_TYPES = ("polyline", "circle", "ellipse")


class FieldError(ValueError):
    """Bad input (annotation, region or folder): one line for the user."""


@dataclass
class Field:
    """A rectangle of the slide, in base pixels, and the nuclei drawn in it."""

    x: int
    y: int
    w: int
    h: int
    source: str
    elements: list[dict[str, Any]] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.x}_{self.y}_{self.w}x{self.h}"


def annotation_elements(paths: Sequence[str | Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """The elements of the annotation documents in ``paths`` and their sha256s.

    A file may hold one document (``{"name", "elements"}``, as the CLIs
    write it), Girder's record of one (``{"_id", "annotation": {...}}``,
    as ``GET annotation/{id}`` returns it) or a list of either.
    """
    elements: list[dict[str, Any]] = []
    digests: list[str] = []
    for path in paths:
        p = Path(path)
        try:
            raw = p.read_bytes()
            data = json.loads(raw)
        except FileNotFoundError:
            raise FieldError(f"annotation file not found: {p}") from None
        except (OSError, ValueError) as exc:
            raise FieldError(f"{p.name}: not a JSON annotation ({exc})") from None
        digests.append(hashlib.sha256(raw).hexdigest())
        docs = data if isinstance(data, list) else [data]
        for doc in docs:
            if isinstance(doc, dict) and isinstance(doc.get("annotation"), dict):
                doc = doc["annotation"]
            if not isinstance(doc, dict) or not isinstance(doc.get("elements"), list):
                raise FieldError(f"{p.name}: not a DSA annotation document (no 'elements' list)")
            elements += [e for e in doc["elements"] if isinstance(e, dict)]
    return elements, digests


def _is_nucleus(el: dict[str, Any]) -> bool:
    kind = el.get("type")
    if kind == "polyline":
        return bool(el.get("closed")) and len(el.get("points") or []) >= 3
    return kind in ("circle", "ellipse")


def _rectangle(el: dict[str, Any]) -> tuple[int, int, int, int]:
    if abs(float(el.get("rotation") or 0.0)) > 1e-6:
        raise FieldError(
            "a field rectangle is rotated: draw fields as upright rectangles, or pass --region"
        )
    cx, cy = float(el["center"][0]), float(el["center"][1])
    w, h = float(el["width"]), float(el["height"])
    x0, y0 = int(round(cx - w / 2)), int(round(cy - h / 2))
    return x0, y0, int(round(cx + w / 2)) - x0, int(round(cy + h / 2)) - y0


def parse_region(text: str) -> tuple[int, int, int, int]:
    """``"x,y,w,h"`` in base pixels.

    >>> parse_region("100,200,512,256")
    (100, 200, 512, 256)
    """
    try:
        x, y, w, h = (int(round(float(v))) for v in text.split(","))
    except (ValueError, OverflowError):  # (OverflowError: inf)
        raise FieldError(f"--region {text!r}: give x,y,width,height in base pixels") from None
    return x, y, w, h


def _bounds(el: dict[str, Any]) -> tuple[float, float, float, float]:
    if el["type"] == "polyline":
        pts = np.asarray(el["points"], float)[:, :2]
        return (*pts.min(axis=0), *pts.max(axis=0))  # type: ignore[return-value]
    cx, cy = float(el["center"][0]), float(el["center"][1])
    if el["type"] == "circle":
        r = float(el["radius"])
    else:
        r = max(float(el["width"]), float(el["height"])) / 2
    return cx - r, cy - r, cx + r, cy + r


def find_fields(
    elements: list[dict[str, Any]],
    regions: Iterable[tuple[int, int, int, int]] = (),
    *,
    field_group: str | None = None,
    width: int,
    height: int,
) -> list[Field]:
    """The fields (``regions``, else the annotation's rectangles, only those
    of ``field_group`` if given) with the nucleus elements that reach into
    each, checked against the slide's ``width`` x ``height``."""
    boxes = list(dict.fromkeys((*r, "--region") for r in regions))  # (the same one twice: once)
    if not boxes:
        for el in elements:
            if el.get("type") != "rectangle":
                continue
            if field_group is not None and el.get("group") != field_group:
                continue
            boxes.append((*_rectangle(el), "rectangle"))
    if not boxes:
        which = f" of group {field_group!r}" if field_group is not None else ""
        raise FieldError(
            f"no field: the annotation has no rectangle{which}; draw one around the nuclei "
            "you have checked, or pass --region x,y,w,h"
        )
    nuclei = [el for el in elements if _is_nucleus(el)]
    if not nuclei:
        raise FieldError(
            "the annotation has no nucleus outlines (closed polylines, circles or ellipses)"
        )
    bounds = np.array([_bounds(el) for el in nuclei], float)
    fields: list[Field] = []
    for x, y, w, h, src in boxes:
        if w < 1 or h < 1:
            raise FieldError(f"field {x},{y},{w},{h} has no pixels")
        if max(w, h) > MAX_FIELD_SIDE:
            raise FieldError(
                f"field {x},{y},{w},{h} is larger than {MAX_FIELD_SIDE} px a side: "
                "draw smaller fields"
            )
        if x < 0 or y < 0 or x + w > width or y + h > height:
            raise FieldError(f"field {x},{y},{w},{h} reaches outside the {width}x{height} slide")
        hit = (
            (bounds[:, 2] > x)
            & (bounds[:, 0] < x + w)
            & (bounds[:, 3] > y)
            & (bounds[:, 1] < y + h)
        )
        fields.append(Field(x, y, w, h, src, [nuclei[i] for i in np.flatnonzero(hit)]))
    return fields


#: a nucleus drawn with at least this share of its pixels over earlier ones is
#: drawn over another (a duplicate?), not merely touching a neighbour
DRAWN_OVER = 0.25


def rasterise(fld: Field) -> tuple[np.ndarray, int, int]:
    """The field's ``(h, w)`` uint16 label map (elements numbered 1..N in
    order, those with no pixel inside left out and the rest renumbered), the
    number of pixels a later outline took from an earlier one, and how many
    outlines took at least :data:`DRAWN_OVER` of their pixels that way.

    Neighbours whose simplified outlines touch (the CLI's own, for one) share
    a few edge pixels; an outline drawn over another shares much of itself.
    """
    from skimage.draw import ellipse, polygon

    labels = np.zeros((fld.h, fld.w), np.int32)
    overlap = drawn_over = 0
    n = 0
    for el in fld.elements:
        # pixel centres at (i + 0.5): shift the outline by half a pixel
        if el["type"] == "polyline":
            pts = np.asarray(el["points"], float)[:, :2]
            rr, cc = polygon(pts[:, 1] - fld.y - 0.5, pts[:, 0] - fld.x - 0.5, shape=labels.shape)
        else:
            cx = float(el["center"][0]) - fld.x - 0.5
            cy = float(el["center"][1]) - fld.y - 0.5
            if el["type"] == "circle":
                ry = rx = float(el["radius"])
                rot = 0.0
            else:
                rx, ry = float(el["width"]) / 2, float(el["height"]) / 2
                rot = float(el.get("rotation") or 0.0)
            rr, cc = ellipse(cy, cx, ry, rx, shape=labels.shape, rotation=-rot)
        if len(rr) == 0:
            continue
        n += 1
        taken = int(np.count_nonzero(labels[rr, cc]))
        overlap += taken
        drawn_over += taken >= DRAWN_OVER * len(rr)
        labels[rr, cc] = n
    # an element wholly covered by later ones leaves a gap in the numbering
    present = np.unique(labels[labels > 0])
    if len(present) != n:
        lut = np.zeros(n + 1, np.int32)
        lut[present] = np.arange(1, len(present) + 1)
        labels = lut[labels]
    if labels.max(initial=0) > np.iinfo(np.uint16).max:
        raise FieldError(f"field {fld.id} holds more than 65535 nuclei: draw smaller fields")
    return labels.astype(np.uint16), overlap, drawn_over


def _check_mpp(out: Path, mpp: float) -> None:
    path = out / "mpp.txt"
    if not path.exists():
        return
    from .datasets.folder import read_mpp_file

    try:
        have = read_mpp_file(path)
    except ValueError as exc:
        raise FieldError(f"{path}: {exc}") from None
    if not math.isclose(have, mpp, rel_tol=MPP_TOLERANCE):
        raise FieldError(
            f"{path} says {have:g} um/px and this slide is {mpp:g}: one folder holds "
            "one resolution, use another --out"
        )


class LocalSlide:
    """A slide file read with large_image (:func:`nucleus_models.wsi.slide.open_slide`)."""

    def __init__(self, path: str | Path, input_mpp: float | None = None):
        from nucleus_models.errors import SlideError
        from nucleus_models.wsi.slide import open_slide

        try:
            self._slide = open_slide(path, input_mpp=input_mpp)
            self.mpp = self._slide.require_mpp()
        except SlideError as exc:
            raise FieldError(str(exc)) from None
        self.width, self.height = self._slide.width, self._slide.height
        self.name = Path(path).stem
        self.where = str(path)

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        from nucleus_models.errors import SlideError

        try:
            return self._slide.read_region(x, y, w, h)[..., :3]
        except SlideError as exc:
            raise FieldError(str(exc)) from None


class GirderSlide:
    """A large image of a Girder item, read through large_image's tiles API
    (``item/{id}/tiles`` for size and resolution, ``tiles/region`` as PNG
    for the base pixels: nothing but the fields is downloaded)."""

    def __init__(self, client: Any, item_id: str, input_mpp: float | None = None):
        self._client = client
        self.item_id = item_id
        item = client.getItem(item_id)
        meta = client.get(f"item/{item_id}/tiles")
        self.width, self.height = int(meta["sizeX"]), int(meta["sizeY"])
        mm = meta.get("mm_x")
        if input_mpp:
            self.mpp = float(input_mpp)
        elif mm:
            self.mpp = float(mm) * 1000.0
        else:
            raise FieldError(
                f"{item['name']}: resolution unknown (no mm_x in its tile metadata); "
                "pass --input_mpp (microns per base pixel)"
            )
        self.name = Path(item["name"]).stem
        self.where = f"{client.api_url}/item/{item_id} ({item['name']})"

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        import io

        from PIL import Image

        resp = self._client.sendRestRequest(
            "GET",
            f"item/{self.item_id}/tiles/region",
            parameters={
                "left": x,
                "top": y,
                "right": x + w,
                "bottom": y + h,
                "units": "base_pixels",
                "encoding": "PNG",
            },
            jsonResp=False,
        )
        with Image.open(io.BytesIO(resp.content)) as im:
            arr = np.asarray(im.convert("RGB"))
        if arr.shape[:2] != (h, w):
            raise FieldError(
                f"Girder returned a {arr.shape[1]}x{arr.shape[0]} region for {w}x{h} at {x},{y}"
            )
        return arr


def girder_annotations(
    client: Any, annotation_ids: Sequence[str]
) -> tuple[list[dict[str, Any]], list[str], str]:
    """Elements, sha256s and the item of DSA annotations fetched by id
    (all must be on one item)."""
    elements: list[dict[str, Any]] = []
    digests: list[str] = []
    items = set()
    for aid in annotation_ids:
        record = client.get(f"annotation/{aid}")
        items.add(str(record["itemId"]))
        doc = record.get("annotation") or {}
        elements += [e for e in doc.get("elements", []) if isinstance(e, dict)]
        digests.append(hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest())
    if len(items) != 1:
        raise FieldError("the annotations are on different items: give one slide's at a time")
    return elements, digests, items.pop()


def _input_mpp(input_mpp: float | None) -> float | None:
    """``--input_mpp``: None or a resolution a microscope has (a one-line error else)."""
    from nucleus_models.detection import mpp_problem

    if input_mpp is None:
        return None
    if why := mpp_problem(input_mpp):  # (NaN and inf too)
        raise FieldError(f"--input_mpp {input_mpp}: {why}")
    return float(input_mpp)


def export_fields(
    slide_path: str | Path,
    annotation_paths: Sequence[str | Path],
    out: str | Path,
    *,
    regions: Sequence[tuple[int, int, int, int]] = (),
    field_group: str | None = None,
    input_mpp: float | None = None,
) -> list[dict[str, Any]]:
    """Write each field of a slide file and its annotation files into
    ``out`` (the ``folder`` dataset's layout); return one record per field.
    See :func:`write_fields`."""
    input_mpp = _input_mpp(input_mpp)
    elements, digests = annotation_elements(annotation_paths)
    slide = LocalSlide(slide_path, input_mpp)
    return write_fields(slide, elements, digests, out, regions=regions, field_group=field_group)


def export_girder_fields(
    client: Any,
    annotation_ids: Sequence[str],
    out: str | Path,
    *,
    regions: Sequence[tuple[int, int, int, int]] = (),
    field_group: str | None = None,
    input_mpp: float | None = None,
) -> list[dict[str, Any]]:
    """:func:`export_fields` for annotations and their slide on a DSA server."""
    input_mpp = _input_mpp(input_mpp)
    elements, digests, item_id = girder_annotations(client, annotation_ids)
    slide = GirderSlide(client, item_id, input_mpp)
    return write_fields(slide, elements, digests, out, regions=regions, field_group=field_group)


def write_fields(
    slide: LocalSlide | GirderSlide,
    elements: list[dict[str, Any]],
    digests: list[str],
    out: str | Path,
    *,
    regions: Sequence[tuple[int, int, int, int]] = (),
    field_group: str | None = None,
) -> list[dict[str, Any]]:
    """Write each field of ``slide`` and its nuclei into ``out``.

    Everything is checked, and every field read and drawn, before the first
    file is written; each file is written whole (temporary file, then
    renamed). Fields already in ``out`` (same slide and rectangle) are
    replaced, others kept, so several slides can fill one folder.
    """
    from PIL import Image

    import nucleus_models
    from nucleus_models.io.atomic import atomic_write

    out = Path(out)
    for folder in (out, out / "images", out / "masks"):
        if folder.exists() and not folder.is_dir():
            raise FieldError(f"--out: {folder} is a file, not a folder")
    mpp = slide.mpp
    _check_mpp(out, mpp)
    index_path = out / "fields.json"
    index: dict[str, Any] = {}
    if index_path.exists():  # read first: a damaged index is not replaced silently
        try:
            index = json.loads(index_path.read_text())
        except ValueError as exc:
            raise FieldError(
                f"{index_path}: not readable ({exc}); it records where every field of the "
                "folder came from: mend or remove it"
            ) from None
    entries = index.get("fields", {}) if isinstance(index.get("fields"), dict) else {}
    fields = find_fields(
        elements, regions, field_group=field_group, width=slide.width, height=slide.height
    )
    for sid in (f"{slide.name}_{fld.id}" for fld in fields):
        other = (entries.get(sid) or {}).get("slide")
        if other is not None and str(other) != str(slide.where):
            raise FieldError(
                f"{out} already holds field {sid} from another slide ({other}) with the same "
                "name: use another --out, or rename one of the slides"
            )
    for i, a in enumerate(fields):
        for b in fields[i + 1 :]:
            ox = min(a.x + a.w, b.x + b.w) - max(a.x, b.x)
            oy = min(a.y + a.h, b.y + b.h) - max(a.y, b.y)
            if ox > 0 and oy > 0:
                logger.warning(
                    "fields %s and %s overlap by %d x %d px: a cross-validation that holds "
                    "out one and trains on the other scores pixels it trained on",
                    a.id,
                    b.id,
                    ox,
                    oy,
                )
    made = []
    for fld in fields:
        image = slide.read(fld.x, fld.y, fld.w, fld.h)
        made.append((fld, image, *rasterise(fld)))
    records = []
    for fld, image, labels, overlap, drawn_over in made:
        sid = f"{slide.name}_{fld.id}"
        for sub, arr in (("images", image), ("masks", labels)):
            with atomic_write(out / sub / f"{sid}.png", "wb") as f:
                Image.fromarray(arr).save(f, format="PNG")
        n = int(labels.max(initial=0))
        if drawn_over:
            logger.warning(
                "%s: %d nuclei drawn over another for %d%% or more of their pixels (a "
                "duplicate?); the later-drawn one has them (%d px overlap in all)",
                sid,
                drawn_over,
                round(100 * DRAWN_OVER),
                overlap,
            )
        elif overlap:
            logger.info(
                "%s: neighbouring outlines share %d px; the later-drawn nucleus has them",
                sid,
                overlap,
            )
        if n == 0:
            logger.warning("%s: no nucleus in this field; it trains as background", sid)
        records.append(
            {
                "id": sid,
                "slide": slide.where,
                "region": [fld.x, fld.y, fld.w, fld.h],
                "from": fld.source,
                "nuclei": n,
                "overlap_px": overlap,
                "drawn_over": drawn_over,
            }
        )
    if not (out / "mpp.txt").exists():  # the folder's first slide sets its resolution
        with atomic_write(out / "mpp.txt", "w", encoding="utf-8") as f:
            f.write(f"{mpp:.6g}\n")
    for rec in records:
        entries[rec["id"]] = {
            **{k: v for k, v in rec.items() if k != "id"},
            "annotation_sha256": digests,
            "mpp": mpp,
            "version": nucleus_models.__version__,
        }
    with atomic_write(index_path, "w", encoding="utf-8") as f:
        json.dump({"fields": entries}, f, indent=1)
    return records
