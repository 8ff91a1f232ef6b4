"""The columnar Nuclei container and label-map conversion."""

from __future__ import annotations

import numpy as np

from nucleus_models.instances import nuclei_from_labels
from nucleus_models.types import Nuclei


def _two() -> Nuclei:
    return Nuclei.from_polygons(
        [np.array([[0, 0], [4, 0], [4, 2]]), np.array([[10, 10], [12, 10], [12, 14], [10, 14]])],
        scores=[0.5, 0.9],
        labels=[0, 1],
        measurements={"area_um2": np.array([1.0, 2.0])},
    )


def test_from_polygons_boxes_and_centroids() -> None:
    n = _two()
    assert len(n) == 2
    assert n.boxes.tolist() == [[0, 0, 5, 3], [10, 10, 13, 15]]
    np.testing.assert_allclose(n.centroids[1], [11, 12])
    assert n.polygon(1).shape == (4, 2)


def test_concat_select_transform_roundtrip() -> None:
    a, b = _two(), _two().transformed(offset=(100, 0))
    c = Nuclei.concat([a, Nuclei.empty(["area_um2"]), b])
    assert len(c) == 4
    assert c.polygon_offsets.tolist() == [0, 3, 7, 10, 14]
    np.testing.assert_allclose(c.polygon(3), b.polygon(1))
    s = c.select(np.array([False, True, False, True]))
    assert len(s) == 2 and s.labels.tolist() == [1, 1]
    np.testing.assert_allclose(s.polygon(1), b.polygon(1))
    np.testing.assert_allclose(s.centroids[1], [111, 12])
    d = a.transformed(scale=2.0, offset=(1, 1))
    assert d.boxes[0].tolist() == [1, 1, 11, 7]
    assert len(c.select(np.zeros(4, bool))) == 0


def test_table_columns() -> None:
    t = _two().to_table(["nucleus", "mitosis"])
    assert t["class"].tolist() == ["nucleus", "mitosis"]
    assert t["area_um2"].tolist() == [1.0, 2.0]


def test_nuclei_from_labels_non_consecutive_ids() -> None:
    lab = np.zeros((20, 20), np.int32)
    lab[2:6, 2:6] = 7  # 4x4 square
    lab[10:13, 12:18] = 3  # 3x6 rectangle
    scores = np.zeros(8)
    scores[3], scores[7] = 0.25, 0.75
    n = nuclei_from_labels(lab, scores=scores, pixel_area_um2=0.25)
    assert len(n) == 2
    order = np.argsort(n.centroids[:, 1])
    np.testing.assert_allclose(n.centroids[order], [[4.0, 4.0], [15.0, 11.5]])
    assert n.boxes[order].tolist() == [[2, 2, 6, 6], [12, 10, 18, 13]]
    assert n.measurements["area_um2"][order].tolist() == [4.0, 4.5]
    assert n.scores[order].tolist() == [0.75, 0.25]
    assert len(nuclei_from_labels(np.zeros((5, 5), np.int32))) == 0
