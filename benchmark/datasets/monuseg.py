"""MoNuSeg (Kumar et al. 2017/2020): H&E 40x TCGA tiles with Aperio ImageScope XML."""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from skimage.draw import polygon
from skimage.segmentation import relabel_sequential

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

#: Organ of each of the 30 images of Kumar et al. (2017) and the 14 of the
#: MoNuSeg 2018 test set, as in the challenge's own description of its data. Note: the six "liver"
#: images carry TCGA tissue-source-site codes (18, 21, 38, 49, 50) that TCGA
#: assigns to lung studies; we keep the challenge's label and also expose the
#: raw site code as ``groups["tcga_site"]`` so either grouping can be used.
MONUSEG_ORGANS: dict[str, str] = {
    **dict.fromkeys(
        [
            "TCGA-A7-A13E-01Z-00-DX1",
            "TCGA-A7-A13F-01Z-00-DX1",
            "TCGA-AR-A1AK-01Z-00-DX1",
            "TCGA-AR-A1AS-01Z-00-DX1",
            "TCGA-E2-A1B5-01Z-00-DX1",
            "TCGA-E2-A14V-01Z-00-DX1",
        ],
        "breast",
    ),
    **dict.fromkeys(
        [
            "TCGA-B0-5711-01Z-00-DX1",
            "TCGA-HE-7128-01Z-00-DX1",
            "TCGA-HE-7129-01Z-00-DX1",
            "TCGA-HE-7130-01Z-00-DX1",
            "TCGA-B0-5710-01Z-00-DX1",
            "TCGA-B0-5698-01Z-00-DX1",
        ],
        "kidney",
    ),
    **dict.fromkeys(
        [
            "TCGA-18-5592-01Z-00-DX1",
            "TCGA-38-6178-01Z-00-DX1",
            "TCGA-49-4488-01Z-00-DX1",
            "TCGA-50-5931-01Z-00-DX1",
            "TCGA-21-5784-01Z-00-DX1",
            "TCGA-21-5786-01Z-00-DX1",
        ],
        "liver",
    ),
    **dict.fromkeys(
        [
            "TCGA-G9-6336-01Z-00-DX1",
            "TCGA-G9-6348-01Z-00-DX1",
            "TCGA-G9-6356-01Z-00-DX1",
            "TCGA-G9-6363-01Z-00-DX1",
            "TCGA-CH-5767-01Z-00-DX1",
            "TCGA-G9-6362-01Z-00-DX1",
        ],
        "prostate",
    ),
    "TCGA-DK-A2I6-01A-01-TS1": "bladder",
    "TCGA-G2-A2EK-01A-02-TSB": "bladder",
    "TCGA-AY-A8YK-01A-01-TS1": "colon",
    "TCGA-NH-A8F7-01A-01-TS1": "colon",
    "TCGA-KB-A93J-01A-01-TS1": "stomach",
    "TCGA-RD-A8N9-01A-01-TS1": "stomach",
    # the 14 images of the challenge's test set (MoNuSegTestData), as its own
    # description lists them: brain and lung are organs the training set lacks
    **dict.fromkeys(["TCGA-CU-A0YN-01A-02-BSB", "TCGA-ZF-A9R5-01A-01-TS1"], "bladder"),
    **dict.fromkeys(["TCGA-AC-A2FO-01A-01-TS1", "TCGA-AO-A0J2-01A-01-BSA"], "breast"),
    "TCGA-A6-6782-01A-01-BS1": "colon",
    **dict.fromkeys(
        ["TCGA-2Z-A9J9-01A-01-TS1", "TCGA-GL-6846-01A-01-BS1", "TCGA-IZ-8196-01A-01-BS1"],
        "kidney",
    ),
    **dict.fromkeys(["TCGA-EJ-A46H-01A-03-TSC", "TCGA-HC-7209-01A-01-TS1"], "prostate"),
    **dict.fromkeys(["TCGA-FG-A4MU-01B-01-TS1", "TCGA-HT-8564-01Z-00-DX1"], "brain"),
    **dict.fromkeys(["TCGA-44-2665-01B-06-BS6", "TCGA-69-7764-01A-01-TS1"], "lung"),
}

_TCGA_RE = re.compile(r"^TCGA-([A-Z0-9]{2})-([A-Z0-9]{4})", re.IGNORECASE)
_IMAGE_DIRS = ["images", "Tissue Images", "Tissue_Images", "tissue_images"]
_XML_DIRS = ["annotations", "Annotations"]
_IMAGE_EXTS = {".tif", ".tiff", ".png"}


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in _IMAGE_EXTS


def parse_imagescope_xml(path: Path) -> tuple[list[np.ndarray], float | None]:
    """Parse an Aperio ImageScope XML file.

    Parameters
    ----------
    path : Path
        XML file with one ``Region`` per nucleus.

    Returns
    -------
    polygons : list of numpy.ndarray
        One ``(K, 2)`` float array of ``x, y`` vertex coordinates per region, in file order.
    mpp : float or None
        The ``MicronsPerPixel`` attribute of the root element, if present and positive.
    """
    root = ET.parse(path).getroot()
    polys = []
    for region in root.iter("Region"):
        verts = [
            (float(v.get("X", "nan")), float(v.get("Y", "nan"))) for v in region.iter("Vertex")
        ]
        polys.append(np.asarray(verts, dtype=np.float64).reshape(-1, 2))
    mpp_text = root.get("MicronsPerPixel")
    try:
        mpp = float(mpp_text) if mpp_text else None
    except ValueError:
        mpp = None
    return polys, (mpp if mpp and mpp > 0 else None)


def rasterize_polygons(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Draw polygons into an instance label map (later polygons overwrite earlier ones).

    Parameters
    ----------
    polygons : list of numpy.ndarray
        ``(K, 2)`` arrays of ``x, y`` pixel coordinates.
    shape : tuple of int
        ``(H, W)`` of the label map; polygons are clipped to it.

    Returns
    -------
    numpy.ndarray
        ``HxW`` int32 labels, relabelled to ``1..N`` in polygon order; polygons
        that cover no pixel (degenerate or fully overwritten) get no label.
    """
    labels = np.zeros(shape, dtype=np.int32)
    for i, poly in enumerate(polygons, start=1):
        poly = poly[np.all(np.isfinite(poly), axis=1)]
        if len(poly) < 3:
            continue
        rr, cc = polygon(poly[:, 1], poly[:, 0], shape=shape)
        labels[rr, cc] = i
    return relabel_sequential(labels)[0].astype(np.int32)


@register_dataset
class MoNuSeg(Dataset):
    """MoNuSeg H&E 40x tiles; instance labels rasterised from ImageScope XML polygons.

    Parameters
    ----------
    root : str or Path
        Folder holding ``images/`` and ``annotations/`` (or a parent holding ``train/``),
        or a folder of tiles beside their XMLs (the challenge's ``MoNuSegTestData/``).
    include_unlabelled : bool, default False
        Also list images without an XML; they load with ``labels=None``.
    default_mpp : float, default 0.25
        Microns per pixel used when the XML has no ``MicronsPerPixel`` (the TIFFs carry none).
    """

    name = "monuseg"
    description = "MoNuSeg 2018 H&E 40x TCGA tiles (1000x1000) with per-nucleus polygons"
    layout = (
        "<root>/images/<TCGA id>.tif (RGB uint8) and <root>/annotations/<TCGA id>.xml "
        "(Aperio ImageScope XML, one Region of Vertices per nucleus); <root>/train/ is also "
        "accepted, and tiles beside their XMLs in one folder (the challenge's MoNuSegTestData/)"
    )
    kind = "instances"

    def __init__(
        self, root: str | Path, include_unlabelled: bool = False, default_mpp: float = 0.25
    ) -> None:
        super().__init__(root)
        base = first_existing(
            self.root, ["", "train"], lambda p: any((p / d).is_dir() for d in _IMAGE_DIRS)
        )
        if base is not None:
            image_dir = first_existing(base, _IMAGE_DIRS, Path.is_dir)
            if image_dir is None:  # pragma: no cover - guaranteed by the search above
                raise self.error(base, "missing images/ folder")
            xml_dir = first_existing(base, _XML_DIRS, Path.is_dir)
        elif any(_is_image(p) for p in self.root.iterdir()):
            # the challenge's test download (MoNuSegTestData/): tiles and XMLs side by side
            base = image_dir = self.root
            xml_dir = first_existing(self.root, [*_XML_DIRS, ""], Path.is_dir)
        else:
            raise self.error(
                self.root,
                "missing images/ folder (expected images/*.tif + annotations/*.xml, "
                "or *.tif beside *.xml as in MoNuSegTestData/)",
            )
        self.base = base
        self.image_dir = image_dir
        self.xml_dir = xml_dir
        self.include_unlabelled = include_unlabelled
        self.default_mpp = default_mpp
        self._images = {p.stem: p for p in self.image_dir.iterdir() if _is_image(p)}
        self._xmls = (
            {p.stem: p for p in self.xml_dir.glob("*.xml")} if self.xml_dir is not None else {}
        )
        if not self._images:
            raise self.error(self.image_dir, "no image files (*.tif)")
        if not self.include_unlabelled and not (self._images.keys() & self._xmls.keys()):
            where = self.xml_dir or base / "annotations"
            raise self.error(where, "no ImageScope XML matching any image stem")
        missing = sorted(self._xmls.keys() - self._images.keys())
        if missing:
            logger.info("monuseg: %d XML files without an image are ignored", len(missing))

    def ids(self, split: str | None = None) -> list[str]:
        """Return image stems that have an XML (and, optionally, those without)."""
        self._check_split(split)
        keys = (
            self._images.keys()
            if self.include_unlabelled
            else self._images.keys() & self._xmls.keys()
        )
        return sorted(keys, key=natural_key)

    def files(self) -> list[Path]:
        """Return the image and XML files of the listed samples."""
        out = [self._images[i] for i in self.ids()]
        out += [self._xmls[i] for i in self.ids() if i in self._xmls]
        return out

    @staticmethod
    def groups_for(sample_id: str) -> dict[str, str]:
        """Return organ (MoNuSeg table, else ``"unknown"``), TCGA site and patient for an id."""
        groups = {"organ": MONUSEG_ORGANS.get(sample_id, "unknown")}
        m = _TCGA_RE.match(sample_id)
        if m:
            groups["tcga_site"] = m.group(1).upper()
            groups["patient"] = f"TCGA-{m.group(1)}-{m.group(2)}".upper()
        return groups

    def load(self, sample_id: str) -> Sample:
        """Load the RGB tile and rasterise its XML polygons into an int32 label map."""
        if sample_id not in self.ids():
            raise self._unknown(sample_id)
        image = to_rgb_uint8(read_image(self._images[sample_id]))
        labels = None
        mpp: float | None = self.default_mpp
        extra: dict = {"image_path": str(self._images[sample_id])}
        xml = self._xmls.get(sample_id)
        if xml is not None:
            polys, xml_mpp = parse_imagescope_xml(xml)
            labels = rasterize_polygons(polys, image.shape[:2])
            mpp = xml_mpp or self.default_mpp
            extra.update(xml_path=str(xml), n_regions=len(polys))
        return Sample(
            id=sample_id,
            image=image,
            labels=labels,
            groups=self.groups_for(sample_id),
            mpp=mpp,
            modality="brightfield",
            extra=extra,
        )
