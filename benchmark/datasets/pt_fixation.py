"""Prostate fixation (PT) set of Valkonen et al.: H&E images with nucleus point markers.

48 images of 2444x2444 pixels (0.23 um/px) from 16 patients, each prepared three
ways: formalin-fixed paraffin-embedded, fresh frozen and PAXgene-fixed. Files are
named ``<Fixation>_<n>.tif`` with ``CellCounter_<Fixation>_<n>.xml`` (ImageJ Cell
Counter) holding the nucleus centres as markers of ``Marker_Type`` 8.

Patient assumption: ``<n>`` (1..16) is read as the patient index, since the
dataset's readme gives 48 images = 16 patients x 3 preparations and names files
only by preparation and number; ``groups["patient"]`` is ``"P01"`` ... ``"P16"``.
"""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from .base import (
    Dataset,
    Sample,
    first_existing,
    natural_key,
    read_image,
    register_dataset,
    to_rgb_uint8,
)

logger = logging.getLogger(__name__)

_XML_RE = re.compile(r"^CellCounter_(?P<fix>[A-Za-z]+)_(?P<num>\d+)$")
_IMAGE_EXTS = (".tif", ".tiff", ".png", ".jpg")
IMAGE_SIZE = 2444
MPP = 0.23


def parse_cellcounter_xml(path: Path, marker_type: int = 8) -> tuple[np.ndarray, str | None]:
    """Read the markers of one type from an ImageJ Cell Counter XML file.

    Parameters
    ----------
    path : Path
        ``CellCounter_*.xml`` file.
    marker_type : int, default 8
        ``Marker_Type/Type`` whose markers are returned.

    Returns
    -------
    points : numpy.ndarray
        ``(N, 2)`` float64 ``x, y`` pixel coordinates in file order.
    image_filename : str or None
        The ``Image_Properties/Image_Filename`` recorded in the file.
    """
    root = ET.parse(path).getroot()
    pts: list[tuple[float, float]] = []
    for mt in root.iter("Marker_Type"):
        t = (mt.findtext("Type") or "").strip()
        if t != str(marker_type):
            continue
        for m in mt.findall("Marker"):
            x, y = m.findtext("MarkerX"), m.findtext("MarkerY")
            if x is not None and y is not None:
                pts.append((float(x), float(y)))
    name = root.findtext("Image_Properties/Image_Filename")
    return np.asarray(pts, dtype=np.float64).reshape(-1, 2), (name.strip() if name else None)


@register_dataset
class PTFixation(Dataset):
    """Prostate fixation H&E set with nucleus point annotations (kind ``points``).

    Parameters
    ----------
    root : str or Path
        Folder holding ``annotations/`` (``CellCounter_<Fixation>_<n>.xml``) and
        optionally ``HE/`` with the images ``<Fixation>_<n>.tif``; ``root/data/`` and
        ``root/NucDetectData/`` are also searched.
    points_only : bool, default False
        Never read images: samples get a zero-size image. Without it, loading a
        sample whose image is missing raises :class:`DatasetError`.
    marker_type : int, default 8
        Cell Counter marker type holding the nuclei.
    deduplicate : bool, default True
        Drop exactly repeated markers (a few files repeat some markers).
    """

    name = "pt_fixation"
    description = "Prostate H&E (formalin / frozen / PAXgene), 48 images 2444x2444, nucleus points"
    layout = (
        "<root>/annotations/CellCounter_<Fixation>_<n>.xml (ImageJ Cell Counter, nuclei = "
        "Marker_Type 8) and optionally <root>/HE/<Fixation>_<n>.tif; <root>/data/ or "
        "<root>/NucDetectData/ may hold these folders"
    )
    kind = "points"

    def __init__(
        self,
        root: str | Path,
        points_only: bool = False,
        marker_type: int = 8,
        deduplicate: bool = True,
    ) -> None:
        super().__init__(root)
        base = first_existing(
            self.root, ["", "data", "NucDetectData"], lambda p: (p / "annotations").is_dir()
        )
        if base is None:
            raise self.error(
                self.root / "annotations", "missing annotations/ folder of CellCounter_*.xml"
            )
        self.base = base
        self.points_only = points_only
        self.marker_type = marker_type
        self.deduplicate = deduplicate
        self._xmls: dict[str, Path] = {}
        self._groups: dict[str, dict[str, str]] = {}
        for p in (base / "annotations").glob("*.xml"):
            m = _XML_RE.match(p.stem)
            if not m:
                continue
            sid = f"{m['fix']}_{m['num']}"
            self._xmls[sid] = p
            self._groups[sid] = {"fixation": m["fix"], "patient": f"P{int(m['num']):02d}"}
        if not self._xmls:
            raise self.error(base / "annotations", "no CellCounter_<Fixation>_<n>.xml files")
        self._image_dirs = [d for d in (base / "HE", base / "images", base) if d.is_dir()]

    def splits(self) -> list[str]:
        """Return the fixation names, usable as splits."""
        return sorted({g["fixation"].lower() for g in self._groups.values()})

    def ids(self, split: str | None = None) -> list[str]:
        """Return ``<Fixation>_<n>`` ids, optionally of one fixation (case-insensitive)."""
        key = self._check_split(split)
        return sorted(
            (i for i, g in self._groups.items() if key is None or g["fixation"].lower() == key),
            key=natural_key,
        )

    def image_path(self, sample_id: str) -> Path | None:
        """Return the image file of a sample, or None when it is not present."""
        for d in self._image_dirs:
            for ext in _IMAGE_EXTS:
                p = d / f"{sample_id}{ext}"
                if p.is_file():
                    return p
        return None

    def files(self) -> list[Path]:
        """Return the XML files and the images present."""
        imgs = [self.image_path(i) for i in self._xmls]
        return [*self._xmls.values(), *(p for p in imgs if p is not None)]

    def load(self, sample_id: str) -> Sample:
        """Load the points (and the image unless ``points_only``)."""
        xml = self._xmls.get(sample_id)
        if xml is None:
            raise self._unknown(sample_id)
        points, image_filename = parse_cellcounter_xml(xml, self.marker_type)
        n_raw = len(points)
        if self.deduplicate and n_raw:
            _, first = np.unique(points, axis=0, return_index=True)
            points = points[np.sort(first)]
        if len(points) < n_raw:
            logger.debug(
                "pt_fixation: %s: dropped %d duplicate markers", sample_id, n_raw - len(points)
            )
        if self.points_only:
            image = np.zeros((0, 0, 3), dtype=np.uint8)
        else:
            path = self.image_path(sample_id)
            if path is None:
                where = ", ".join(str(d) for d in self._image_dirs)  # base itself at least
                raise self.error(
                    self.base / "HE",
                    f"image {sample_id}.tif not found in {where}; the H&E images are "
                    "distributed separately from the point files: put them in HE/ beside "
                    "annotations/ (from Python, points_only=True reads the points alone)",
                )
            image = to_rgb_uint8(read_image(path))
        return Sample(
            id=sample_id,
            image=image,
            labels=None,
            points=points,
            point_classes=None,
            groups=dict(self._groups[sample_id]),
            mpp=MPP,
            modality="brightfield",
            extra={
                "image_size": tuple(image.shape[:2]) if image.size else (IMAGE_SIZE, IMAGE_SIZE),
                "xml_path": str(xml),
                "image_filename": image_filename,
                "n_duplicate_markers": n_raw - len(points),
            },
        )
