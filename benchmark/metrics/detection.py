"""Point and box detection metrics.

Conventions shared by every function here
-----------------------------------------
* Points are ``(x, y)`` pairs (column, row), as in annotation files; a label
  map is indexed ``labels[y, x]``. A point is looked up in a label map at the
  nearest pixel, ``floor(x + 0.5), floor(y + 0.5)`` (pixel centres at integer
  coordinates; halves round up).
* Boxes are ``(x0, y0, x1, y1)`` with continuous coordinates; the area of a box
  is ``(x1 - x0) * (y1 - y0)`` (no ``+ 1``).
* Undefined ratios follow one rule: ``precision`` is 1 when nothing was
  predicted and nothing was to be found, else 0 when nothing was predicted;
  ``recall`` likewise (1 when both sets are empty, 0 when the truth is empty but
  something was predicted); ``f1 = 2 tp / (2 tp + fp + fn)`` and is 1 when
  both sets are empty. So "both empty" scores as perfect agreement, and "one
  side empty" scores 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from scipy.stats import rankdata


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Counts plus precision, recall and F1 with the module's empty-set rule."""
    precision = tp / (tp + fp) if tp + fp else float(fn == 0)
    recall = tp / (tp + fn) if tp + fn else float(fp == 0)
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    return {"tp": int(tp), "fp": int(fp), "fn": int(fn)} | {
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
    }


def _as_rows(values: ArrayLike, width: int) -> NDArray[np.float64]:
    """``values`` as an (n, width) float array; empty input gives (0, width)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, width))
    if arr.ndim != 2 or arr.shape[1] != width:
        raise ValueError(f"expected shape (n, {width}), got {arr.shape}")
    return arr


def _as_points(points: ArrayLike) -> NDArray[np.float64]:
    return _as_rows(points, 2)


def _sparse_assignment(
    rows: NDArray[np.intp],
    cols: NDArray[np.intp],
    cost: NDArray[np.float64],
    *,
    cardinality_first: bool = True,
) -> NDArray[np.intp]:
    """Optimal one-to-one assignment on a sparse bipartite graph.

    ``rows[e], cols[e], cost[e]`` list the permitted (distinct) edges; every
    other pair is forbidden. The graph is split into connected components;
    single-edge components are matched directly and the others are solved
    exactly with :func:`scipy.optimize.linear_sum_assignment`.

    With ``cardinality_first`` the matching has the largest possible number of
    pairs and, among those, the least total cost. Otherwise costs must be
    negative and the total cost alone is minimised (forbidden pairs cost 0).
    Returns the indices ``e`` of the matched edges, ascending.
    """
    rows, cols = np.asarray(rows, dtype=np.intp), np.asarray(cols, dtype=np.intp)
    cost = np.asarray(cost, dtype=np.float64)
    if rows.size == 0:
        return np.zeros(0, dtype=np.intp)
    row_ids, r = np.unique(rows, return_inverse=True)
    col_ids, c = np.unique(cols, return_inverse=True)
    n_r, n_c = row_ids.size, col_ids.size
    graph = coo_matrix((np.ones(r.size), (r, n_r + c)), shape=(n_r + n_c, n_r + n_c))
    _, comp = connected_components(graph, directed=False)
    edge_comp = comp[r]
    order = np.argsort(edge_comp, kind="stable")
    bounds = np.flatnonzero(np.diff(edge_comp[order])) + 1
    groups = np.split(order, bounds)
    matched = [g for g in groups if g.size == 1]
    for edges in (g for g in groups if g.size > 1):
        er, ec, ew = r[edges], c[edges], cost[edges]
        ur, lr = np.unique(er, return_inverse=True)
        uc, lc = np.unique(ec, return_inverse=True)
        if cardinality_first:
            ew = ew - ew.min()
            # A full assignment uses at most min(n) permitted edges, each costing
            # at most ew.max(): one more forbidden pair always costs more.
            forbidden = min(ur.size, uc.size) * ew.max() + 1.0
        else:
            forbidden = 0.0
        mat = np.full((ur.size, uc.size), forbidden)
        mat[lr, lc] = ew
        eidx = np.full(mat.shape, -1, dtype=np.intp)
        eidx[lr, lc] = edges
        ri, ci = linear_sum_assignment(mat)
        e = eidx[ri, ci]
        matched.append(e[e >= 0])
    return np.sort(np.concatenate(matched))


def hit_in_mask(
    pred_points: ArrayLike,
    true_labels: ArrayLike,
    *,
    scores: ArrayLike | None = None,
) -> dict[str, object]:
    """Detection counts for points against an instance label map.

    A predicted point inside a true nucleus that no earlier point has hit is a
    true positive; a further point in an already-hit nucleus, a point on
    background (label 0) and a point outside the image are false positives;
    nuclei never hit are false negatives.

    Parameters
    ----------
    pred_points : array_like, shape (n, 2)
        Predicted ``(x, y)`` positions, rounded to the nearest pixel.
    true_labels : array_like of int, shape (h, w)
        Instance label map, 0 = background; ids need not be consecutive.
    scores : array_like, shape (n,), optional
        Confidence of each point. Points are processed in descending score order
        (ties keep input order), so the highest-scoring point in a nucleus is
        the true positive. Without scores the input order is used.

    Returns
    -------
    dict
        ``tp, fp, fn, precision, recall, f1`` (empty-set rule in module doc)
        and ``pred_is_tp``, a bool array (input order) marking the points
        counted as true positives.
    """
    labels = np.asarray(true_labels)
    if labels.ndim != 2:
        raise ValueError(f"true_labels must be 2-D, got shape {labels.shape}")
    pts = _as_points(pred_points)
    if scores is not None:
        s = np.asarray(scores, dtype=np.float64)
        if s.shape != (len(pts),):
            raise ValueError("scores must have one value per point")
        order = np.argsort(-s, kind="stable")
    else:
        order = np.arange(len(pts))
    xy = np.floor(pts[order] + 0.5).astype(np.int64)  # round half up
    h, w = labels.shape
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)
    hit = np.zeros(len(xy), dtype=np.int64)
    hit[inside] = labels[xy[inside, 1], xy[inside, 0]]
    hit_ids, first = np.unique(hit, return_index=True)
    first = first[hit_ids != 0]  # first point (in processing order) per nucleus
    is_tp = np.zeros(len(xy), dtype=bool)
    is_tp[order[first]] = True
    tp = int(first.size)
    n_true = np.unique(labels[labels != 0]).size
    out: dict[str, object] = dict(_prf(tp, len(xy) - tp, n_true - tp))
    out["pred_is_tp"] = is_tp
    return out


def radius_um_to_px(radius_um: float, *, mpp: float) -> float:
    """Convert a radius in microns to pixels given microns per pixel ``mpp``."""
    if mpp <= 0:
        raise ValueError("mpp must be positive")
    return float(radius_um) / float(mpp)


@dataclass(frozen=True)
class PointMatch:
    """Result of :func:`match_points_within_radius`.

    ``pairs`` holds matched ``(pred_index, true_index)`` rows sorted by pred
    index, ``distances`` their lengths in pixels, ``pred_is_tp`` flags matched
    predictions (with ``pred_scores`` this feeds :func:`average_precision`),
    ``n_true`` counts true points; the rest as in the module doc.
    """

    pairs: NDArray[np.intp]
    distances: NDArray[np.float64]
    pred_is_tp: NDArray[np.bool_]
    n_true: int
    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    pred_scores: NDArray[np.float64] | None = field(default=None)

    def as_dict(self) -> dict[str, float]:
        """The scalar fields as a plain dict."""
        keys = ("tp", "fp", "fn", "precision", "recall", "f1")
        return {k: getattr(self, k) for k in keys}


def match_points_within_radius(
    pred: ArrayLike,
    true: ArrayLike,
    *,
    radius: float | None = None,
    radius_um: float | None = None,
    mpp: float | None = None,
    pred_scores: ArrayLike | None = None,
) -> PointMatch:
    """One-to-one matching of predicted to true points within a radius.

    Pairs farther apart than ``radius`` (``d > radius``) are forbidden. The
    assignment is the Hungarian solution that (1) matches as many pairs as
    possible, then, if ``pred_scores`` is given, (2) prefers higher-scoring
    predictions (least sum of score ranks), then (3) has the least total
    distance. Each connected group of nearby points is solved separately.

    Parameters
    ----------
    pred, true : array_like, shape (n, 2)
        Point coordinates in pixels.
    radius : float, optional
        Matching radius in pixels.
    radius_um, mpp : float, optional
        Alternative to ``radius``: radius in microns and microns per pixel.
    pred_scores : array_like, shape (n_pred,), optional
        Confidence of each prediction (used as tie-break (2) and kept on the
        result for :func:`average_precision`).

    Returns
    -------
    PointMatch
    """
    if (radius is None) == (radius_um is None):
        raise ValueError("give exactly one of radius= or radius_um= (with mpp=)")
    if radius is None:
        if mpp is None:
            raise ValueError("radius_um= needs mpp=")
        radius = radius_um_to_px(radius_um, mpp=mpp)  # type: ignore[arg-type]
    p, t = _as_points(pred), _as_points(true)
    scores = None
    if pred_scores is not None:
        scores = np.asarray(pred_scores, dtype=np.float64)
        if scores.shape != (len(p),):
            raise ValueError("pred_scores must have one value per prediction")
    rows = cols = np.zeros(0, dtype=np.intp)
    dist = np.zeros(0)
    if len(p) and len(t):
        # output_type="ndarray" keeps zero-distance (coincident) pairs.
        sdm = cKDTree(p).sparse_distance_matrix(cKDTree(t), radius, output_type="ndarray")
        rows, cols = sdm["i"].astype(np.intp), sdm["j"].astype(np.intp)
        dist = sdm["v"].astype(np.float64)
    cost = dist / radius if radius > 0 else np.zeros_like(dist)
    if scores is not None and cost.size:
        rank = rankdata(-scores, method="dense") - 1.0  # 0 = best score
        cost = cost + (min(len(p), len(t)) + 1.0) * rank[rows]
    e = _sparse_assignment(rows, cols, cost)
    e = e[np.argsort(rows[e], kind="stable")]
    mr, mc = rows[e], cols[e]
    pairs = np.stack([mr, mc], axis=1) if mr.size else np.zeros((0, 2), dtype=np.intp)
    d = np.hypot(*(p[mr] - t[mc]).T) if mr.size else np.zeros(0)
    is_tp = np.zeros(len(p), dtype=bool)
    is_tp[mr] = True
    tp = int(mr.size)
    stats = _prf(tp, len(p) - tp, len(t) - tp)
    return PointMatch(
        pairs=pairs, distances=d, pred_is_tp=is_tp, n_true=len(t), pred_scores=scores, **stats
    )


def box_iou(boxes_a: ArrayLike, boxes_b: ArrayLike) -> NDArray[np.float64]:
    """Pairwise IoU between two sets of ``(x0, y0, x1, y1)`` boxes, shape (n_a, n_b)."""
    a, b = _as_rows(boxes_a, 4), _as_rows(boxes_b, 4)
    ix = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    iy = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(ix, 0, None) * np.clip(iy, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def match_boxes(
    pred_boxes: ArrayLike, true_boxes: ArrayLike, *, iou_threshold: float = 0.5
) -> dict[str, float]:
    """One-to-one box matching by Hungarian assignment on IoU.

    A pair may match when ``IoU >= iou_threshold`` (the COCO convention); the
    matching maximises the number of pairs, then the total IoU.

    Returns
    -------
    dict
        ``tp, fp, fn, precision, recall, f1``.
    """
    iou = box_iou(pred_boxes, true_boxes)
    rows, cols = np.nonzero(iou >= iou_threshold)
    tp = int(_sparse_assignment(rows, cols, 1.0 - iou[rows, cols]).size)
    return _prf(tp, iou.shape[0] - tp, iou.shape[1] - tp)


def precision_recall_curve(
    scores: ArrayLike, is_tp: ArrayLike, n_true: int
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Precision and recall at every distinct score threshold.

    Detections are sorted by descending score; tied scores enter together.
    Entry ``i`` is for keeping detections with ``score >= thresholds[i]``.

    Parameters
    ----------
    scores : array_like, shape (n,)
        Detection confidences.
    is_tp : array_like of bool, shape (n,)
        Whether each detection was matched to a true object.
    n_true : int
        Number of true objects (including those never detected).

    Returns
    -------
    precision, recall, thresholds : ndarray
        Each of length = number of distinct scores (descending thresholds).
        Recall is 0 throughout when ``n_true == 0``.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    tp_flags = np.asarray(is_tp, dtype=bool).ravel()
    if s.shape != tp_flags.shape:
        raise ValueError("scores and is_tp must have the same length")
    if tp_flags.sum() > n_true:
        raise ValueError("more true positives than n_true")
    order = np.argsort(-s, kind="stable")
    s, tp_flags = s[order], tp_flags[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1] if s.size else np.zeros(0, int)
    ctp = np.cumsum(tp_flags)[last].astype(np.float64)
    n_kept = (last + 1).astype(np.float64)
    precision = ctp / n_kept if s.size else np.zeros(0)
    recall = ctp / n_true if n_true > 0 else np.zeros_like(ctp)
    return precision, recall, s[last]


def average_precision(
    scores: ArrayLike,
    is_tp: ArrayLike,
    n_true: int,
    *,
    interpolation: Literal["all", "coco101"] = "all",
) -> float:
    """Area under the interpolated precision-recall curve.

    ``interpolation="all"`` (default) is the PASCAL VOC 2010+ all-point
    interpolation: precision is replaced by its running maximum from the right
    (``p_interp(r) = max_{r' >= r} p(r')``) and summed over every recall step,
    ``AP = sum_k (r_k - r_{k-1}) p_interp(r_k)``. ``"coco101"`` is the COCO
    101-point mean of ``p_interp`` at recall ``0, 0.01, ..., 1``.

    Edge cases: ``n_true == 0`` gives 1.0 when there are no detections and 0.0
    otherwise; no detections with ``n_true > 0`` gives 0.0.
    """
    precision, recall, _ = precision_recall_curve(scores, is_tp, n_true)
    if n_true == 0:
        return 1.0 if precision.size == 0 else 0.0
    if precision.size == 0:
        return 0.0
    p_interp = np.maximum.accumulate(precision[::-1])[::-1]
    if interpolation == "all":
        steps = np.diff(np.r_[0.0, recall])
        return float(np.sum(steps * p_interp))
    if interpolation == "coco101":
        grid = np.linspace(0.0, 1.0, 101)
        idx = np.searchsorted(recall, grid, side="left")
        vals = np.where(idx < recall.size, p_interp[np.minimum(idx, recall.size - 1)], 0.0)
        return float(vals.mean())
    raise ValueError(f"unknown interpolation {interpolation!r}")


def roc_auc(scores: ArrayLike, is_tp: ArrayLike) -> float:
    """Area under the ROC curve of ``scores`` separating TPs from FPs.

    Computed as the Mann-Whitney statistic: the probability that a random true
    positive outscores a random false positive, ties counting one half (equal to
    ``sklearn.metrics.roc_auc_score``). Returns ``nan`` when only one class is
    present.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(is_tp, dtype=bool).ravel()
    if s.shape != y.shape:
        raise ValueError("scores and is_tp must have the same length")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def mean_average_precision_boxes(
    pred_boxes: ArrayLike,
    pred_scores: ArrayLike,
    true_boxes: ArrayLike,
    *,
    iou_thresholds: ArrayLike | None = None,
    interpolation: Literal["all", "coco101"] = "all",
) -> dict[str, object]:
    """Box AP averaged over IoU thresholds for one image (COCO matching).

    At each threshold predictions are taken in descending score order and each
    is matched, greedily, to the not-yet-matched true box of highest IoU if
    that IoU is ``>= threshold`` (as ``pycocotools`` does); then
    :func:`average_precision` is computed with the given ``interpolation``.

    Parameters
    ----------
    pred_boxes : array_like, shape (n, 4)
    pred_scores : array_like, shape (n,)
    true_boxes : array_like, shape (m, 4)
    iou_thresholds : array_like, optional
        Default ``0.50, 0.55, ..., 0.95``.
    interpolation : {"all", "coco101"}

    Returns
    -------
    dict
        ``map`` (mean AP), ``ap`` (AP per threshold), ``iou_thresholds``.
    """
    thr = (
        np.round(np.linspace(0.5, 0.95, 10), 2)
        if iou_thresholds is None
        else np.asarray(iou_thresholds, dtype=np.float64).ravel()
    )
    s = np.asarray(pred_scores, dtype=np.float64).ravel()
    iou = box_iou(pred_boxes, true_boxes)
    if s.shape != (iou.shape[0],):
        raise ValueError("pred_scores must have one value per box")
    order = np.argsort(-s, kind="stable")
    aps = np.empty(thr.size)
    for k, t in enumerate(thr):
        taken = np.zeros(iou.shape[1], dtype=bool)
        is_tp = np.zeros(iou.shape[0], dtype=bool)
        for i in order:
            cand = np.where(taken, -1.0, iou[i])
            if cand.size and cand.max() >= t:
                j = int(np.argmax(cand))
                taken[j] = is_tp[i] = True
        aps[k] = average_precision(s, is_tp, iou.shape[1], interpolation=interpolation)
    return {"map": float(aps.mean()), "ap": aps, "iou_thresholds": thr}
