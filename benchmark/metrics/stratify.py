"""Stratified summaries: per-group means and detection by local nucleus density."""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.spatial import cKDTree

from .detection import _as_points, match_points_within_radius


def _is_missing(v: object) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def summarize_by_group(
    rows: Iterable[Mapping[str, object]],
    group_key: str,
    metric_keys: Sequence[str],
) -> dict[Hashable, dict[str, float]]:
    """Mean of each metric per group.

    Parameters
    ----------
    rows : iterable of mapping
        E.g. one dict per image with a group field and metric fields.
    group_key : str
        Field whose value defines the group (rows lacking it are grouped
        under ``None``).
    metric_keys : sequence of str
        Fields to average.

    Returns
    -------
    dict
        ``{group: {"n": rows in group, metric: mean, ...}}`` with groups in
        order of first appearance. Missing values (absent key, ``None``, NaN)
        are left out of that metric's mean; a metric with no values is NaN.
    """
    sums: dict[Hashable, dict[str, list[float]]] = {}
    counts: dict[Hashable, int] = {}
    for row in rows:
        g = row.get(group_key)
        counts[g] = counts.get(g, 0) + 1
        acc = sums.setdefault(g, {k: [] for k in metric_keys})
        for k in metric_keys:
            v = row.get(k)
            if not _is_missing(v):
                acc[k].append(float(v))  # type: ignore[arg-type]
    out: dict[Hashable, dict[str, float]] = {}
    for g, acc in sums.items():
        res: dict[str, float] = {"n": counts[g]}
        for k in metric_keys:
            res[k] = float(np.mean(acc[k])) if acc[k] else float("nan")
        out[g] = res
    return out


def local_density(
    points: ArrayLike, *, radius: float, reference: ArrayLike | None = None
) -> NDArray[np.int64]:
    """Number of neighbours within ``radius`` (``d <= radius``) of each point.

    Parameters
    ----------
    points : array_like, shape (n, 2)
    radius : float
        Neighbourhood radius, same units as the points.
    reference : array_like, shape (m, 2), optional
        Count these points instead. Without it the other points of ``points``
        are counted (each point excludes itself, not its duplicates).

    Returns
    -------
    ndarray of int, shape (n,)
    """
    p = _as_points(points)
    if len(p) == 0:
        return np.zeros(0, dtype=np.int64)
    ref = p if reference is None else _as_points(reference)
    if len(ref) == 0:
        return np.zeros(len(p), dtype=np.int64)
    n = np.asarray(cKDTree(ref).query_ball_point(p, radius, return_length=True), dtype=np.int64)
    return n - 1 if reference is None else n


def density_bins(density: ArrayLike, *, edges: Sequence[float]) -> NDArray[np.intp]:
    """Bin index of each density value: bin ``i`` is ``edges[i] <= d < edges[i+1]``.

    Values outside ``[edges[0], edges[-1])`` get -1; use ``np.inf`` as the last
    edge for an open top bin.
    """
    e = np.asarray(edges, dtype=np.float64)
    if e.ndim != 1 or e.size < 2 or np.any(np.diff(e) <= 0):
        raise ValueError("edges must be a strictly increasing sequence of >= 2 values")
    d = np.asarray(density, dtype=np.float64).ravel()
    idx = np.searchsorted(e, d, side="right") - 1
    idx[(idx < 0) | (idx >= e.size - 1)] = -1
    return idx.astype(np.intp)


def detection_by_density(
    pred: ArrayLike,
    true: ArrayLike,
    *,
    match_radius: float,
    density_radius: float,
    edges: Sequence[float],
    pred_scores: ArrayLike | None = None,
) -> list[dict[str, float]]:
    """Point-detection recall and precision stratified by local nucleus density.

    Points are matched with :func:`match_points_within_radius`. The density of
    a true nucleus is the number of *other* true nuclei within
    ``density_radius``. A matched prediction takes the density of its true
    nucleus; an unmatched one the number of true nuclei within
    ``density_radius`` of it. Both are then binned with :func:`density_bins`.

    Returns
    -------
    list of dict
        One per bin: ``lo, hi, n_true, tp_true, recall`` (matched / true in the
        bin, NaN if none) and ``n_pred, tp_pred, precision`` (NaN if none).
    """
    p, t = _as_points(pred), _as_points(true)
    m = match_points_within_radius(p, t, radius=match_radius, pred_scores=pred_scores)
    t_density = local_density(t, radius=density_radius)
    p_density = local_density(p, radius=density_radius, reference=t)
    p_density[m.pairs[:, 0]] = t_density[m.pairs[:, 1]]
    t_matched = np.zeros(len(t), dtype=bool)
    t_matched[m.pairs[:, 1]] = True
    t_bin = density_bins(t_density, edges=edges)
    p_bin = density_bins(p_density, edges=edges)
    out = []
    for i in range(len(edges) - 1):
        tb, pb = t_bin == i, p_bin == i
        n_t, n_p = int(tb.sum()), int(pb.sum())
        tp_t, tp_p = int(t_matched[tb].sum()), int(m.pred_is_tp[pb].sum())
        out.append(
            {
                "lo": float(edges[i]),
                "hi": float(edges[i + 1]),
                "n_true": n_t,
                "tp_true": tp_t,
                "recall": tp_t / n_t if n_t else float("nan"),
                "n_pred": n_p,
                "tp_pred": tp_p,
                "precision": tp_p / n_p if n_p else float("nan"),
            }
        )
    return out
