"""Hand-checked examples for benchmark.metrics.detection."""

import numpy as np
import pytest

from benchmark.metrics import (
    average_precision,
    box_iou,
    hit_in_mask,
    match_boxes,
    match_points_within_radius,
    mean_average_precision_boxes,
    precision_recall_curve,
    radius_um_to_px,
    roc_auc,
)


def _labels_6x6():
    lab = np.zeros((6, 6), dtype=np.int32)
    lab[0:2, 0:2] = 3  # nucleus 3: x 0-1, y 0-1
    lab[3:5, 3:5] = 7  # nucleus 7: x 3-4, y 3-4
    lab[0, 5] = 12  # nucleus 12: single pixel at x=5, y=0
    return lab


# ---------------------------------------------------------------- hit_in_mask


def test_hit_in_mask_counts():
    # (0,0) -> nucleus 3 TP; (1,1) -> nucleus 3 again FP; (4,4) -> nucleus 7 TP;
    # (2,5) -> labels[5,2] = 0 background FP; (10,10) outside the image FP.
    # Nucleus 12 never hit -> FN.  tp=2, fp=3, fn=1
    # precision 2/5, recall 2/3, f1 = 2*2/(2*2+3+1) = 4/8
    pts = [(0, 0), (1, 1), (4, 4), (2, 5), (10, 10)]
    r = hit_in_mask(pts, _labels_6x6())
    assert (r["tp"], r["fp"], r["fn"]) == (2, 3, 1)
    assert r["precision"] == pytest.approx(0.4)
    assert r["recall"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(0.5)
    assert r["pred_is_tp"].tolist() == [True, False, True, False, False]


def test_hit_in_mask_score_order_decides_which_point_is_tp():
    # Both points fall in nucleus 3; the higher score (second point) wins.
    r = hit_in_mask([(0, 0), (1, 1)], _labels_6x6(), scores=[0.1, 0.9])
    assert r["pred_is_tp"].tolist() == [False, True]
    assert (r["tp"], r["fp"], r["fn"]) == (1, 1, 2)


def test_hit_in_mask_rounds_half_up_and_uses_xy_order():
    lab = np.zeros((3, 3), dtype=int)
    lab[0, 1] = 4  # x=1, y=0
    assert hit_in_mask([(0.5, 0.0)], lab)["tp"] == 1  # floor(0.5 + 0.5) = 1
    assert hit_in_mask([(0.49, 0.0)], lab)["tp"] == 0  # rounds to x=0
    assert hit_in_mask([(0.0, 1.0)], lab)["tp"] == 0  # (y, x) swapped would hit


def test_hit_in_mask_points_past_the_bottom_or_right_of_a_wide_or_tall_map():
    # a 3 x 8 map (rows, cols): y = 5 is below it, though 5 < its width
    wide = np.zeros((3, 8), dtype=int)
    wide[2, 5] = 1
    r = hit_in_mask([(5, 2), (2, 5), (7.4, 2.4)], wide)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 2, 0)
    # and its transpose: x = 5 is right of an 8 x 3 map
    r = hit_in_mask([(2, 5), (5, 2), (2.4, 7.4)], wide.T)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 2, 0)


def test_hit_in_mask_empty_cases():
    lab = _labels_6x6()
    r = hit_in_mask(np.zeros((0, 2)), lab)  # nothing predicted, 3 nuclei
    assert (r["tp"], r["fp"], r["fn"], r["precision"], r["recall"], r["f1"]) == (0, 0, 3, 0, 0, 0)
    r = hit_in_mask([(1, 1)], np.zeros((4, 4), int))  # no nuclei, 1 point
    assert (r["fp"], r["precision"], r["recall"], r["f1"]) == (1, 0, 0, 0)
    r = hit_in_mask([], np.zeros((4, 4), int))  # both empty: defined as perfect
    assert (r["precision"], r["recall"], r["f1"]) == (1.0, 1.0, 1.0)


# ------------------------------------------------------ radius point matching


def test_hungarian_beats_greedy_nearest():
    # T0=(0,0), T1=(7,0); P0=(4,0): d(P0,T0)=4, d(P0,T1)=3; P1=(11.5,0): d(P1,T1)=4.5,
    # d(P1,T0)=11.5 > 5 forbidden. Greedy nearest takes P0-T1 (3) and leaves 1 match;
    # the maximum matching is P0-T0 (4) + P1-T1 (4.5).
    m = match_points_within_radius([(4, 0), (11.5, 0)], [(0, 0), (7, 0)], radius=5)
    assert m.pairs.tolist() == [[0, 0], [1, 1]]
    assert m.distances.tolist() == pytest.approx([4.0, 4.5])
    assert (m.tp, m.fp, m.fn, m.f1) == (2, 0, 0, 1.0)


def test_radius_is_inclusive_and_microns():
    # (3,4) to (0,0) is exactly 5 px
    assert match_points_within_radius([(3, 4)], [(0, 0)], radius=5).tp == 1
    assert match_points_within_radius([(3, 4)], [(0, 0)], radius=4.99).tp == 0
    # 2.5 um at 0.5 um/px = 5 px
    assert radius_um_to_px(2.5, mpp=0.5) == 5.0
    assert match_points_within_radius([(3, 4)], [(0, 0)], radius_um=2.5, mpp=0.5).tp == 1
    assert match_points_within_radius([(3, 4)], [(0, 0)], radius_um=2.5, mpp=0.6).tp == 0
    with pytest.raises(ValueError):
        match_points_within_radius([(0, 0)], [(0, 0)], radius=1, radius_um=1, mpp=1)
    with pytest.raises(ValueError):
        match_points_within_radius([(0, 0)], [(0, 0)], radius_um=1)


def test_scores_break_ties_between_candidates():
    # One true point at the origin; P0 at distance 1 (score 0.2), P1 at 2 (score 0.9).
    pred, true = [(1, 0), (2, 0)], [(0, 0)]
    assert match_points_within_radius(pred, true, radius=3).pred_is_tp.tolist() == [True, False]
    m = match_points_within_radius(pred, true, radius=3, pred_scores=[0.2, 0.9])
    assert m.pred_is_tp.tolist() == [False, True]
    assert (m.tp, m.fp, m.fn) == (1, 1, 0)
    # ... but never at the expense of the number of matches: P0 (high score) can reach
    # T0 and T1, P1 only T0, so P0 must take T1.
    m = match_points_within_radius(
        [(5, 0), (1, 0)], [(0, 0), (10, 0)], radius=5.5, pred_scores=[0.9, 0.1]
    )
    assert m.pairs.tolist() == [[0, 1], [1, 0]]


def test_point_matching_coincident_and_empty():
    m = match_points_within_radius([(2, 2), (9, 9)], [(2, 2)], radius=1)
    assert m.pairs.tolist() == [[0, 0]] and m.distances.tolist() == [0.0]
    # precision 1/2, recall 1/1, f1 = 2/(2+1+0)
    assert (m.precision, m.recall, m.f1) == pytest.approx((0.5, 1.0, 2 / 3))
    m = match_points_within_radius([], [(0, 0), (1, 1)], radius=2)
    assert (m.tp, m.fn, m.f1, m.pairs.shape) == (0, 2, 0.0, (0, 2))
    m = match_points_within_radius([], [], radius=2)
    assert m.as_dict() == {"tp": 0, "fp": 0, "fn": 0, "precision": 1.0, "recall": 1.0, "f1": 1.0}


# --------------------------------------------------------------------- boxes


def test_box_iou_and_match_boxes():
    true = [(0, 0, 10, 10), (20, 0, 30, 10)]
    # p0 covers the top half of A: IoU = 50/100 = 0.5; p1 == B: IoU 1; p2 far away
    pred = [(0, 0, 10, 5), (20, 0, 30, 10), (50, 50, 60, 60)]
    assert box_iou(pred, true).tolist() == [[0.5, 0.0], [0.0, 1.0], [0.0, 0.0]]
    r = match_boxes(pred, true)  # IoU >= 0.5 matches: tp 2, fp 1, fn 0, f1 4/5
    assert (r["tp"], r["fp"], r["fn"], r["f1"]) == (2, 1, 0, pytest.approx(0.8))
    r = match_boxes(pred, true, iou_threshold=0.6)  # tp 1, fp 2, fn 1, f1 2/5
    assert (r["tp"], r["fp"], r["fn"], r["f1"]) == (1, 2, 1, pytest.approx(0.4))


def test_match_boxes_is_optimal_not_greedy():
    # A=(0,0,10,10), B=(5,0,15,10). p0=(2,0,12,10): IoU(A)=80/120=.667, IoU(B)=70/130=.538;
    # p1=(0,0,9,10): IoU(A)=90/100=.9, IoU(B)=40/150=.267 < .5. Greedy p0->A leaves p1
    # unmatched; the optimal matching is p0-B, p1-A.
    r = match_boxes([(2, 0, 12, 10), (0, 0, 9, 10)], [(0, 0, 10, 10), (5, 0, 15, 10)])
    assert (r["tp"], r["fp"], r["fn"]) == (2, 0, 0)


# ------------------------------------------------------------ AP, PR and ROC


def test_precision_recall_curve_and_ap():
    # sorted detections TP, FP, TP, FP with 3 true objects:
    # precision 1/1, 1/2, 2/3, 2/4; recall 1/3, 1/3, 2/3, 2/3
    scores, is_tp = [0.9, 0.8, 0.7, 0.6], [True, False, True, False]
    p, r, thr = precision_recall_curve(scores, is_tp, 3)
    assert p.tolist() == pytest.approx([1, 1 / 2, 2 / 3, 2 / 4])
    assert r.tolist() == pytest.approx([1 / 3, 1 / 3, 2 / 3, 2 / 3])
    assert thr.tolist() == [0.9, 0.8, 0.7, 0.6]
    # all-point: interpolated precision 1, 2/3, 2/3, 1/2; recall steps 1/3, 0, 1/3, 0
    # AP = 1/3 * 1 + 1/3 * 2/3 = 5/9
    assert average_precision(scores, is_tp, 3) == pytest.approx(5 / 9)
    # input order must not matter
    assert average_precision(scores[::-1], is_tp[::-1], 3) == pytest.approx(5 / 9)
    # COCO 101-point: r=0.00..0.33 (34 points) -> 1; r=0.34..0.66 (33) -> 2/3;
    # r=0.67..1.00 (34) -> 0.  (34 + 22) / 101 = 56/101
    coco = average_precision(scores, is_tp, 3, interpolation="coco101")
    assert coco == pytest.approx(56 / 101)


def test_ap_ties_and_edge_cases():
    # two detections with the same score enter together: precision 1/2 at recall 1
    assert average_precision([0.9, 0.9], [True, False], 1) == pytest.approx(0.5)
    assert average_precision([0.9, 0.9], [False, True], 1) == pytest.approx(0.5)
    assert average_precision([], [], 2) == 0.0  # nothing detected
    assert average_precision([], [], 0) == 1.0  # nothing to detect, nothing detected
    assert average_precision([0.5], [False], 0) == 0.0
    with pytest.raises(ValueError):
        average_precision([0.5, 0.4], [True, True], 1)  # more TPs than true objects


def test_roc_auc():
    # positives 0.9, 0.7, 0.6; negatives 0.8, 0.5. Pairs won by the positive:
    # .9>.8, .9>.5, .7>.5, .6>.5 -> 4 of 6
    assert roc_auc([0.9, 0.8, 0.7, 0.6, 0.5], [1, 0, 1, 1, 0]) == pytest.approx(4 / 6)
    assert roc_auc([0.5, 0.5], [1, 0]) == pytest.approx(0.5)  # tie counts 1/2
    assert np.isnan(roc_auc([0.1, 0.2], [1, 1]))


def test_roc_auc_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    s = np.round(rng.random(200), 1)  # many ties
    y = rng.random(200) < s
    assert roc_auc(s, y) == pytest.approx(metrics.roc_auc_score(y, s))


def test_mean_average_precision_boxes():
    # A=(0,0,10,10), B=(20,0,30,10).  By score: p1=(0,0,10,6) .8 [IoU(A)=.6],
    # p2=B .7 [IoU 1], p0=A .5 [IoU 1].
    # t in {.50,.55,.60}: p1 TP(A), p2 TP(B), p0 FP (A taken) -> P 1,1,2/3 R .5,1,1 -> AP 1
    # t in {.65,...,.95} (7): p1 FP, p2 TP, p0 TP -> P 0,1/2,2/3 R 0,.5,1 -> AP 2/3
    # mAP = (3*1 + 7*2/3)/10 = 23/30
    true = [(0, 0, 10, 10), (20, 0, 30, 10)]
    pred = [(0, 0, 10, 10), (0, 0, 10, 6), (20, 0, 30, 10)]
    r = mean_average_precision_boxes(pred, [0.5, 0.8, 0.7], true)
    assert r["ap"].tolist() == pytest.approx([1, 1, 1] + [2 / 3] * 7)
    assert r["map"] == pytest.approx(23 / 30)
    r = mean_average_precision_boxes(pred, [0.5, 0.8, 0.7], true, iou_thresholds=[0.5])
    assert r["map"] == pytest.approx(1.0)
