"""Instance segmentation metrics on integer label maps.

Label maps are 2-D (or N-D) integer arrays of equal shape; 0 is background and
object ids are arbitrary non-negative integers (not necessarily consecutive).
Float maps holding whole numbers are accepted; boolean masks are rejected
(label them first, e.g. with ``skimage.measure.label``).
Every metric is built on :func:`label_overlap`, which computes the sparse
true-by-pred contingency table in one ``np.bincount`` pass.

Matching convention: a true and a predicted object *match* at threshold ``t``
when ``IoU > t`` (strictly greater, as in the DSB2018 and PQ definitions). For
``t >= 0.5`` such matches are automatically one-to-one; below 0.5 a Hungarian
assignment picks the largest set of pairs, then the largest total IoU.

Empty inputs: when both maps have no objects every score is 1.0 (perfect
agreement); when exactly one is empty the scores are 0.0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .detection import _prf, _sparse_assignment, hit_in_mask

_DENSE_LIMIT = 1 << 24  # largest (n_true + 1) * (n_pred + 1) table built densely


def _check_labels(true: ArrayLike, pred: ArrayLike) -> tuple[NDArray, NDArray]:
    t, p = np.asarray(true), np.asarray(pred)
    if t.shape != p.shape:
        raise ValueError(f"label maps differ in shape: {t.shape} vs {p.shape}")
    out = []
    for name, a in (("true", t), ("pred", p)):
        if a.dtype == bool or not (
            np.issubdtype(a.dtype, np.integer)
            or (np.issubdtype(a.dtype, np.floating) and np.all(a == np.round(a)))
        ):
            raise TypeError(f"{name} must be an integer label map, got dtype {a.dtype}")
        a = a.astype(np.int64, copy=False).ravel()
        if a.size and a.min() < 0:
            raise ValueError(f"{name} has negative labels")
        out.append(a)
    return out[0], out[1]


def _relabel(x: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray]:
    """Object ids (no 0), their areas, and ``x`` mapped to 0 (bg), 1..n."""
    if x.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), x
    if x.max() <= max(1 << 16, 4 * x.size):
        counts = np.bincount(x)
        ids = np.flatnonzero(counts)
        ids = ids[ids != 0]
        lut = np.zeros(counts.size, np.int64)
        lut[ids] = np.arange(1, ids.size + 1)
        return ids, counts[ids], lut[x]
    ids, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    if ids[0] == 0:
        return ids[1:], counts[1:], inv.ravel()
    return ids, counts, inv.ravel() + 1


@dataclass(frozen=True)
class LabelOverlap:
    """Sparse contingency table between a true and a predicted label map.

    Attributes
    ----------
    true_ids, pred_ids : ndarray
        Object ids present (background excluded), ascending.
    true_area, pred_area : ndarray
        Pixel count of each object.
    ti, pj : ndarray of int
        Indices (into ``true_ids`` / ``pred_ids``) of every overlapping pair.
    intersection : ndarray
        Overlap in pixels of each pair (all > 0).
    """

    true_ids: NDArray[np.int64]
    pred_ids: NDArray[np.int64]
    true_area: NDArray[np.int64]
    pred_area: NDArray[np.int64]
    ti: NDArray[np.intp]
    pj: NDArray[np.intp]
    intersection: NDArray[np.int64]

    @property
    def union(self) -> NDArray[np.int64]:
        """Union in pixels of each overlapping pair."""
        return self.true_area[self.ti] + self.pred_area[self.pj] - self.intersection

    @property
    def iou(self) -> NDArray[np.float64]:
        """IoU of each overlapping pair."""
        return self.intersection / self.union

    def matrix(self, kind: str = "iou") -> NDArray[np.float64]:
        """Dense ``(n_true, n_pred)`` matrix of ``"iou"`` or ``"intersection"``."""
        vals = {"iou": self.iou, "intersection": self.intersection}[kind]
        out = np.zeros((self.true_ids.size, self.pred_ids.size))
        out[self.ti, self.pj] = vals
        return out


def label_overlap(true: ArrayLike, pred: ArrayLike) -> LabelOverlap:
    """Intersections and areas of all object pairs of two label maps.

    Objects are relabelled to ``1..n`` and the paired code
    ``t * (n_pred + 1) + p`` is counted with ``np.bincount`` (or ``np.unique``
    when that table would be too large), so the cost is one pass over pixels.
    """
    t, p = _check_labels(true, pred)
    t_ids, t_area, t_lab = _relabel(t)
    p_ids, p_area, p_lab = _relabel(p)
    both = (t_lab > 0) & (p_lab > 0)
    code = t_lab[both] * (p_ids.size + 1) + p_lab[both]
    if (t_ids.size + 1) * (p_ids.size + 1) <= _DENSE_LIMIT:
        counts = np.bincount(code, minlength=(t_ids.size + 1) * (p_ids.size + 1))
        code = np.flatnonzero(counts)
        counts = counts[code]
    else:
        code, counts = np.unique(code, return_counts=True)
    ti, pj = np.divmod(code, p_ids.size + 1)
    return LabelOverlap(
        true_ids=t_ids,
        pred_ids=p_ids,
        true_area=t_area,
        pred_area=p_area,
        ti=(ti - 1).astype(np.intp),
        pj=(pj - 1).astype(np.intp),
        intersection=counts.astype(np.int64),
    )


def _match(ov: LabelOverlap, iou_threshold: float) -> tuple[NDArray, NDArray, NDArray]:
    """Matched (ti, pj, iou) under the module's matching convention."""
    iou = ov.iou
    keep = iou > iou_threshold
    ti, pj, iou = ov.ti[keep], ov.pj[keep], iou[keep]
    if iou_threshold < 0.5 and ti.size:
        e = _sparse_assignment(ti, pj, 1.0 - iou)
        ti, pj, iou = ti[e], pj[e], iou[e]
    return ti, pj, iou


def _f1(ov: LabelOverlap, iou_threshold: float) -> dict[str, float]:
    ti, _, _ = _match(ov, iou_threshold)
    tp = int(ti.size)
    return _prf(tp, ov.pred_ids.size - tp, ov.true_ids.size - tp)


def f1_at_iou(true: ArrayLike, pred: ArrayLike, *, iou_threshold: float = 0.5) -> dict[str, float]:
    """Object F1 where a true and a predicted object match when ``IoU > iou_threshold``.

    Returns
    -------
    dict
        ``tp, fp, fn, precision, recall, f1``; see the module doc for matching
        and empty-map conventions.
    """
    return _f1(label_overlap(true, pred), iou_threshold)


def _dsb_thresholds(thresholds: ArrayLike | None) -> NDArray[np.float64]:
    if thresholds is None:
        return np.round(np.linspace(0.5, 0.95, 10), 2)
    return np.asarray(thresholds, dtype=np.float64).ravel()


def _dsb(ov: LabelOverlap, thresholds: NDArray[np.float64]) -> float:
    vals = []
    for t in thresholds:
        c = _f1(ov, float(t))
        denom = c["tp"] + c["fp"] + c["fn"]
        vals.append(c["tp"] / denom if denom else 1.0)
    return float(np.mean(vals))


def dsb2018_mean_ap(
    true: ArrayLike, pred: ArrayLike, *, thresholds: ArrayLike | None = None
) -> float:
    """Kaggle Data Science Bowl 2018 score for one image.

    ``mean_t TP(t) / (TP(t) + FP(t) + FN(t))`` over ``t = 0.50, 0.55, ..., 0.95``
    (by default), with matches at ``IoU > t``. 1.0 when both maps are empty.
    """
    return _dsb(label_overlap(true, pred), _dsb_thresholds(thresholds))


def _aji(ov: LabelOverlap) -> float:
    n_t, n_p = ov.true_ids.size, ov.pred_ids.size
    if n_t == 0 and n_p == 0:
        return 1.0
    iou, inter, union = ov.iou, ov.intersection, ov.union
    # best pred per true: max IoU, ties to the lowest pred id
    order = np.lexsort((ov.pj, -iou, ov.ti))
    first = order[np.r_[True, np.diff(ov.ti[order]) != 0]] if order.size else order
    c = int(inter[first].sum())
    u = int(union[first].sum())
    unpaired_true = np.ones(n_t, bool)
    unpaired_true[ov.ti[first]] = False
    used = np.zeros(n_p, bool)
    used[ov.pj[first]] = True
    u += int(ov.true_area[unpaired_true].sum()) + int(ov.pred_area[~used].sum())
    return c / u


def aggregated_jaccard_index(true: ArrayLike, pred: ArrayLike) -> float:
    """Aggregated Jaccard Index (Kumar et al., IEEE TMI 2017).

    For each true nucleus ``G_i`` take the predicted object ``S_j`` of largest
    IoU (ties: lowest id); add ``|G_i & S_j|`` to C and ``|G_i | S_j|`` to U
    (a nucleus overlapping no prediction adds ``|G_i|`` to U). Every predicted
    object never chosen adds its area to U. ``AJI = C / U``. A prediction may be
    chosen by several nuclei (that is the original definition; see
    :func:`aji_plus`). 1.0 when both maps are empty.
    """
    return _aji(label_overlap(true, pred))


def _aji_plus(ov: LabelOverlap) -> float:
    n_t, n_p = ov.true_ids.size, ov.pred_ids.size
    if n_t == 0 and n_p == 0:
        return 1.0
    e = _sparse_assignment(ov.ti, ov.pj, -ov.iou, cardinality_first=False)
    mt, mp = ov.ti[e], ov.pj[e]
    c = int(ov.intersection[e].sum())
    u = int((ov.true_area[mt] + ov.pred_area[mp]).sum()) - c
    un_t = np.ones(n_t, bool)
    un_t[mt] = False
    un_p = np.ones(n_p, bool)
    un_p[mp] = False
    u += int(ov.true_area[un_t].sum()) + int(ov.pred_area[un_p].sum())
    return c / u


def aji_plus(true: ArrayLike, pred: ArrayLike) -> float:
    """AJI+ (Graham et al., HoVer-Net, MedIA 2019): AJI with unique pairing.

    True and predicted objects are paired one-to-one by the Hungarian
    assignment maximising the total IoU over overlapping pairs; C and U sum the
    intersections and unions of the pairs, and every unpaired object (true or
    predicted) adds its area to U. 1.0 when both maps are empty.
    """
    return _aji_plus(label_overlap(true, pred))


def dice(true: ArrayLike, pred: ArrayLike) -> float:
    """Pixel-level Dice of the foregrounds (HoVer-Net's "Dice1").

    ``2 |T & P| / (|T| + |P|)`` with ``T, P`` the non-zero pixels; 1.0 when
    both are empty.
    """
    t, p = _check_labels(true, pred)
    return _dice_counts(
        int(np.count_nonzero(t)), int(np.count_nonzero(p)), int(((t > 0) & (p > 0)).sum())
    )


def _dice_counts(n_t: int, n_p: int, n_both: int) -> float:
    return 2.0 * n_both / (n_t + n_p) if n_t + n_p else 1.0


def _pq(ov: LabelOverlap) -> dict[str, float]:
    _, _, iou = _match(ov, 0.5)
    tp = int(iou.size)
    fp, fn = ov.pred_ids.size - tp, ov.true_ids.size - tp
    if tp + fp + fn == 0:
        return {"pq": 1.0, "dq": 1.0, "sq": 1.0, "tp": 0, "fp": 0, "fn": 0}
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = float(iou.mean()) if tp else 0.0
    return {"pq": dq * sq, "dq": dq, "sq": sq, "tp": tp, "fp": fp, "fn": fn}


def panoptic_quality(true: ArrayLike, pred: ArrayLike) -> dict[str, float]:
    """Panoptic quality for one class (Kirillov et al., CVPR 2019).

    Matches are pairs with ``IoU > 0.5`` (unique).
    ``DQ = TP / (TP + FP/2 + FN/2)``, ``SQ`` = mean IoU of the matches
    (0 when there are none), ``PQ = DQ * SQ``. All 1.0 when both maps are
    empty.

    Returns
    -------
    dict
        ``pq, dq, sq, tp, fp, fn``.
    """
    return _pq(label_overlap(true, pred))


def kromp_object_categories(
    true: ArrayLike, pred: ArrayLike, *, iou_threshold: float = 0.5, min_overlap: float = 0.5
) -> dict[str, float]:
    """Object error categories after Kromp et al., Sci Data 2020.

    The paper reports true positives, false negatives/positives, split
    (over-segmented) and merged (under-segmented) nuclei. The exact rules
    implemented here are:

    * **match**: a true and a predicted object with ``IoU > iou_threshold``
      (0.5, so matches are unique).
    * **fragment** of true ``T``: a predicted ``P`` with
      ``|P & T| >= min_overlap * |P|`` (at least half of ``P`` lies in ``T``).
    * **covered** true ``T`` of predicted ``P``: ``|P & T| >= min_overlap * |T|``
      (``P`` covers at least half of ``T``).

    Each true nucleus gets exactly one category, first that applies:
    ``tp`` (matched); ``split`` (has >= 2 fragments); ``merged`` (covered by a
    predicted object that covers >= 2 true nuclei); ``fn``. Each predicted
    object likewise: ``tp`` (matched); ``merge_objects`` (covers >= 2 true
    nuclei); ``split_fragments`` (one of >= 2 fragments of a true nucleus);
    ``fp``. A matched prediction that also covers a second nucleus stays
    ``tp`` while that second nucleus is ``merged``.

    Returns
    -------
    dict
        Counts ``n_true, n_pred, tp, split, merged, fn`` (true side,
        ``tp + split + merged + fn == n_true``), ``merge_objects,
        split_fragments, fp`` (pred side, with ``tp`` they sum to ``n_pred``),
        and rates ``tp_rate, split_rate, merge_rate, fn_rate`` (over
        ``n_true``) and ``fp_rate`` (over ``n_pred``); a rate with a zero
        denominator is 0.0.
    """
    ov = label_overlap(true, pred)
    n_t, n_p = ov.true_ids.size, ov.pred_ids.size
    mt, mp, _ = _match(ov, iou_threshold)
    t_tp = np.zeros(n_t, bool)
    t_tp[mt] = True
    p_tp = np.zeros(n_p, bool)
    p_tp[mp] = True
    frag = ov.intersection >= min_overlap * ov.pred_area[ov.pj]
    cov = ov.intersection >= min_overlap * ov.true_area[ov.ti]
    n_frag = np.bincount(ov.ti[frag], minlength=n_t)
    n_cov = np.bincount(ov.pj[cov], minlength=n_p)
    merger = cov & (n_cov[ov.pj] >= 2)  # (true, pred) edges of merging preds
    t_merged_any = np.zeros(n_t, bool)
    t_merged_any[ov.ti[merger]] = True
    t_split = ~t_tp & (n_frag >= 2)
    t_merged = ~t_tp & ~t_split & t_merged_any
    t_fn = ~t_tp & ~t_split & ~t_merged
    p_merge = ~p_tp & (n_cov >= 2)
    p_frag_any = np.zeros(n_p, bool)
    p_frag_any[ov.pj[frag & (n_frag[ov.ti] >= 2)]] = True
    p_frag = ~p_tp & ~p_merge & p_frag_any
    p_fp = ~p_tp & ~p_merge & ~p_frag
    tp = int(t_tp.sum())
    out: dict[str, float] = {
        "n_true": n_t,
        "n_pred": n_p,
        "tp": tp,
        "split": int(t_split.sum()),
        "merged": int(t_merged.sum()),
        "fn": int(t_fn.sum()),
        "merge_objects": int(p_merge.sum()),
        "split_fragments": int(p_frag.sum()),
        "fp": int(p_fp.sum()),
    }
    for key, num in (
        ("tp", tp),
        ("split", out["split"]),
        ("merge", out["merged"]),
        ("fn", out["fn"]),
    ):
        out[f"{key}_rate"] = num / n_t if n_t else 0.0
    out["fp_rate"] = out["fp"] / n_p if n_p else 0.0
    return out


def pixel_error_breakdown(
    true: ArrayLike, pred: ArrayLike, *, band_px: float = 3.0
) -> dict[str, int]:
    """Where the foreground's pixel errors lie: near the true outlines or away from them.

    A pixel is in the *band* when it lies within ``band_px`` (Euclidean
    distance, pixels) of the boundary between true foreground and background,
    on either side.  False positives (predicted, not true) and false negatives
    (true, not predicted) in the band are outline placement; those outside it
    are whole nuclei missed or invented, or large parts of them.  The split
    between instances (merges, splits) is not a pixel error here: see
    :func:`kromp_object_categories`.

    Returns
    -------
    dict
        Pixel counts ``true_px, pred_px, fp_px, fn_px, fp_band_px, fn_band_px``
        (sums over images stay meaningful; divide by ``true_px`` for rates).

    Examples
    --------
    >>> t = np.zeros((20, 20), int); t[5:15, 5:15] = 1
    >>> p = np.zeros_like(t); p[5:15, 6:16] = 1; p[0:2, 0:2] = 2
    >>> e = pixel_error_breakdown(t, p, band_px=2)
    >>> e["true_px"], e["fp_px"], e["fn_px"], e["fp_band_px"], e["fn_band_px"]
    (100, 14, 10, 10, 10)
    """
    from scipy import ndimage as ndi

    t, p = _check_labels(true, pred)
    shape = np.shape(true)
    tf, pf = (t > 0).reshape(shape), (p > 0).reshape(shape)
    fp, fn = pf & ~tf, tf & ~pf
    if tf.any() and not tf.all():
        # distance to the other side: inside, to the background; outside, to the foreground
        d = np.where(tf, ndi.distance_transform_edt(tf), ndi.distance_transform_edt(~tf))
        band = d <= float(band_px)
    else:
        band = np.zeros(tf.shape, bool)
    return {
        "true_px": int(tf.sum()),
        "pred_px": int(pf.sum()),
        "fp_px": int(fp.sum()),
        "fn_px": int(fn.sum()),
        "fp_band_px": int((fp & band).sum()),
        "fn_band_px": int((fn & band).sum()),
    }


def _centroids(labels: NDArray, ids: NDArray[np.int64]) -> NDArray[np.float64]:
    """``(x, y)`` centroid of each object in ``ids`` (ascending ids)."""
    lab = np.asarray(labels)
    if ids.size == 0:
        return np.zeros((0, 2))
    rows, cols = np.nonzero(lab)
    idx = np.searchsorted(ids, lab[rows, cols])
    area = np.bincount(idx, minlength=ids.size)
    cx = np.bincount(idx, weights=cols, minlength=ids.size) / area
    cy = np.bincount(idx, weights=rows, minlength=ids.size) / area
    return np.stack([cx, cy], axis=1)


def instance_metrics(true: ArrayLike, pred: ArrayLike) -> dict[str, float]:
    """All instance metrics of one image from a single contingency table.

    Returns
    -------
    dict
        ``f1_iou50, precision_iou50, recall_iou50`` (:func:`f1_at_iou` at 0.5),
        ``aji`` (:func:`aggregated_jaccard_index`), ``dice`` (:func:`dice`),
        ``pq, dq, sq`` (:func:`panoptic_quality`), ``map_dsb``
        (:func:`dsb2018_mean_ap`), and ``det_f1``: :func:`hit_in_mask` F1 of the
        predicted objects' centroids (rounded to the nearest pixel) against the
        true label map.
    """
    t_arr, p_arr = np.asarray(true), np.asarray(pred)
    ov = label_overlap(t_arr, p_arr)
    f1 = _f1(ov, 0.5)
    pq = _pq(ov)
    if t_arr.ndim == 2:
        cents = _centroids(p_arr.astype(np.int64), ov.pred_ids)
        det_f1 = float(hit_in_mask(cents, t_arr.astype(np.int64))["f1"])  # type: ignore[arg-type]
    else:
        det_f1 = float("nan")
    return {
        "f1_iou50": f1["f1"],
        "precision_iou50": f1["precision"],
        "recall_iou50": f1["recall"],
        "aji": _aji(ov),
        "dice": _dice_counts(
            int(ov.true_area.sum()), int(ov.pred_area.sum()), int(ov.intersection.sum())
        ),
        "pq": pq["pq"],
        "dq": pq["dq"],
        "sq": pq["sq"],
        "map_dsb": _dsb(ov, _dsb_thresholds(None)),
        "det_f1": det_f1,
    }
