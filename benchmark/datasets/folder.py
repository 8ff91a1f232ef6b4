"""Your own labelled images: a folder of images with instance label masks.

The layout most annotation tools can export (QuPath's labelled-image export,
Cellpose and StarDist training folders, a DSA region saved with its nuclei
drawn as labels): ``images/<id>.<ext>`` beside ``masks/<id>.<ext>`` (or
``labels/``), where the mask is one integer per nucleus and 0 the background.
It is what ``nucleus-bench eval --dataset folder`` scores and what a training
config (``dataset = "folder"``) fine-tunes a shipped model on.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from .base import Dataset, Sample, natural_key, read_image, register_dataset

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".tif", ".tiff", ".jpg", ".jpeg"}
# masks must be lossless
MASK_SUFFIXES = {".png", ".tif", ".tiff"}
MASK_FOLDERS = ("masks", "labels")


def instance_labels(mask: np.ndarray) -> tuple[np.ndarray, bool]:
    """A mask file's pixels as ``int32`` instance labels, and whether the
    mask was binary (one value besides 0), in which case each connected part
    (8-connectivity) becomes a nucleus: touching nuclei then stay merged.

    >>> lab, was_binary = instance_labels(np.array([[0, 255, 0, 255]], np.uint8))
    >>> lab.tolist(), was_binary
    ([[0, 1, 0, 2]], True)
    >>> instance_labels(np.array([[0, 7, 7, 3]], np.uint16))[0].tolist()
    [[0, 7, 7, 3]]
    """
    if mask.ndim == 3 and mask.shape[2] in (3, 4):
        channels = mask[..., :3]
        if not (
            np.array_equal(channels[..., 0], channels[..., 1])
            and np.array_equal(channels[..., 0], channels[..., 2])
        ):
            raise ValueError(
                "is a colour image: a mask is one channel, 0 = background and one integer "
                "per nucleus"
            )
        mask = channels[..., 0]
    if mask.ndim != 2:
        raise ValueError(f"has shape {mask.shape}: a mask is one channel (height x width)")
    if not np.issubdtype(mask.dtype, np.integer) and mask.dtype != bool:
        if not np.all(np.isfinite(mask)) or not np.array_equal(mask, np.round(mask)):
            raise ValueError(f"holds non-integer {mask.dtype} values: a mask holds integer labels")
    if mask.size and (mask.min() < 0 or mask.max() > np.iinfo(np.int32).max):
        raise ValueError("holds labels outside 0..2^31-1")
    labels = mask.astype(np.int32)
    values = np.unique(labels)
    if len(values[values > 0]) == 1:
        parts, n = ndi.label(labels > 0, structure=np.ones((3, 3), bool))
        return parts.astype(np.int32), n > 1
    return labels, False


def read_mpp_file(path: Path) -> float:
    """The resolution an ``mpp.txt`` holds (one number, microns per pixel);
    ``ValueError`` for anything else."""
    text = path.read_text().strip()
    try:
        mpp = float(text)
    except ValueError:
        raise ValueError(f"holds {text[:40]!r}, not a number of microns per pixel") from None
    if not 0.01 <= mpp <= 100:
        raise ValueError(f"{mpp:g} um/px is not a microscope's resolution (0.01-100)")
    return mpp


@register_dataset
class LabelledFolder(Dataset):
    """Images with instance label masks of the same name, from any source.

    Parameters
    ----------
    root : str or Path
        Folder with ``images/`` and ``masks/`` (or ``labels/``); an optional
        ``mpp.txt`` holds the microns per pixel of every image (else the
        resolution comes from the command, ``--mpp`` or a config's
        ``data.default_mpp``).
    modality : str, optional
        ``"brightfield"`` or ``"fluorescence"``; by default images with one
        channel, grey stored as RGB or colour on a dark background (median
        brightness below 50 of 255) are fluorescence, other colour images
        brightfield.
    """

    name = "folder"
    description = "your own images with instance label masks (QuPath, Cellpose, StarDist exports)"
    layout = (
        "<root>/images/<id>.png|tif|jpg and <root>/masks/<id>.png|tif (or labels/): "
        "0 = background, one integer per nucleus (a binary mask is split into its connected "
        "parts); optional <root>/mpp.txt: microns per pixel of every image"
    )
    kind = "instances"

    def __init__(self, root: str | Path, modality: str | None = None) -> None:
        super().__init__(root)
        if modality not in (None, "brightfield", "fluorescence"):
            raise self.error(
                self.root, f"modality must be brightfield or fluorescence, not {modality!r}"
            )
        self.modality = modality
        img_dir = self.root / "images"
        if not img_dir.is_dir():
            raise self.error(img_dir, "missing images/ folder")
        mask_dir = next((self.root / m for m in MASK_FOLDERS if (self.root / m).is_dir()), None)
        if mask_dir is None:
            raise self.error(self.root, "missing masks/ (or labels/) folder of label images")
        images = _by_stem(img_dir, IMAGE_SUFFIXES, self)
        masks = _by_stem(mask_dir, MASK_SUFFIXES, self)
        self._images = {k: images[k] for k in sorted(images.keys() & masks.keys(), key=natural_key)}
        self._masks = {k: masks[k] for k in self._images}
        # a JPEG mask is not read (its labels are blurred): say so where it
        # would have been the image's mask, not "0 masks" beside the file
        lossy = {
            p.stem: p
            for p in sorted(mask_dir.iterdir())
            if p.suffix.lower() in IMAGE_SUFFIXES - MASK_SUFFIXES and p.is_file()
        }
        unread = sorted((images.keys() - masks.keys()) & lossy.keys(), key=natural_key)
        why = (
            f"; {len(unread)} JPEG mask(s) not read ({lossy[unread[0]].name}"
            f"{', ...' if len(unread) > 1 else ''}): a mask must be lossless, PNG or TIFF"
            if unread
            else ""
        )
        if not self._images:
            raise self.error(
                self.root,
                f"no image in images/ has a mask of the same name in {mask_dir.name}/ "
                f"({len(images)} images, {len(masks)} masks){why}",
            )
        alone = sorted(images.keys() - masks.keys())
        if alone:
            logger.warning(
                "folder: %d image(s) without a mask are left out (%s)%s",
                len(alone),
                ", ".join(alone[:3]) + (", ..." if len(alone) > 3 else ""),
                why,
            )
        self.mpp = self._read_mpp()

    def _read_mpp(self) -> float | None:
        f = self.root / "mpp.txt"
        if not f.is_file():
            return None
        try:
            return read_mpp_file(f)
        except ValueError as exc:
            raise self.error(f, str(exc)) from None

    def ids(self, split: str | None = None) -> list[str]:
        """Image ids (file stems) that have a mask; there are no splits."""
        self._check_split(split)
        return list(self._images)

    def files(self) -> list[Path]:
        """The images, their masks and ``mpp.txt``."""
        mpp = self.root / "mpp.txt"
        return [*self._images.values(), *self._masks.values(), *([mpp] if mpp.is_file() else [])]

    def load(self, sample_id: str) -> Sample:
        """Load one image and its mask (checked to be one integer per nucleus)."""
        if sample_id not in self._images:
            raise self._unknown(sample_id)
        image = read_image(self._images[sample_id])
        mask_path = self._masks[sample_id]
        try:
            labels, was_binary = instance_labels(read_image(mask_path))
        except ValueError as exc:
            raise self.error(mask_path, str(exc)) from None
        if was_binary:
            logger.warning(
                "folder: %s is a binary mask: its connected parts are taken as nuclei, so "
                "touching nuclei count as one",
                mask_path.name,
            )
        if labels.shape != image.shape[:2]:
            raise self.error(
                mask_path, f"mask shape {labels.shape} differs from image {image.shape[:2]}"
            )
        if image.ndim == 3 and image.shape[2] == 4:
            image = image[..., :3]
        return Sample(
            id=sample_id,
            image=image,
            labels=labels,
            mpp=self.mpp,
            modality=self.modality or _modality_of(image),
        )


def _by_stem(folder: Path, suffixes: set[str], ds: Dataset) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith("."):
            if p.stem in found:
                raise ds.error(p, f"two files named {p.stem} ({found[p.stem].name}, {p.name})")
            found[p.stem] = p
    return found


def _modality_of(image: np.ndarray) -> str:
    """Fluorescence for one channel, grey stored as colour, or colour on a dark
    background (a pseudo-coloured DAPI channel, as a fluorescence slide's
    fields come out of ``nucleus-bench fields``); else brightfield.

    >>> dapi = np.zeros((4, 4, 3), np.uint8); dapi[1, 1] = (0, 40, 230)
    >>> _modality_of(dapi), _modality_of(np.full((4, 4, 3), (230, 200, 220), np.uint8))
    ('fluorescence', 'brightfield')
    >>> _modality_of(np.full((4, 4, 3), (230, 200, 220), np.uint16) * 256)  # scaled, not wrapped
    'brightfield'
    """
    from nucleus_models.wsi.tissue import apparent_modality

    if image.ndim == 2 or image.shape[2] == 1:
        return "fluorescence"
    rgb = image[..., :3]
    grey = np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
    if rgb.dtype != np.uint8 and np.issubdtype(rgb.dtype, np.integer):
        # on apparent_modality's 0-255 scale (a cast would wrap 16-bit values)
        rgb = rgb.astype(np.float32) * np.float32(255 / np.iinfo(rgb.dtype).max)
    if grey or apparent_modality(rgb) == "fluorescence":
        return "fluorescence"
    return "brightfield"
