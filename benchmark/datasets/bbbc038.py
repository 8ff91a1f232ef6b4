"""BBBC038 / Data Science Bowl 2018: one folder per image, one binary PNG per nucleus."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .base import Dataset, Sample, natural_key, read_image, register_dataset, to_rgb_uint8

logger = logging.getLogger(__name__)

_STAGE_DIRS = ("stage1_train", "stage1_test", "stage2_test_final", "stage2_test")


def guess_modality(rgb: np.ndarray, grey_tol: float = 2.0, dark_median: float = 100.0) -> str:
    """Guess whether an 8-bit RGB image is fluorescence or brightfield.

    Fluorescence when the image is (near) greyscale, i.e. the mean absolute
    deviation of the channels from their mean is below ``grey_tol``, and its
    background is dark (median intensity below ``dark_median``); brightfield otherwise.

    Parameters
    ----------
    rgb : numpy.ndarray
        ``HxWx3`` (or ``HxW``) image.
    grey_tol : float, default 2.0
        Largest mean channel deviation still considered greyscale.
    dark_median : float, default 100.0
        Median intensity below which the background counts as dark.

    Returns
    -------
    str
        ``"fluorescence"`` or ``"brightfield"``.
    """
    a = np.asarray(rgb, dtype=np.float32)
    if a.ndim == 3:
        chroma = float(np.abs(a - a.mean(axis=2, keepdims=True)).mean())
        grey = a.mean(axis=2)
    else:
        chroma, grey = 0.0, a
    return (
        "fluorescence"
        if chroma < grey_tol and float(np.median(grey)) < dark_median
        else "brightfield"
    )


def _is_sample_dir(p: Path) -> bool:
    return p.is_dir() and (p / "images").is_dir()


@register_dataset
class BBBC038(Dataset):
    """DSB2018 nuclei (BBBC038): mixed fluorescence / brightfield, per-nucleus binary masks.

    Parameters
    ----------
    root : str or Path
        Either a folder of ``<id>/`` sample folders, or a folder holding
        ``stage1_train/``, ``stage1_test/``, ... each of which holds ``<id>/`` folders.
    include_unlabelled : bool, default False
        Also list samples without a non-empty ``masks/`` folder (``labels=None``).
    grey_fluorescence : bool, default True
        Return fluorescence images whose three channels are identical as ``HxW``
        (the first channel) instead of ``HxWx3``.
    """

    name = "bbbc038"
    description = "BBBC038 (Data Science Bowl 2018) nuclei, one binary mask PNG per nucleus"
    layout = (
        "<root>/<id>/images/<id>.png and <root>/<id>/masks/*.png (one binary mask per nucleus), "
        "or <root>/stage1_train|stage1_test|.../<id>/... ; RGBA images have their alpha dropped"
    )
    kind = "instances"

    def __init__(
        self, root: str | Path, include_unlabelled: bool = False, grey_fluorescence: bool = True
    ) -> None:
        super().__init__(root)
        self.include_unlabelled = include_unlabelled
        self.grey_fluorescence = grey_fluorescence
        self._dirs: dict[str, Path] = {}
        self._split_of: dict[str, str] = {}
        stage_dirs = [self.root / s for s in _STAGE_DIRS if (self.root / s).is_dir()]
        if stage_dirs:
            containers = [(d, d.name) for d in stage_dirs]
        else:
            containers = [(self.root, "")]
        for container, split in containers:
            for d in sorted(container.iterdir()):
                if not _is_sample_dir(d):
                    continue
                if not include_unlabelled and not self._mask_files(d):
                    continue
                if d.name in self._dirs:
                    logger.warning("bbbc038: duplicate id %s in %s ignored", d.name, container)
                    continue
                self._dirs[d.name] = d
                self._split_of[d.name] = split
        if not self._dirs:
            raise self.error(
                self.root,
                "no <id>/images/<id>.png sample folders"
                + ("" if include_unlabelled else " with a non-empty masks/ folder")
                + " (directly or under stage1_train/ or stage1_test/)",
            )

    @staticmethod
    def _mask_files(d: Path) -> list[Path]:
        m = d / "masks"
        if not m.is_dir():
            return []
        return sorted(
            (p for p in m.iterdir() if p.suffix.lower() == ".png"),
            key=lambda p: natural_key(p.name),
        )

    def splits(self) -> list[str]:
        """Return the stage folders found (empty when samples sit directly in root)."""
        return sorted({s for s in self._split_of.values() if s})

    def ids(self, split: str | None = None) -> list[str]:
        """Return the sample folder names, optionally those of one stage folder."""
        key = self._check_split(split)
        return sorted(i for i in self._dirs if key is None or self._split_of[i] == key)

    def files(self) -> list[Path]:
        """Return image and mask files of the listed samples."""
        out: list[Path] = []
        for d in self._dirs.values():
            out += [p for p in (d / "images").iterdir() if p.is_file()]
            out += self._mask_files(d)
        return out

    def _image_path(self, d: Path) -> Path:
        p = d / "images" / f"{d.name}.png"
        if p.is_file():
            return p
        found = sorted(q for q in (d / "images").iterdir() if q.is_file())
        if not found:
            raise self.error(d / "images", "no image file")
        return found[0]

    def load(self, sample_id: str) -> Sample:
        """Load the image (alpha dropped) and merge the per-nucleus masks into a label map.

        Label ``k`` is the ``k``-th mask file in natural order; overlapping pixels
        (not expected in DSB2018) go to the later mask.
        """
        d = self._dirs.get(sample_id)
        if d is None:
            raise self._unknown(sample_id)
        rgb = to_rgb_uint8(read_image(self._image_path(d)))
        modality = guess_modality(rgb)
        image = rgb
        if (
            modality == "fluorescence"
            and self.grey_fluorescence
            and np.array_equal(rgb[..., 0], rgb[..., 1])
            and np.array_equal(rgb[..., 0], rgb[..., 2])
        ):
            image = np.ascontiguousarray(rgb[..., 0])
        masks = self._mask_files(d)
        labels = None
        if masks:
            labels = np.zeros(rgb.shape[:2], dtype=np.int32)
            for k, mp in enumerate(masks, start=1):
                m = read_image(mp)
                if m.ndim == 3:
                    m = m[..., :3].max(axis=2)
                if m.shape != labels.shape:
                    raise self.error(
                        mp, f"mask shape {m.shape} differs from image shape {labels.shape}"
                    )
                labels[m > 0] = k
        groups = {"modality": modality}
        if self._split_of[sample_id]:
            groups["split"] = self._split_of[sample_id]
        return Sample(
            id=sample_id,
            image=image,
            labels=labels,
            groups=groups,
            mpp=None,
            modality=modality,
            extra={"n_masks": len(masks), "image_path": str(self._image_path(d))},
        )
