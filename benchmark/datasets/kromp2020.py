"""Kromp et al. 2020 (BioStudies S-BSST265): annotated fluorescence nuclear images.

The archive holds ``rawimages/`` and ``groundtruth/`` (label-mask TIFFs with the
same file names) plus ``image_description.csv`` (semicolon separated) with, per
image: ``Image_Name``, ``Diagnosis``, ``Preparation``, ``Train-/Testset split``,
``Testset class`` (GNB-I ... TS: the challenge level), ``Magnification``,
``Modality``, ``Software``, mean background / foreground signal, signal-to-noise
ratio and ``S/N Class``. Column names are matched loosely (case, spaces and
punctuation ignored) so small variations of the header still work.
"""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

import numpy as np
from skimage.segmentation import relabel_sequential

from .base import Dataset, Sample, first_existing, natural_key, read_image, register_dataset

logger = logging.getLogger(__name__)

#: normalised CSV header -> groups key
_COLUMNS: dict[str, str] = {
    "diagnosis": "diagnosis",
    "preparation": "preparation",
    "samplepreparation": "preparation",
    "traintestsetsplit": "split",
    "traintestsplit": "split",
    "split": "split",
    "testsetclass": "challenge_level",
    "magnification": "magnification",
    "modality": "imaging_modality",
    "software": "software",
    "snclass": "snr_class",
    "signalnoiseclass": "snr_class",
    "snrclass": "snr_class",
    "signaltonoiseclass": "snr_class",
    "signalnoiseratio": "snr",
    "snratio": "snr",
    "snr": "snr",
}
_NAME_COLUMNS = ("imagename", "image", "filename", "name", "file")
_EXTS = {".tif", ".tiff", ".png"}


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _norm_split(value: str) -> str:
    v = value.strip().lower()
    if v.startswith("train"):
        return "train"
    if v.startswith("test"):
        return "test"
    if v.startswith("val"):
        return "validation"
    return v


def read_image_description(path: Path) -> dict[str, dict[str, str]]:
    """Read ``image_description.csv`` into ``{image stem: groups}``.

    Parameters
    ----------
    path : Path
        CSV file; the delimiter (``;``, ``,`` or tab) is detected.

    Returns
    -------
    dict
        Per image stem, the recognised columns under their groups keys
        (``preparation``, ``diagnosis``, ``split``, ``challenge_level``, ...).
    """
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    first = text.splitlines()[0] if text else ""
    delim = max(";,\t", key=first.count)
    rows = list(csv.reader(text.splitlines(), delimiter=delim))
    if not rows:
        return {}
    header = [_norm(h) for h in rows[0]]
    name_col = next((header.index(c) for c in _NAME_COLUMNS if c in header), 0)
    out: dict[str, dict[str, str]] = {}
    for row in rows[1:]:
        if len(row) <= name_col or not row[name_col].strip():
            continue
        stem = Path(row[name_col].strip()).stem
        groups: dict[str, str] = {}
        for col, value in zip(header, row, strict=False):
            key = _COLUMNS.get(col)
            if key and value.strip() and key not in groups:
                groups[key] = _norm_split(value) if key == "split" else value.strip()
        if "challenge_level" not in groups and "snr_class" in groups:
            groups["challenge_level"] = groups["snr_class"]
        out[stem] = groups
    return out


def to_label_map(mask: np.ndarray) -> np.ndarray:
    """Turn a label-mask image (grey ids, or RGB colour-coded ids) into int32 labels ``1..N``."""
    if mask.ndim == 3:
        if mask.shape[2] == 4:
            mask = mask[..., :3]
        if all(np.array_equal(mask[..., 0], mask[..., c]) for c in range(1, mask.shape[2])):
            mask = mask[..., 0]
        else:
            flat = mask.reshape(-1, mask.shape[2])
            colours, inverse = np.unique(flat, axis=0, return_inverse=True)
            bg = np.flatnonzero(~colours.any(axis=1))
            ids = inverse.reshape(mask.shape[:2]).astype(np.int64) + 1
            if len(bg):
                ids[ids == bg[0] + 1] = 0
            mask = ids
    return relabel_sequential(np.asarray(mask).astype(np.int64))[0].astype(np.int32)


@register_dataset
class Kromp2020(Dataset):
    """Kromp et al. 2020 fluorescence nuclei (tissue sections, cytospins, touch imprints, cell lines).

    Parameters
    ----------
    root : str or Path
        Folder holding ``rawimages/``, ``groundtruth/`` and ``image_description.csv``
        (a ``dataset/`` subfolder holding them is also accepted).
    """

    name = "kromp2020"
    description = "Kromp et al. 2020 (S-BSST265) annotated fluorescence nuclear images"
    layout = (
        "<root>/rawimages/<name>.tif, <root>/groundtruth/<name>.tif (label masks), "
        "<root>/image_description.csv (';'-separated: Image_Name, Diagnosis, Preparation, "
        "Train-/Testset split, Testset class, Magnification, Modality, ..., S/N Class)"
    )
    kind = "instances"

    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
        base = first_existing(self.root, ["", "dataset"], lambda p: (p / "rawimages").is_dir())
        if base is None:
            raise self.error(self.root / "rawimages", "missing rawimages/ folder")
        self.base = base
        gt_dir = base / "groundtruth"
        if not gt_dir.is_dir():
            raise self.error(gt_dir, "missing groundtruth/ folder of label-mask TIFFs")
        raw = {p.stem: p for p in (base / "rawimages").iterdir() if p.suffix.lower() in _EXTS}
        gt = {p.stem: p for p in gt_dir.iterdir() if p.suffix.lower() in _EXTS}
        self._raw = {k: raw[k] for k in raw.keys() & gt.keys()}
        self._gt = {k: gt[k] for k in self._raw}
        if not self._raw:
            raise self.error(base, "no rawimages/* with a matching groundtruth/* file")
        csv_path = base / "image_description.csv"
        if not csv_path.is_file():
            others = sorted(base.glob("*.csv"))
            csv_path = others[0] if others else csv_path
        self.metadata_path = csv_path if csv_path.is_file() else None
        self._meta = read_image_description(csv_path) if self.metadata_path else {}
        if self.metadata_path is None:
            logger.warning("kromp2020: no image_description.csv in %s; groups will be empty", base)
        else:
            missing = sorted(self._raw.keys() - self._meta.keys())
            if missing:
                logger.warning(
                    "kromp2020: %d images lack metadata rows, e.g. %s", len(missing), missing[0]
                )

    def splits(self) -> list[str]:
        """Return split values found in the metadata (usually ``train`` and ``test``)."""
        return sorted(
            {g["split"] for k, g in self._meta.items() if k in self._raw and "split" in g}
        )

    def ids(self, split: str | None = None) -> list[str]:
        """Return image stems, optionally of one metadata split."""
        key = self._check_split(split, {"training": "train", "testing": "test"})
        return sorted(
            (i for i in self._raw if key is None or self._meta.get(i, {}).get("split") == key),
            key=natural_key,
        )

    def files(self) -> list[Path]:
        """Return raw images, ground-truth masks and the metadata CSV."""
        out = [*self._raw.values(), *self._gt.values()]
        return out + ([self.metadata_path] if self.metadata_path else [])

    def load(self, sample_id: str) -> Sample:
        """Load the raw image (dtype kept) and its label mask."""
        if sample_id not in self._raw:
            raise self._unknown(sample_id)
        image = read_image(self._raw[sample_id])
        if image.ndim == 3 and image.shape[0] in (3, 4) and image.shape[2] not in (3, 4):
            image = np.moveaxis(image, 0, -1)  # channel-first TIFF
        labels = to_label_map(read_image(self._gt[sample_id]))
        if labels.shape != image.shape[:2]:
            raise self.error(
                self._gt[sample_id], f"mask shape {labels.shape} != image {image.shape}"
            )
        return Sample(
            id=sample_id,
            image=image,
            labels=labels,
            groups=dict(self._meta.get(sample_id, {})),
            mpp=None,
            modality="fluorescence",
            extra={"image_path": str(self._raw[sample_id])},
        )
