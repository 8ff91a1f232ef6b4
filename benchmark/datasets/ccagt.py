"""CCAgT (Amorim et al.): AgNOR silver-stained cervical cells, nucleus and NOR masks.

Format facts this loader relies on (checked on the shared samples):

* ``masks/semantic_segmentation/<stem>.png``: one class per pixel, 0 background,
  1 nucleus, 2 cluster (NOR), 3 satellite (NOR), 4 nucleus out of focus,
  5 overlapped nuclei, 6 non-viable nucleus, 7 leukocyte nucleus. Touching
  nuclei are merged, so instances cannot come from it alone.
* ``masks/panoptic_segmentation/<stem>.png``: RGB, one colour per segment
  (nucleus or NOR); each colour covers pixels of a single semantic class. The
  colours do not equal the segment ids of the COCO panoptic JSON, so the class
  of a colour is taken from the semantic mask (majority vote).
* NORs are painted over their nucleus: a nucleus's full area is its own
  pixels plus the NORs inside it. Each NOR is assigned to the nucleus that
  touches most of its 1-pixel outer ring, and its pixels are added to it.
* AgNOR count of a nucleus = its clusters + satellites.

Without the panoptic PNGs, instances fall back to connected components of
each semantic class (touching nuclei then stay merged; a warning is logged).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from .base import Dataset, Sample, natural_key, read_image, register_dataset, to_rgb_uint8

logger = logging.getLogger(__name__)

CATEGORIES: dict[int, str] = {
    0: "background",
    1: "nucleus",
    2: "cluster",
    3: "satellite",
    4: "nucleus_out_of_focus",
    5: "overlapped_nuclei",
    6: "non_viable_nucleus",
    7: "leukocyte_nucleus",
}
NUCLEUS_CLASSES = (1, 4, 5, 6, 7)
NOR_CLASSES = (2, 3)
MPP = 0.111
_IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".tif", ".tiff"}


def segments_from_panoptic(
    panoptic: np.ndarray, semantic: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Turn a colour panoptic PNG into a segment map and the class of each segment.

    Parameters
    ----------
    panoptic : numpy.ndarray
        ``HxWx3`` uint8, one colour per segment, black = background.
    semantic : numpy.ndarray
        ``HxW`` class map (values 0..7).

    Returns
    -------
    segments : numpy.ndarray
        ``HxW`` int32, 0 = background, ``1..S`` = segments.
    seg_class : numpy.ndarray
        ``(S + 1,)`` class of each segment (majority semantic class; index 0 = background).
    """
    rgb = panoptic[..., :3].astype(np.int64)
    code = rgb[..., 0] | (rgb[..., 1] << 8) | (rgb[..., 2] << 16)
    uniq, inv = np.unique(code, return_inverse=True)
    segments = inv.reshape(code.shape).astype(np.int32)
    if uniq[0] != 0:
        segments += 1
    n = int(segments.max()) + 1
    n_cls = max(int(semantic.max()) + 1, len(CATEGORIES))
    votes = np.bincount(
        (segments.astype(np.int64) * n_cls + semantic).ravel(), minlength=n * n_cls
    ).reshape(n, n_cls)
    seg_class = votes.argmax(axis=1)
    seg_class[0] = 0
    return segments, seg_class


def segments_from_semantic(semantic: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of each semantic class (fallback when no panoptic PNG exists)."""
    segments = np.zeros(semantic.shape, dtype=np.int32)
    classes = [0]
    for c in sorted(set(np.unique(semantic).tolist()) - {0}):
        lab, n = ndi.label(semantic == c)
        segments[lab > 0] = lab[lab > 0] + len(classes) - 1
        classes += [c] * n
    return segments, np.asarray(classes, dtype=np.int64)


def build_instances(segments: np.ndarray, seg_class: np.ndarray) -> dict:
    """Build nucleus labels (NORs filled in), NOR labels and per-nucleus AgNOR counts.

    Parameters
    ----------
    segments, seg_class : numpy.ndarray
        Output of :func:`segments_from_panoptic` or :func:`segments_from_semantic`.

    Returns
    -------
    dict
        ``labels`` (HxW int32 nuclei ``1..N`` with their NORs), ``nor_labels``
        (HxW int32 NORs ``1..M``), ``nucleus_classes`` {label: class name},
        ``nor_classes`` {nor id: "cluster" | "satellite"}, ``nor_parent``
        {nor id: nucleus label, 0 if none}, ``agnor_counts``, ``cluster_counts``,
        ``satellite_counts`` ({label: int} for every nucleus).
    """
    is_nuc = np.isin(seg_class, NUCLEUS_CLASSES)
    is_nor = np.isin(seg_class, NOR_CLASSES)
    is_nuc[0] = is_nor[0] = False
    nuc_lut = np.zeros(len(seg_class), dtype=np.int32)
    nuc_lut[is_nuc] = np.arange(1, int(is_nuc.sum()) + 1)
    nor_lut = np.zeros(len(seg_class), dtype=np.int32)
    nor_lut[is_nor] = np.arange(1, int(is_nor.sum()) + 1)
    labels = nuc_lut[segments]
    nor_labels = nor_lut[segments]
    nuc_cls = seg_class[is_nuc]
    nucleus_classes = {i + 1: CATEGORIES.get(int(c), str(c)) for i, c in enumerate(nuc_cls)}
    nor_cls = seg_class[is_nor]
    nor_classes = {i + 1: CATEGORIES[int(c)] for i, c in enumerate(nor_cls)}
    clusters = dict.fromkeys(nucleus_classes, 0)
    satellites = dict.fromkeys(nucleus_classes, 0)
    nor_parent: dict[int, int] = {}
    h, w = labels.shape
    for j, sl in enumerate(ndi.find_objects(nor_labels), start=1):
        if sl is None:
            continue
        big = tuple(
            slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(sl, (h, w), strict=True)
        )
        m = nor_labels[big] == j
        ring = ndi.binary_dilation(m, structure=np.ones((3, 3), bool)) & ~m
        cand = labels[big][ring]
        cand = cand[cand > 0]
        parent = int(np.bincount(cand).argmax()) if cand.size else 0
        nor_parent[j] = parent
        if parent:
            sub = labels[big]
            sub[m & (sub == 0)] = parent
            (clusters if nor_classes[j] == "cluster" else satellites)[parent] += 1
    orphans = sum(1 for p in nor_parent.values() if p == 0)
    if orphans:
        logger.info("ccagt: %d NOR(s) touch no nucleus", orphans)
    return {
        "labels": labels,
        "nor_labels": nor_labels,
        "nucleus_classes": nucleus_classes,
        "nor_classes": nor_classes,
        "nor_parent": nor_parent,
        "cluster_counts": clusters,
        "satellite_counts": satellites,
        "agnor_counts": {k: clusters[k] + satellites[k] for k in nucleus_classes},
    }


def _index(folder: Path, exts: set[str], exclude: Path | None = None) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    out: dict[str, Path] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix.lower() in exts:
            if exclude is not None and exclude in p.parents:
                continue
            out.setdefault(p.stem, p)
    return out


@register_dataset
class CCAgT(Dataset):
    """CCAgT AgNOR tiles: nucleus instances with per-nucleus AgNOR (cluster + satellite) counts.

    Parameters
    ----------
    root : str or Path
        Folder holding ``images/`` and ``masks/semantic_segmentation/`` (and, for
        correct instances, ``masks/panoptic_segmentation/``).
    """

    name = "ccagt"
    description = "CCAgT AgNOR-stained cervical cells (1600x1200, 0.111 um/px), nuclei and NORs"
    layout = (
        "<root>/images/**/<stem>.jpg, <root>/masks/semantic_segmentation/**/<stem>.png "
        "(classes 0-7) and <root>/masks/panoptic_segmentation/**/<stem>.png (one colour per segment)"
    )
    kind = "instances"

    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
        img_dir, masks = self.root / "images", self.root / "masks"
        if not img_dir.is_dir():
            raise self.error(img_dir, "missing images/ folder")
        pan_dir = masks / "panoptic_segmentation"
        sem_dir = masks / "semantic_segmentation"
        if not sem_dir.is_dir():
            sem_dir = masks
        if not sem_dir.is_dir():
            raise self.error(masks / "semantic_segmentation", "missing semantic mask folder")
        images = _index(img_dir, _IMAGE_EXTS)
        semantic = _index(sem_dir, {".png"}, exclude=pan_dir)
        self._images = {k: images[k] for k in images.keys() & semantic.keys()}
        self._semantic = {k: semantic[k] for k in self._images}
        panoptic = _index(pan_dir, {".png"})
        self._panoptic = {k: panoptic[k] for k in self._images if k in panoptic}
        if not self._images:
            raise self.error(self.root, "no images/* with a matching semantic mask PNG")
        if len(self._panoptic) < len(self._images):
            logger.warning(
                "ccagt: %d of %d images lack a panoptic PNG; touching nuclei will stay merged",
                len(self._images) - len(self._panoptic),
                len(self._images),
            )

    def ids(self, split: str | None = None) -> list[str]:
        """Return the image stems that have a semantic mask."""
        self._check_split(split)
        return sorted(self._images, key=natural_key)

    def files(self) -> list[Path]:
        """Return images, semantic and panoptic masks."""
        return [*self._images.values(), *self._semantic.values(), *self._panoptic.values()]

    def load(self, sample_id: str) -> Sample:
        """Load the tile, nucleus instances (NORs filled in) and AgNOR data in ``extra``."""
        if sample_id not in self._images:
            raise self._unknown(sample_id)
        image = to_rgb_uint8(read_image(self._images[sample_id]))
        semantic = read_image(self._semantic[sample_id])
        if semantic.ndim == 3:
            semantic = semantic[..., 0]
        semantic = semantic.astype(np.int64)
        if sample_id in self._panoptic:
            pan = read_image(self._panoptic[sample_id])
            segments, seg_class = segments_from_panoptic(pan, semantic)
            source = "panoptic"
        else:
            segments, seg_class = segments_from_semantic(semantic)
            source = "semantic"
        inst = build_instances(segments, seg_class)
        labels = inst.pop("labels")
        if labels.shape != image.shape[:2]:
            raise self.error(
                self._semantic[sample_id], f"mask shape {labels.shape} != image {image.shape}"
            )
        extra = dict(inst, semantic=semantic.astype(np.uint8), instance_source=source)
        extra["image_path"] = str(self._images[sample_id])
        return Sample(
            id=sample_id,
            image=image,
            labels=labels,
            groups={"slide": sample_id.split("_", 1)[0]},
            mpp=MPP,
            modality="brightfield",
            extra=extra,
        )
