"""Reinhard colour normalisation with whole-slide statistics (histomicstk).

The statistics (mean and standard deviation of the tissue in Ruderman's
LAB space) are taken once per slide or image, so every tile of it is mapped
the same way; ``classical-he`` and U-Nets trained with
``model.stain_normalisation = "reinhard"`` share these two functions between
training and serving.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["REFERENCE_MU_LAB", "REFERENCE_STD_LAB", "reinhard_stats", "reinhard_to_reference"]

# HistomicsTK's NucleiDetection defaults (Reinhard target).
REFERENCE_MU_LAB = (8.63234435, -0.11501964, 0.03868433)
REFERENCE_STD_LAB = (0.57506023, 0.10403329, 0.01364062)


def reinhard_stats(rgb: np.ndarray, tissue: np.ndarray | None = None) -> dict[str, Any]:
    """LAB mean and standard deviation of ``rgb``'s tissue (all of it without any).

    >>> img = np.full((8, 8, 3), 200, np.uint8); img[:4] = (120, 60, 160)
    >>> s = reinhard_stats(img)
    >>> sorted(s), len(s["src_mu_lab"])
    (['src_mu_lab', 'src_sigma_lab'], 3)
    """
    from histomicstk.preprocessing.color_conversion import lab_mean_std

    rgb = np.ascontiguousarray(rgb[..., :3])
    if tissue is not None and tissue.any():
        mu, sigma = lab_mean_std(rgb, mask_out=~tissue)
    else:
        mu, sigma = lab_mean_std(rgb)
    return {"src_mu_lab": np.asarray(mu).tolist(), "src_sigma_lab": np.asarray(sigma).tolist()}


def reinhard_to_reference(tile: np.ndarray, stats: dict[str, Any]) -> np.ndarray:
    """Map ``tile`` (RGB uint8) from the slide's ``stats`` to the reference.

    Two tiles of one slide get the same per-channel mapping, so a pale tile
    stays pale:

    >>> img = np.zeros((4, 4, 3), np.uint8); img[..., 0] = 150; img[..., 1] = 80; img[..., 2] = 170
    >>> img[2:] = (200, 150, 210)
    >>> s = reinhard_stats(img)
    >>> a = reinhard_to_reference(img, s); b = reinhard_to_reference(img[2:], s)
    >>> bool((a[2:] == b).all()), a.dtype.name
    (True, 'uint8')
    """
    from histomicstk.preprocessing.color_normalization import reinhard

    return reinhard(
        np.ascontiguousarray(tile[..., :3]),
        REFERENCE_MU_LAB,
        REFERENCE_STD_LAB,
        src_mu=np.asarray(stats["src_mu_lab"]),
        src_sigma=np.asarray(stats["src_sigma_lab"]),
    )
