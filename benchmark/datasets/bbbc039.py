"""BBBC039 (Caicedo et al. 2019): U2OS nuclei, Hoechst, 16-bit TIFF with colour-coded masks.

Mask encoding (assumption, documented here because the loader depends on it):
the Broad distributes the ground truth as RGB(A) PNGs in which "if two nuclei
touch, they are labeled with a different color". Only the first (red) channel
carries the object code: non-touching nuclei have value 1 and mutually
touching nuclei get 2, 3, ...; the other channels are not needed. Instances are
therefore the connected components of pixels sharing the same red value, which
is what the Broad's own preparation code does (``skimage.morphology.label`` on
channel 0, default full connectivity). A 2-D PNG is treated as that channel.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
from skimage.measure import label as cc_label

from .base import Dataset, Sample, natural_key, read_image, register_dataset

logger = logging.getLogger(__name__)

_SPLIT_FILES = {"training": "training.txt", "validation": "validation.txt", "test": "test.txt"}
_SPLIT_ALIASES = {
    "train": "training",
    "val": "validation",
    "valid": "validation",
    "testing": "test",
}
_WELL_RE = re.compile(r"_([A-P]\d{2})_s(\d+)_", re.IGNORECASE)


def decode_bbbc039_mask(mask: np.ndarray) -> np.ndarray:
    """Decode a BBBC039 colour-coded mask into an instance label map.

    Parameters
    ----------
    mask : numpy.ndarray
        ``HxW`` or ``HxWxC`` mask; only channel 0 is used.

    Returns
    -------
    numpy.ndarray
        ``HxW`` int32 labels ``1..N``: connected components (8-connectivity) of
        pixels with the same non-zero channel-0 value.
    """
    code = mask[..., 0] if mask.ndim == 3 else mask
    return cc_label(code, background=0, connectivity=2).astype(np.int32)


@register_dataset
class BBBC039(Dataset):
    """BBBC039 fluorescence nuclei with the Broad's training/validation/test split lists.

    Parameters
    ----------
    root : str or Path
        Folder holding ``images/``, ``masks/`` and (optionally) ``metadata/``.
    """

    name = "bbbc039"
    description = "BBBC039 U2OS nuclei (Hoechst), 200 16-bit fields with instance masks"
    layout = (
        "<root>/images/<name>.tif (16-bit grey), <root>/masks/<name>.png (RGB; channel 0 codes "
        "objects: 1 = isolated, 2,3,... = touching), <root>/metadata/{training,validation,test}.txt "
        "(one mask file name per line)"
    )
    kind = "instances"

    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
        img_dir, mask_dir = self.root / "images", self.root / "masks"
        if not img_dir.is_dir():
            raise self.error(img_dir, "missing images/ folder of 16-bit TIFFs")
        if not mask_dir.is_dir():
            raise self.error(mask_dir, "missing masks/ folder of PNG label masks")
        images = {p.stem: p for p in img_dir.iterdir() if p.suffix.lower() in {".tif", ".tiff"}}
        masks = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() == ".png"}
        self._images = {k: images[k] for k in images.keys() & masks.keys()}
        self._masks = {k: masks[k] for k in self._images}
        if not self._images:
            raise self.error(self.root, "no images/*.tif with a matching masks/*.png")
        self._split_of: dict[str, str] = {}
        self._splits: list[str] = []
        meta = self.root / "metadata"
        for split, fname in _SPLIT_FILES.items():
            f = meta / fname
            if not f.is_file():
                continue
            self._splits.append(split)
            for line in f.read_text().splitlines():
                stem = Path(line.strip()).stem
                if stem in self._images:
                    self._split_of[stem] = split
                elif stem:
                    logger.debug("bbbc039: %s lists %s which has no image/mask", fname, stem)
        if not self._splits:
            logger.info("bbbc039: no metadata/*.txt split lists found under %s", meta)

    def splits(self) -> list[str]:
        """Return the split lists present (subset of training, validation, test)."""
        return sorted(self._splits)

    def ids(self, split: str | None = None) -> list[str]:
        """Return image stems, optionally of one split (``train``/``val`` aliases accepted)."""
        key = self._check_split(split, _SPLIT_ALIASES)
        return sorted(
            (i for i in self._images if key is None or self._split_of.get(i) == key),
            key=natural_key,
        )

    def files(self) -> list[Path]:
        """Return images, masks and split lists."""
        meta = [self.root / "metadata" / f for f in _SPLIT_FILES.values()]
        return [*self._images.values(), *self._masks.values(), *(m for m in meta if m.is_file())]

    def load(self, sample_id: str) -> Sample:
        """Load the 16-bit image unchanged and decode its colour-coded mask."""
        if sample_id not in self._images:
            raise self._unknown(sample_id)
        image = read_image(self._images[sample_id])
        labels = decode_bbbc039_mask(read_image(self._masks[sample_id]))
        if labels.shape != image.shape[:2]:
            raise self.error(
                self._masks[sample_id],
                f"mask shape {labels.shape} differs from image {image.shape}",
            )
        groups = {}
        if sample_id in self._split_of:
            groups["split"] = self._split_of[sample_id]
        m = _WELL_RE.search(sample_id)
        if m:
            groups["well"] = m.group(1).upper()
        return Sample(
            id=sample_id,
            image=image,
            labels=labels,
            groups=groups,
            mpp=None,
            modality="fluorescence",
            extra={"image_path": str(self._images[sample_id])},
        )
