"""Weight-free H&E nucleus models built on histomicstk and scikit-image.

``classical-he``
    Reinhard normalisation (statistics of the whole slide's tissue, so every
    tile is treated alike) -> Ruifrok colour deconvolution -> hematoxylin
    channel -> foreground threshold -> distance-transform seeds ->
    marker-controlled watershed.
``histomicstk-kofahi``
    The same normalisation and deconvolution followed by HistomicsTK's own
    ``detect_nuclei_kofahi`` (the detector behind its ``NucleiDetection``
    CLI); the baseline every learned model is compared with.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from ..stain import reinhard_stats, reinhard_to_reference
from .base import ModelSpec, NucleusModel, TileInstances
from .registry import register_model

__all__ = ["ClassicalParams", "ClassicalHE", "HistomicsKofahi", "check_thresholds"]

# HistomicsTK's NucleiDetection default stains.
HE_STAINS = ("hematoxylin", "eosin", "null")


@dataclass(frozen=True)
class ClassicalParams:
    """Thresholds of the classical detectors (HistomicsTK's names and units).

    Radii and areas are in pixels at the model's resolution (0.5 um/px).
    """

    foreground_threshold: float = 90.0
    min_radius: float = 4.0
    max_radius: float = 12.0
    local_max_search_radius: float = 4.0
    min_nucleus_area: int = 20

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> ClassicalParams:
        """Take the known keys of ``options`` (others are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in options.items() if k in names and v is not None})


def check_thresholds(spec: ModelSpec, options: dict[str, Any]) -> None:
    """One-line errors for radii no run of the model of ``spec`` can use
    (``options`` over its tuned thresholds): HistomicsTK's detector divides
    by ``min_radius`` (0 ended in a traceback), and a ``min_radius`` above
    ``max_radius`` kept no nucleus at all, silently.

    Raises
    ------
    nucleus_models.errors.ParameterError
    """
    from ..errors import ParameterError

    p = ClassicalParams.from_options({**spec.thresholds, **options})
    kofahi = spec.name == HISTOMICSTK_KOFAHI.name
    if p.min_radius < 0 or (kofahi and p.min_radius == 0):
        least = "above" if kofahi else "at least"
        raise ParameterError(
            f"min_radius must be {least} 0 pixels for model {spec.name}, got {p.min_radius:g}"
        )
    if p.max_radius <= 0:
        raise ParameterError(f"max_radius must be above 0 pixels, got {p.max_radius:g}")
    if p.min_radius > p.max_radius:
        tuned = [k for k in ("min_radius", "max_radius") if k not in options]
        note = f" ({tuned[0]}: model {spec.name}'s own)" if tuned else ""
        raise ParameterError(
            f"min_radius {p.min_radius:g} is larger than max_radius {p.max_radius:g}{note}:"
            " no nucleus would be kept; give a min_radius no larger than max_radius"
        )


def _stain_matrix() -> np.ndarray:
    from histomicstk.preprocessing.color_deconvolution import stain_color_map

    return np.array([stain_color_map[s] for s in HE_STAINS]).T


class _HEBase(NucleusModel):
    """Shared stages: global Reinhard statistics and hematoxylin extraction."""

    #: background intensity of the colour deconvolution (``None``: histomicstk's
    #: default, ``rgb + 1`` against 256, as HistomicsTK's NucleiDetection runs it)
    deconvolution_i0: float | None = 255

    def __init__(self, spec: ModelSpec, **options: Any) -> None:
        self.spec = spec
        check_thresholds(spec, options)
        self.params = ClassicalParams.from_options({**spec.thresholds, **options})
        self._w = _stain_matrix()

    def prepare(self, thumbnail: np.ndarray, tissue: np.ndarray) -> dict[str, Any]:
        return reinhard_stats(thumbnail, tissue)

    def preprocess(self, tiles: list[np.ndarray], context: dict[str, Any]) -> list[np.ndarray]:
        """Reinhard-normalise and return the hematoxylin intensity (0 dark..255)."""
        from histomicstk.preprocessing.color_deconvolution import color_deconvolution

        out = []
        for tile in tiles:
            if "src_mu_lab" in context:
                tile = reinhard_to_reference(tile, context)
            stains = color_deconvolution(tile, self._w, self.deconvolution_i0).Stains
            out.append(stains[:, :, 0].astype(np.float32))
        return out

    def forward(self, batch: list[np.ndarray]) -> list[np.ndarray]:
        return batch

    def postprocess(
        self, raw: list[np.ndarray], tiles: list[np.ndarray], context: dict[str, Any]
    ) -> list[TileInstances]:
        return [self._segment(h) for h in raw]

    def _segment(self, hema: np.ndarray) -> TileInstances:  # pragma: no cover - abstract
        raise NotImplementedError


def _drop_small(labels: np.ndarray, min_area: float) -> np.ndarray:
    """Zero the labels with fewer than ``min_area`` pixels."""
    counts = np.bincount(labels.ravel())
    small = counts < min_area
    small[0] = False
    return np.where(small[labels], 0, labels).astype(np.int32)


def _drop_large(labels: np.ndarray, max_area: float) -> np.ndarray:
    """Zero the labels with more than ``max_area`` pixels (clumps, folds, vessels)."""
    counts = np.bincount(labels.ravel())
    large = counts > max_area
    large[0] = False
    return np.where(large[labels], 0, labels).astype(np.int32)


def _instances(labels: np.ndarray, hema: np.ndarray, threshold: float) -> TileInstances:
    """Scores = how much darker than the threshold a nucleus is, in [0, 1]."""
    labels = labels.astype(np.int32, copy=False)
    n = int(labels.max(initial=0))
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    sums = np.bincount(labels.ravel(), weights=hema.ravel(), minlength=n + 1)
    mean = sums / np.maximum(counts, 1)
    scores = np.clip((threshold - mean) / max(threshold, 1.0), 0.0, 1.0).astype(np.float32)
    scores[0] = 0
    return TileInstances(labels=labels, scores=scores, classes=np.zeros(n + 1, np.int32))


class ClassicalHE(_HEBase):
    """Hematoxylin threshold + distance-transform watershed."""

    def _segment(self, hema: np.ndarray) -> TileInstances:
        from scipy import ndimage as ndi
        from skimage.feature import peak_local_max
        from skimage.segmentation import relabel_sequential, watershed

        p = self.params
        smooth = ndi.gaussian_filter(hema, 1.0)
        fg = smooth < p.foreground_threshold
        fg = ndi.binary_opening(fg, iterations=1)
        fg = ndi.binary_fill_holes(fg)
        fg = _drop_small(ndi.label(fg)[0], p.min_nucleus_area) > 0
        if not fg.any():
            return _instances(np.zeros(hema.shape, np.int32), hema, p.foreground_threshold)
        dist = ndi.distance_transform_edt(fg)
        dist = ndi.gaussian_filter(dist, 1.0)
        cc, _ = ndi.label(fg)
        peaks = peak_local_max(
            dist,
            min_distance=max(int(round(p.local_max_search_radius)), 1),
            threshold_abs=max(p.min_radius * 0.5, 1.0),
            labels=cc,
            exclude_border=False,
        )
        markers = np.zeros(hema.shape, np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        # components without a peak (small, flat) still get one seed
        missing = np.setdiff1d(np.unique(cc[fg]), np.unique(cc[markers > 0]))
        if len(missing):
            coms = ndi.maximum_position(dist, cc, missing)
            for k, (r, c) in enumerate(coms, start=len(peaks) + 1):
                markers[r, c] = k
        labels = watershed(-dist, markers, mask=fg)
        labels = _drop_small(labels, p.min_nucleus_area)
        labels = relabel_sequential(_drop_large(labels, np.pi * p.max_radius**2))[0]
        return _instances(labels, hema, p.foreground_threshold)


class HistomicsKofahi(_HEBase):
    """HistomicsTK's ``detect_nuclei_kofahi`` on the normalised hematoxylin."""

    deconvolution_i0 = None

    def _segment(self, hema: np.ndarray) -> TileInstances:
        from histomicstk.segmentation.nuclear import detect_nuclei_kofahi
        from skimage.segmentation import relabel_sequential

        p = self.params
        fg = hema < p.foreground_threshold
        if not fg.any():
            return _instances(np.zeros(hema.shape, np.int32), hema, p.foreground_threshold)
        labels = detect_nuclei_kofahi(
            hema, fg, p.min_radius, p.max_radius, p.min_nucleus_area, p.local_max_search_radius
        )
        labels = relabel_sequential(np.asarray(labels, np.int32))[0]
        return _instances(labels, hema, p.foreground_threshold)


CLASSICAL_HE = ModelSpec(
    name="classical-he",
    mpp=0.5,
    modality="brightfield",
    tile_size=1024,
    tile_overlap=48,
    max_nucleus_diameter_um=20.0,
    batch_size=4,
    thresholds={
        "foreground_threshold": 90.0,
        "min_radius": 4.0,
        "max_radius": 12.0,
        "local_max_search_radius": 4.0,
        "min_nucleus_area": 20,
    },
    description=(
        "Weight-free H&E nuclei: Reinhard normalisation, Ruifrok deconvolution, "
        "hematoxylin threshold and distance-transform watershed (histomicstk + scikit-image)."
    ),
    license="Apache-2.0 (no training data)",
)

HISTOMICSTK_KOFAHI = ModelSpec(
    name="histomicstk-kofahi",
    mpp=0.5,
    modality="brightfield",
    tile_size=1024,
    tile_overlap=48,
    max_nucleus_diameter_um=20.0,
    batch_size=4,
    # HistomicsTK NucleiDetection defaults (pixels at 20x).
    thresholds={
        "foreground_threshold": 60.0,
        "min_radius": 6.0,
        "max_radius": 20.0,
        "local_max_search_radius": 10.0,
        "min_nucleus_area": 80,
    },
    description="HistomicsTK's NucleiDetection algorithm (Reinhard + deconvolution + detect_nuclei_kofahi).",
    license="Apache-2.0 (no training data)",
)


@register_model(CLASSICAL_HE)
def _build_classical_he(**options: Any) -> NucleusModel:
    return ClassicalHE(CLASSICAL_HE, **options)


@register_model(HISTOMICSTK_KOFAHI)
def _build_histomicstk_kofahi(**options: Any) -> NucleusModel:
    import warnings

    # HistomicsTK's max_clustering reads a scikit-image property under its
    # deprecated name: two FutureWarnings on every run, nothing a user can act on
    warnings.filterwarnings(
        "ignore",
        message=r"`RegionProperties\.weighted_centroid` is deprecated",
        category=FutureWarning,
    )
    return HistomicsKofahi(HISTOMICSTK_KOFAHI, **options)
