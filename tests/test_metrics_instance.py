"""Hand-checked examples for benchmark.metrics.instance."""

import numpy as np
import pytest

import benchmark.metrics.instance as inst
from benchmark.metrics import (
    aggregated_jaccard_index,
    aji_plus,
    dice,
    dsb2018_mean_ap,
    f1_at_iou,
    instance_metrics,
    kromp_object_categories,
    label_overlap,
    panoptic_quality,
    pixel_error_breakdown,
)


def three_nuclei():
    """10x10, true ids 2, 5, 9; pred ids 1, 4, 40 and a background blob 7.

    T2 rows 0-2 cols 0-2 (9 px)  vs P1  rows 0-2 cols 0-1 (6 px):  I=6, U=9,  IoU 2/3
    T5 rows 0-2 cols 5-8 (12 px) vs P4  rows 0-2 cols 6-9 (12 px): I=9, U=15, IoU 0.6
    T9 rows 6-8 cols 1-3 (9 px)  vs P40 rows 5-8 cols 1-3 (12 px): I=9, U=12, IoU 0.75
    P7 rows 8-9 cols 7-8 (4 px) on background.
    """
    t = np.zeros((10, 10), dtype=np.uint16)
    t[0:3, 0:3] = 2
    t[0:3, 5:9] = 5
    t[6:9, 1:4] = 9
    p = np.zeros((10, 10), dtype=np.int32)
    p[0:3, 0:2] = 1
    p[0:3, 6:10] = 4
    p[5:9, 1:4] = 40
    p[8:10, 7:9] = 7
    return t, p


def test_label_overlap_matrix():
    t, p = three_nuclei()
    ov = label_overlap(t, p)
    assert ov.true_ids.tolist() == [2, 5, 9]
    assert ov.pred_ids.tolist() == [1, 4, 7, 40]
    assert ov.true_area.tolist() == [9, 12, 9]
    assert ov.pred_area.tolist() == [6, 12, 4, 12]
    assert ov.matrix("intersection").tolist() == [[6, 0, 0, 0], [0, 9, 0, 0], [0, 0, 0, 9]]
    np.testing.assert_allclose(
        ov.matrix("iou"), [[2 / 3, 0, 0, 0], [0, 0.6, 0, 0], [0, 0, 0, 0.75]]
    )


def test_label_overlap_large_ids_and_sparse_path(monkeypatch):
    t, p = three_nuclei()
    big_t = np.where(t > 0, t.astype(np.int64) * 10**9, 0)  # np.unique relabel path
    ref = label_overlap(t, p).matrix()
    np.testing.assert_array_equal(label_overlap(big_t, p).matrix(), ref)
    monkeypatch.setattr(inst, "_DENSE_LIMIT", 0)  # np.unique contingency path
    np.testing.assert_array_equal(label_overlap(t, p).matrix(), ref)


def test_three_nuclei_by_hand():
    t, p = three_nuclei()
    # F1@0.5: IoUs 2/3, 0.6, 0.75 all > 0.5 -> tp 3, fp 1 (P7), fn 0
    r = f1_at_iou(t, p)
    assert (r["tp"], r["fp"], r["fn"]) == (3, 1, 0)
    assert r["f1"] == pytest.approx(6 / 7)  # 2*3 / (2*3 + 1 + 0)
    # AJI: C = 6 + 9 + 9 = 24; U = 9 + 15 + 12 + 4 (unused P7) = 40 -> 0.6
    assert aggregated_jaccard_index(t, p) == pytest.approx(0.6)
    assert aji_plus(t, p) == pytest.approx(0.6)  # no conflicts: same pairs
    # Dice: |T|=30, |P|=6+12+12+4=34, |T&P|=24 -> 48/64
    assert dice(t, p) == pytest.approx(0.75)
    # PQ: DQ = 3/(3 + 0.5) = 6/7; SQ = (2/3 + 0.6 + 0.75)/3 = 121/180; PQ = 121/210
    pq = panoptic_quality(t, p)
    assert pq["dq"] == pytest.approx(6 / 7)
    assert pq["sq"] == pytest.approx(121 / 180)
    assert pq["pq"] == pytest.approx(121 / 210)
    # DSB: t=.50,.55 -> 3/(3+1+0)=3/4; t=.60,.65 -> IoU .6 drops: 2/(2+2+1)=2/5;
    # t=.70 -> 1/(1+3+2)=1/6; t>=.75 -> 0 (.75 is not > .75).
    # mean = (3/4+3/4+2/5+2/5+1/6)/10 = 37/150
    assert dsb2018_mean_ap(t, p) == pytest.approx(37 / 150)
    assert dsb2018_mean_ap(t, p, thresholds=[0.5, 0.7]) == pytest.approx((3 / 4 + 1 / 6) / 2)


def test_instance_metrics_three_nuclei():
    t, p = three_nuclei()
    m = instance_metrics(t, p)
    assert set(m) == {
        "f1_iou50",
        "precision_iou50",
        "recall_iou50",
        "aji",
        "dice",
        "pq",
        "dq",
        "sq",
        "map_dsb",
        "det_f1",
    }
    assert m["f1_iou50"] == pytest.approx(6 / 7)
    assert m["precision_iou50"] == pytest.approx(0.75)
    assert m["recall_iou50"] == 1.0
    assert m["aji"] == pytest.approx(0.6)
    assert m["dice"] == pytest.approx(0.75)
    assert m["pq"] == pytest.approx(121 / 210)
    assert m["map_dsb"] == pytest.approx(37 / 150)
    # centroids (x, y): P1 (0.5, 1) -> pixel (1, 1) in T2; P4 (7.5, 1) -> (8, 1) in T5;
    # P40 (2, 6.5) -> (2, 7) in T9; P7 (7.5, 8.5) -> (8, 9) background.
    # tp 3, fp 1, fn 0 -> 6/7
    assert m["det_f1"] == pytest.approx(6 / 7)


def test_relabelling_does_not_change_anything():
    t, p = three_nuclei()
    perm_t = np.select([t == 2, t == 5, t == 9], [77, 3, 1000], 0)
    perm_p = np.select([p == 1, p == 4, p == 40, p == 7], [5, 6, 2, 999999], 0)
    assert instance_metrics(perm_t, perm_p) == pytest.approx(instance_metrics(t, p))


def test_aji_vs_aji_plus_on_a_merge():
    # 1x8 strip: T1 cols 0-3, T2 cols 4-7, one pred P over all 8 px.
    # AJI: both nuclei pick P: C = 4 + 4, U = 8 + 8 -> 1/2.
    # AJI+: P pairs with one nucleus only: C = 4, U = 8 + 4 (unpaired T) -> 1/3.
    t = np.array([[1, 1, 1, 1, 2, 2, 2, 2]])
    p = np.full((1, 8), 3)
    assert aggregated_jaccard_index(t, p) == pytest.approx(0.5)
    assert aji_plus(t, p) == pytest.approx(1 / 3)


def test_aji_takes_each_nucleus_best_prediction_and_the_lowest_id_on_a_tie():
    # 1x20 strip, T1 cols 0-9 (10 px).
    # P7 cols 0-5: IoU 6/10; P8 cols 6-11: IoU 4/12. AJI takes P7: C = 6,
    # U = 10 + 6 (P8 unused) -> 3/8 (P8 instead: 4 / (12 + 6) = 2/9).
    t = np.zeros((1, 20), int)
    t[0, 0:10] = 1
    p = np.zeros((1, 20), int)
    p[0, 0:6], p[0, 6:12] = 7, 8
    assert aggregated_jaccard_index(t, p) == pytest.approx(3 / 8)
    # P5 cols 0-1: I 2, U 10 -> IoU .2; P3 cols 6-19: I 4, U 20 -> IoU .2 too.
    # The tie goes to the lower id, P3: C = 4, U = 20 + 2 (P5 unused) -> 2/11
    # (P5 instead: 2 / (10 + 14) = 1/12).
    p = np.zeros((1, 20), int)
    p[0, 0:2], p[0, 6:20] = 5, 3
    assert aggregated_jaccard_index(t, p) == pytest.approx(2 / 11)


def test_aji_plus_pairs_for_the_largest_total_iou_not_the_most_pairs():
    # 1x12 strip: T1 cols 0-9, T2 cols 10-11; P1 cols 1-10, P2 col 0.
    # IoU T1-P1 9/11, T2-P1 1/11, T1-P2 1/10. The largest total IoU pairs
    # T1-P1 alone: C = 9, U = 11 + 2 (T2) + 1 (P2) -> 9/14; two pairs
    # (T1-P2, T2-P1) would give 2/21.
    t = np.zeros((1, 12), int)
    t[0, 0:10], t[0, 10:12] = 1, 2
    p = np.zeros((1, 12), int)
    p[0, 1:11], p[0, 0] = 1, 2
    assert aji_plus(t, p) == pytest.approx(9 / 14)
    # AJI lets both nuclei take P1: C = 9 + 1, U = 11 + 11 + 1 (P2) -> 10/23
    assert aggregated_jaccard_index(t, p) == pytest.approx(10 / 23)


def test_a_map_against_itself_scores_perfectly():
    # the nuclei lie off the diagonal: a centroid read as (y, x) misses
    t = np.zeros((10, 12), int)
    t[0:3, 6:10] = 4
    t[7:10, 10:12] = 9
    m = instance_metrics(t, t)
    assert all(v == 1.0 for v in m.values()), m


def test_low_threshold_uses_optimal_matching():
    # 1x20 strip: T1 cols 0-3 (4 px), T2 cols 4-11 (8 px);
    # P1 cols 2-8 (7 px): IoU(T1) = 2/9 = .222, IoU(T2) = 5/10 = .5
    # P2 cols 9-13 (5 px): IoU(T2) = 3/10 = .3
    t = np.zeros((1, 20), int)
    t[0, 0:4], t[0, 4:12] = 1, 2
    p = np.zeros((1, 20), int)
    p[0, 2:9], p[0, 9:14] = 1, 2
    # at 0.2, greedy-by-IoU would pair P1-T2 and stop at 1; optimum is P1-T1, P2-T2
    r = f1_at_iou(t, p, iou_threshold=0.2)
    assert (r["tp"], r["fp"], r["fn"], r["f1"]) == (2, 0, 0, 1.0)
    # at 0.25 P1-T1 (.222) is gone: one match -> f1 = 2/(2+1+1)
    r = f1_at_iou(t, p, iou_threshold=0.25)
    assert (r["tp"], r["f1"]) == (1, 0.5)
    # at 0.5 the IoU of exactly .5 does not count (strict >)
    assert f1_at_iou(t, p)["tp"] == 0


def test_kromp_split():
    # one 2x4 nucleus cut into two 2x2 halves: each IoU = 4/8 = .5 (not > .5, no TP);
    # each half lies entirely (>= 50 %) inside the nucleus -> 2 fragments -> split.
    t = np.zeros((4, 6), int)
    t[1:3, 1:5] = 3
    p = np.zeros((4, 6), int)
    p[1:3, 1:3], p[1:3, 3:5] = 10, 11
    k = kromp_object_categories(t, p)
    assert (k["tp"], k["split"], k["merged"], k["fn"]) == (0, 1, 0, 0)
    assert (k["split_fragments"], k["merge_objects"], k["fp"]) == (2, 0, 0)
    assert k["split_rate"] == 1.0 and k["merge_rate"] == 0.0


def test_kromp_merge():
    # two 2x2 nuclei with a 1-column gap, one pred of 2x5 over both:
    # IoU = 4/10 = .4 each (no TP); the pred covers 100 % of both -> merge.
    t = np.zeros((2, 5), int)
    t[:, 0:2], t[:, 3:5] = 4, 8
    p = np.full((2, 5), 1)
    k = kromp_object_categories(t, p)
    assert (k["tp"], k["split"], k["merged"], k["fn"]) == (0, 0, 2, 0)
    assert (k["merge_objects"], k["split_fragments"], k["fp"]) == (1, 0, 0)
    assert k["merge_rate"] == 1.0  # 2 merged / 2 true


def test_kromp_all_categories():
    t = np.zeros((10, 10), int)
    t[0:2, 0:2] = 1  # A: matched exactly by pred 10
    t[0:2, 4:8] = 2  # B: split by preds 20, 21
    t[4:6, 0:2] = 3  # C, D: merged by pred 30 (cols 0-4)
    t[4:6, 3:5] = 5
    t[8:10, 8:10] = 6  # E: missed
    p = np.zeros((10, 10), int)
    p[0:2, 0:2] = 10
    p[0:2, 4:6], p[0:2, 6:8] = 20, 21
    p[4:6, 0:5] = 30
    p[8:10, 0:2] = 40  # on background
    k = kromp_object_categories(t, p)
    # true side: tp A, split B, merged C+D, fn E -> rates 1/5, 1/5, 2/5, 1/5
    assert (k["n_true"], k["tp"], k["split"], k["merged"], k["fn"]) == (5, 1, 1, 2, 1)
    assert (k["tp_rate"], k["split_rate"], k["merge_rate"], k["fn_rate"]) == pytest.approx(
        (0.2, 0.2, 0.4, 0.2)
    )
    # pred side: tp 10, fragments 20+21, merge object 30, fp 40 -> fp_rate 1/5
    assert (k["n_pred"], k["merge_objects"], k["split_fragments"], k["fp"]) == (5, 1, 2, 1)
    assert k["fp_rate"] == pytest.approx(0.2)


def test_kromp_match_takes_precedence_over_merge():
    # a 4x4 nucleus plus a 1-px nucleus, both inside one 17-px pred:
    # IoU with the big one = 16/17 > .5 -> TP; the small one is covered -> merged.
    t = np.zeros((5, 5), int)
    t[0:4, 0:4] = 1
    t[4, 0] = 2
    p = np.zeros((5, 5), int)
    p[0:4, 0:4], p[4, 0] = 9, 9
    k = kromp_object_categories(t, p)
    assert (k["tp"], k["merged"], k["merge_objects"], k["fp"]) == (1, 1, 0, 0)


def test_empty_maps():
    z = np.zeros((6, 6), int)
    t, _ = three_nuclei()
    both = instance_metrics(z, z)  # both empty: defined as perfect agreement
    assert all(v == 1.0 for v in both.values()), both
    no_pred = instance_metrics(t, np.zeros_like(t))
    assert all(v == 0.0 for v in no_pred.values()), no_pred
    no_true = instance_metrics(np.zeros_like(t), t)
    assert all(v == 0.0 for v in no_true.values()), no_true
    assert aji_plus(z, z) == 1.0 and aji_plus(t, np.zeros_like(t)) == 0.0
    k = kromp_object_categories(z, z)
    assert (k["n_true"], k["split_rate"], k["fp_rate"]) == (0, 0.0, 0.0)


def test_input_validation():
    t, p = three_nuclei()
    with pytest.raises(ValueError):
        f1_at_iou(t, p[:5])
    with pytest.raises(TypeError):
        f1_at_iou(t, p + 0.5)
    with pytest.raises(ValueError):
        f1_at_iou(t, -p)
    # float maps holding whole numbers are accepted
    assert f1_at_iou(t.astype(float), p)["tp"] == 3


def test_pixel_errors_near_and_away_from_the_outlines():
    """Outline placement lands in the band; a nucleus missed or invented far
    from any true outline lands outside it."""
    t = np.zeros((40, 40), np.int32)
    t[5:15, 5:15] = 1  # 100 px
    t[25:35, 25:35] = 2  # 100 px, will be missed
    p = np.zeros_like(t)
    p[4:14, 5:15] = 7  # nucleus 1 shifted up one row: 10 px too many, 10 too few
    p[25:30, 2:4] = 3  # invented, 10 px, far (21+ px) from every true outline
    e = pixel_error_breakdown(t, p, band_px=1.5)
    assert (e["true_px"], e["pred_px"]) == (200, 110)
    assert e["fp_px"] == 20 and e["fn_px"] == 110
    # the shifted row above nucleus 1 is 1 px from its outline; the invented blob is not
    assert e["fp_band_px"] == 10
    # the row lost at the bottom of nucleus 1 and the missed nucleus' rim (1-1.5 px deep)
    rim = 100 - 8 * 8
    assert e["fn_band_px"] == 10 + rim
    # a wider band takes in more of the missed nucleus' interior, never more than exists
    wide = pixel_error_breakdown(t, p, band_px=3)
    assert e["fn_band_px"] < wide["fn_band_px"] <= wide["fn_px"]
    # labels, not ids: relabelling changes nothing
    assert pixel_error_breakdown(t * 3, p + (p > 0), band_px=1.5) == e


def test_pixel_errors_without_any_outline():
    empty = np.zeros((8, 8), np.int32)
    full = np.ones((8, 8), np.int32)
    e = pixel_error_breakdown(empty, full)
    assert e == {
        "true_px": 0,
        "pred_px": 64,
        "fp_px": 64,
        "fn_px": 0,
        "fp_band_px": 0,
        "fn_band_px": 0,
    }
    assert pixel_error_breakdown(full, empty)["fn_band_px"] == 0
    with pytest.raises(TypeError):  # masks are not label maps, as for every metric here
        pixel_error_breakdown(empty.astype(bool), empty)
