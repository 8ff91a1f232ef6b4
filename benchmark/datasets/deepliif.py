"""DeepLIIF (Ghahremani et al. 2022): Ki-67 IHC with positive / negative nucleus masks.

Training files are six 512x512 panels side by side: IHC | hematoxylin | mpIF DAPI |
mpIF Lap2 | mpIF Ki-67 | segmentation. In the segmentation panel red marks Ki-67
positive nuclei, blue negative nuclei, and thin green outlines separate touching
nuclei. Instances are the connected components (4-connectivity) of the red and of
the blue pixels, taken separately so that a red and a blue nucleus never merge.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import expand_labels

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

PANELS = ("ihc", "hematoxylin", "dapi", "lap2", "ki67", "segmentation")
NEGATIVE, POSITIVE = 1, 2


def decode_segmentation_panel(
    seg: np.ndarray, min_size: int = 10, include_outlines: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Decode a DeepLIIF segmentation panel into instance labels and their positivity.

    Parameters
    ----------
    seg : numpy.ndarray
        ``HxWx3`` uint8 panel: red = positive, blue = negative, green = outlines.
    min_size : int, default 10
        Components smaller than this many pixels (stray anti-aliased pixels) are dropped.
    include_outlines : bool, default False
        Grow each nucleus into the adjacent green outline pixels (by up to 3 px).

    Returns
    -------
    labels : numpy.ndarray
        ``HxW`` int32 instance labels ``1..N`` (negative nuclei first, then positive).
    positive : numpy.ndarray
        ``(N,)`` bool, ``positive[k - 1]`` tells whether label ``k`` is Ki-67 positive.
    """
    rgb = seg[..., :3].astype(np.int16)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    red = (r > 127) & (g < 128) & (b < 128)
    blue = (b > 127) & (r < 128) & (g < 128)
    parts = []
    for mask in (blue, red):
        lab, _ = ndi.label(mask)
        if min_size > 1:
            small = np.bincount(lab.ravel()) < min_size
            small[0] = False
            lab[small[lab]] = 0
        parts.append(lab)
    labels = np.zeros(seg.shape[:2], dtype=np.int32)
    positive: list[bool] = []
    for is_pos, lab in zip((False, True), parts, strict=True):
        ids = np.unique(lab[lab > 0])
        lut = np.zeros(int(lab.max()) + 1, dtype=np.int32)
        lut[ids] = np.arange(len(positive) + 1, len(positive) + len(ids) + 1)
        sel = lab > 0
        labels[sel] = lut[lab[sel]]
        positive += [is_pos] * len(ids)
    if include_outlines:
        green = (g > 127) & (r < 128) & (b < 128)
        grown = expand_labels(labels, distance=3)
        labels = np.where((labels == 0) & green, grown, labels).astype(np.int32)
    return labels, np.asarray(positive, dtype=bool)


@register_dataset
class DeepLIIF(Dataset):
    """DeepLIIF Ki-67 IHC fields with positive/negative nucleus instances.

    Parameters
    ----------
    root : str or Path
        Folder holding the six-panel PNGs, or a parent with ``train/`` or
        ``Sample_Dataset/train/``.
    include_unlabelled : bool, default False
        Also list the other PNGs under ``root`` (e.g. ``test_cli_input2_noseg``,
        ``Sample_Large_Tissues``) with ``labels=None``; their id is the path
        relative to ``root`` without suffix, and the image is the first square
        panel (or the whole image when it is not a row of square panels).
    min_size : int, default 10
        Smallest nucleus component kept, in pixels.
    include_outlines : bool, default False
        Grow nuclei into their green outline pixels.

    Notes
    -----
    Labelled samples carry ``points`` (label centroids, row ``k - 1`` for label
    ``k``), ``point_classes`` (1 = Ki-67 positive, 0 = negative), and in ``extra``:
    ``positive`` {label: bool}, ``class_map`` (HxW uint8, 0 background,
    1 negative, 2 positive) and the other five ``panels``.
    """

    name = "deepliif"
    description = "DeepLIIF Ki-67 IHC 512x512 fields with Ki-67 positive/negative nucleus masks"
    layout = (
        "<root>/<name>.png (or <root>/train/, <root>/Sample_Dataset/train/): 512x3072 RGB, six "
        "panels IHC | hematoxylin | DAPI | Lap2 | Ki-67 | segmentation (red +, blue -, green outlines)"
    )
    kind = "instances"

    def __init__(
        self,
        root: str | Path,
        include_unlabelled: bool = False,
        min_size: int = 10,
        include_outlines: bool = False,
    ) -> None:
        super().__init__(root)
        self.include_unlabelled = include_unlabelled
        self.min_size = min_size
        self.include_outlines = include_outlines
        train = first_existing(
            self.root,
            ["", "train", "Sample_Dataset/train"],
            lambda p: p.is_dir() and any(self._is_six_panel(q) for q in p.glob("*.png")),
        )
        self._labelled: dict[str, Path] = {}
        if train is not None:
            for p in sorted(train.glob("*.png")):
                if self._is_six_panel(p):
                    self._labelled[p.stem] = p
        self._unlabelled: dict[str, Path] = {}
        if include_unlabelled:
            done = set(self._labelled.values())
            for p in sorted(self.root.rglob("*.png")):
                if p not in done and not self._is_six_panel(p):
                    self._unlabelled[p.relative_to(self.root).with_suffix("").as_posix()] = p
        if not self._labelled and not self._unlabelled:
            raise self.error(self.root, "no six-panel PNGs (width = 6 x height) here or in train/")

    @staticmethod
    def _is_six_panel(path: Path) -> bool:
        from PIL import Image

        try:
            with Image.open(path) as im:
                w, h = im.size
        except OSError:
            return False
        return w == 6 * h

    def splits(self) -> list[str]:
        """Return ``labelled`` and, when listed, ``unlabelled``."""
        return ["labelled"] + (["unlabelled"] if self._unlabelled else [])

    def ids(self, split: str | None = None) -> list[str]:
        """Return labelled ids (file stems), then unlabelled ids (relative paths)."""
        key = self._check_split(split)
        lab = sorted(self._labelled, key=natural_key) if key in (None, "labelled") else []
        unl = sorted(self._unlabelled, key=natural_key) if key in (None, "unlabelled") else []
        return lab + unl

    def files(self) -> list[Path]:
        """Return the listed PNG files."""
        return [*self._labelled.values(), *self._unlabelled.values()]

    def load(self, sample_id: str) -> Sample:
        """Load the IHC panel, instance labels, centroids and positivity."""
        groups = {}
        stem = Path(sample_id).name
        tissue = stem.rstrip("0123456789_-")
        if tissue and not tissue.startswith("ROI"):
            groups["tissue"] = tissue.lower()
        if sample_id in self._labelled:
            full = to_rgb_uint8(read_image(self._labelled[sample_id]))
            s = full.shape[0]
            panels = {n: full[:, i * s : (i + 1) * s] for i, n in enumerate(PANELS)}
            labels, positive = decode_segmentation_panel(
                panels["segmentation"], self.min_size, self.include_outlines
            )
            n = len(positive)
            if n:
                cy_cx = np.asarray(ndi.center_of_mass(labels > 0, labels, np.arange(1, n + 1)))
                points = cy_cx[:, ::-1].astype(np.float64)
            else:
                points = np.zeros((0, 2), dtype=np.float64)
            class_map = np.zeros(labels.shape, dtype=np.uint8)
            class_map[labels > 0] = np.where(positive, POSITIVE, NEGATIVE)[labels[labels > 0] - 1]
            extra = {
                "positive": {k + 1: bool(p) for k, p in enumerate(positive)},
                "class_map": class_map,
                "class_names": {0: "background", NEGATIVE: "negative", POSITIVE: "positive"},
                "panels": {k: v for k, v in panels.items() if k != "ihc"},
            }
            return Sample(
                id=sample_id,
                image=np.ascontiguousarray(panels["ihc"]),
                labels=labels,
                points=points,
                point_classes=positive.astype(np.int64),
                groups=groups,
                mpp=None,
                modality="brightfield",
                extra=extra,
            )
        if sample_id in self._unlabelled:
            full = to_rgb_uint8(read_image(self._unlabelled[sample_id]))
            h, w = full.shape[:2]
            image = full[:, :h] if w > h and w % h == 0 else full
            return Sample(
                id=sample_id,
                image=np.ascontiguousarray(image),
                groups=groups,
                modality="brightfield",
                extra={"image_path": str(self._unlabelled[sample_id])},
            )
        raise self._unknown(sample_id)
