"""BBBC038 / Data Science Bowl 2018: one folder per image, one binary PNG per nucleus."""

from __future__ import annotations

import csv
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


#: an image's nuclei in a run-length CSV: (code, (H, W) when the CSV gives it)
_Runs = list[tuple[str, tuple[int, int] | None]]


def decode_rle(encoded: str, shape: tuple[int, int]) -> np.ndarray:
    """Decode one run-length-encoded nucleus of the Data Science Bowl 2018 CSVs.

    Parameters
    ----------
    encoded : str
        ``"start length start length ..."``: 1-based positions counted down each
        column, then left to right (column-major), as in ``stage1_solution.csv``.
    shape : tuple of int
        ``(H, W)`` of the image.

    Returns
    -------
    numpy.ndarray
        ``HxW`` bool mask.

    Raises
    ------
    ValueError
        Odd number of values, non-integers, or runs outside the image.

    Examples
    --------
    >>> decode_rle("2 2 6 1", (3, 2)).astype(int)
    array([[0, 0],
           [1, 0],
           [1, 1]])
    """
    h, w = shape
    try:
        values = np.asarray(encoded.split(), dtype=np.int64)
    except ValueError:
        raise ValueError(f"run-length code is not integers: {encoded[:40]!r}") from None
    if values.size % 2:
        raise ValueError("run-length code has an odd number of values")
    starts, lengths = values[0::2] - 1, values[1::2]
    if values.size and (starts.min() < 0 or lengths.min() < 1 or (starts + lengths).max() > h * w):
        raise ValueError(f"run-length code runs outside a {h}x{w} image")
    flat = np.zeros(h * w, dtype=bool)
    for a, n in zip(starts.tolist(), lengths.tolist(), strict=True):
        flat[a : a + n] = True
    return flat.reshape(w, h).T


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
        Samples without ``masks/`` take their nuclei from a run-length CSV
        (``ImageId,EncodedPixels[,Height,Width,...]``, the challenge's
        ``stage1_solution.csv`` / ``stage1_train_labels.csv``) in ``root``, or
        beside ``root`` when ``root`` is itself a ``stage1_test/``-like folder.
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
        "or <root>/stage1_train|stage1_test|.../<id>/... ; without masks/, the nuclei of the "
        "run-length CSV beside them (stage1_solution.csv); RGBA images have their alpha dropped"
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
        self._csvs, self._rle = self._read_rle_csvs()
        stage_dirs = [self.root / s for s in _STAGE_DIRS if (self.root / s).is_dir()]
        if stage_dirs:
            containers = [(d, d.name) for d in stage_dirs]
        else:
            containers = [(self.root, "")]
        for container, split in containers:
            for d in sorted(container.iterdir()):
                if not _is_sample_dir(d):
                    continue
                if not include_unlabelled and not self._labelled(d):
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
                + ("" if include_unlabelled else " with a non-empty masks/ folder or CSV rows")
                + " (directly or under stage1_train/ or stage1_test/)",
            )

    def _read_rle_csvs(self) -> tuple[list[Path], dict[str, _Runs]]:
        """Read the run-length CSVs beside the samples: id -> [(code, (H, W) or None)]."""
        places = [self.root]
        if self.root.name in _STAGE_DIRS:
            places.append(self.root.parent)
        found: list[Path] = []
        rle: dict[str, _Runs] = {}
        for place in places:
            for path in sorted(place.glob("*.csv")):
                with path.open(newline="") as f:
                    reader = csv.DictReader(f)
                    fields = reader.fieldnames or []
                    if not {"ImageId", "EncodedPixels"} <= set(fields):
                        continue
                    found.append(path)
                    sized = {"Height", "Width"} <= set(fields)
                    for n, row in enumerate(reader, start=2):
                        code = (row["EncodedPixels"] or "").strip()
                        if not code:
                            continue
                        given = sized and bool(row["Height"] or row["Width"])
                        try:
                            size = (int(row["Height"]), int(row["Width"])) if given else None
                        except (TypeError, ValueError):
                            raise self.error(
                                path, f"line {n}: Height/Width are not integers"
                            ) from None
                        rle.setdefault(row["ImageId"], []).append((code, size))
        return found, rle

    def _labelled(self, d: Path) -> bool:
        return bool(self._mask_files(d)) or d.name in self._rle

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
        return out + self._csvs

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

        Label ``k`` is the ``k``-th mask file in natural order (without ``masks/``,
        the ``k``-th CSV row of the image); overlapping pixels (not expected in
        DSB2018) go to the later mask.
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
        elif sample_id in self._rle:
            labels = np.zeros(rgb.shape[:2], dtype=np.int32)
            for k, (code, size) in enumerate(self._rle[sample_id], start=1):
                if size is not None and size != labels.shape:
                    raise self.error(d, f"CSV size {size} differs from image shape {labels.shape}")
                try:
                    labels[decode_rle(code, labels.shape)] = k
                except ValueError as e:
                    raise self.error(d, f"CSV nucleus {k}: {e}") from None
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
            extra={
                "n_masks": len(masks) or len(self._rle.get(sample_id, [])),
                "image_path": str(self._image_path(d)),
            },
        )
