"""Hand-checked examples for benchmark.metrics.stratify."""

import math

import numpy as np
import pytest

from benchmark.metrics import (
    density_bins,
    detection_by_density,
    local_density,
    summarize_by_group,
)


def test_summarize_by_group():
    rows = [
        {"site": "B", "f1": 1.0, "aji": 0.4},
        {"site": "A", "f1": 0.5, "aji": 0.2},
        {"site": "A", "f1": 0.7, "aji": None},  # missing aji left out of A's mean
        {"site": "A", "f1": float("nan")},
    ]
    s = summarize_by_group(rows, "site", ["f1", "aji"])
    assert list(s) == ["B", "A"]  # order of first appearance
    assert s["A"]["n"] == 3
    assert s["A"]["f1"] == pytest.approx(0.6)  # (0.5 + 0.7)/2
    assert s["A"]["aji"] == pytest.approx(0.2)
    assert s["B"] == {"n": 1, "f1": 1.0, "aji": 0.4}
    s = summarize_by_group([{"g": 1}], "g", ["x"])
    assert s[1]["n"] == 1 and math.isnan(s[1]["x"])


def test_local_density():
    # (0,0)-(3,0): 3; (0,0)-(0,4): 4; (3,0)-(0,4): 5; (10,10) is > 10 from all
    pts = [(0, 0), (3, 0), (0, 4), (10, 10)]
    assert local_density(pts, radius=5).tolist() == [2, 2, 2, 0]  # d <= r counts
    assert local_density(pts, radius=4.9).tolist() == [2, 1, 1, 0]
    # against a reference set: (0,0) and (1,0) are within 2 of (0,0), (9,9) is not
    assert local_density([(0, 0)], radius=2, reference=[(0, 0), (1, 0), (9, 9)]).tolist() == [2]
    assert local_density([], radius=2).tolist() == []


def test_density_bins():
    d = [0, 1, 2, 3, 5, 7]
    assert density_bins(d, edges=[0, 2, 5, np.inf]).tolist() == [0, 0, 1, 1, 2, 2]
    assert density_bins(d, edges=[1, 3]).tolist() == [-1, 0, 0, -1, -1, -1]
    with pytest.raises(ValueError):
        density_bins(d, edges=[3, 1])


def test_detection_by_density():
    # true: a cluster (0,0), (2,0), (0,2) (each has 2 others within 3: distances 2, 2, 2.83)
    # and an isolated nucleus (20,20) with density 0.
    true = [(0, 0), (2, 0), (0, 2), (20, 20)]
    # preds: (0.5,0) matches (0,0); (20,21) matches (20,20); (10,10) matches nothing and
    # has no true nucleus within 3 -> density 0.
    pred = [(0.5, 0), (20, 21), (10, 10)]
    bins = detection_by_density(pred, true, match_radius=1.5, density_radius=3, edges=[0, 1, 99])
    low, high = bins
    # density 0: true {(20,20)} found -> recall 1; preds {(20,21) TP, (10,10) FP} -> 1/2
    assert (low["n_true"], low["tp_true"], low["recall"]) == (1, 1, 1.0)
    assert (low["n_pred"], low["tp_pred"], low["precision"]) == (2, 1, 0.5)
    # density 2: 3 true, 1 found -> recall 1/3; pred (0.5,0) takes its match's density 2
    assert (high["n_true"], high["tp_true"]) == (3, 1)
    assert high["recall"] == pytest.approx(1 / 3)
    assert (high["n_pred"], high["tp_pred"], high["precision"]) == (1, 1, 1.0)
    assert (high["lo"], high["hi"]) == (1.0, 99.0)


def test_detection_by_density_no_predictions():
    bins = detection_by_density([], [(0, 0)], match_radius=1, density_radius=3, edges=[0, 5])
    assert (bins[0]["n_true"], bins[0]["recall"], bins[0]["n_pred"]) == (1, 0.0, 0)
    assert math.isnan(bins[0]["precision"])
