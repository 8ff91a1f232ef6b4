"""The columnar Nuclei container and label-map conversion."""

from __future__ import annotations

import numpy as np
import pytest

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
    assert n.boxes.tolist() == [[0, 0, 4, 2], [10, 10, 12, 14]]
    np.testing.assert_allclose(n.centroids[1], [11, 12])
    assert n.polygon(1).shape == (4, 2)


def test_from_polygons_gives_the_boxes_of_the_outlines_the_package_writes() -> None:
    """Outlines run along the pixels' edges: their vertex extents are the
    nuclei's pixel boxes (max + 1 made them a pixel too large, right and below)."""
    lab = np.zeros((40, 50), np.int32)
    lab[3:9, 4:15] = 1
    yy, xx = np.mgrid[0:40, 0:50]
    lab[(yy - 25) ** 2 + (xx - 30) ** 2 <= 49] = 2
    n = nuclei_from_labels(lab)
    again = Nuclei.from_polygons(n.polygons())
    np.testing.assert_array_equal(again.boxes, n.boxes)
    assert n.boxes.tolist()[0] == [4, 3, 15, 9]


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
    assert d.boxes[0].tolist() == [1, 1, 9, 5]
    # per-axis scale and offset: boxes, centroids and outlines move alike
    e = a.transformed(scale=(2.0, 3.0), offset=(100, 7))
    assert e.boxes[0].tolist() == [100, 7, 108, 13]
    np.testing.assert_allclose(e.centroids, a.centroids * (2, 3) + (100, 7))
    np.testing.assert_allclose(e.polygon(1), a.polygon(1) * (2, 3) + (100, 7))
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


def test_outlines_enclose_the_pixels_area_on_a_coarser_grid() -> None:
    """Outlines run along the pixels' edges, not through the boundary pixels'
    centres (half a pixel inside: a 6 px radius disc drawn ~17 % too small),
    so a polygon scaled to a finer grid and rasterised there covers the same
    region as the label map resampled to that grid."""
    from skimage.draw import disk, polygon

    lab = np.zeros((40, 40), np.int32)
    for k, (cy, cx, r) in enumerate([(10, 10, 6), (28, 26, 8.5), (9, 30, 4)], start=1):
        rr, cc = disk((cy, cx), r, shape=lab.shape)
        lab[rr, cc] = k
    n = nuclei_from_labels(lab)
    fine = np.kron(lab, np.ones((4, 4), np.int32))  # the same nuclei at 4x
    assert len(n) == 3
    polys = n.polygons()
    for i in range(3):
        pts = polys[i] * 4 - 0.5  # corner frame at 4x -> pixel-index frame
        rr, cc = polygon(pts[:, 1], pts[:, 0], shape=fine.shape)
        drawn = np.zeros(fine.shape, bool)
        drawn[rr, cc] = True
        truth = fine == lab[int(n.centroids[i, 1]), int(n.centroids[i, 0])]
        iou = (drawn & truth).sum() / (drawn | truth).sum()
        assert iou > 0.95, (i, iou)
        x, y = polys[i][:, 0], polys[i][:, 1]
        area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
        assert abs(area - n.measurements["area_px"][i]) < 0.05 * n.measurements["area_px"][i]


@pytest.mark.parametrize("flip", [False, True])
def test_a_nucleus_in_two_parts_is_outlined_by_its_larger_part(flip: bool) -> None:
    """A label in two pieces (a watershed region can be): its outline is
    the larger piece's, whichever piece comes first on the image."""
    lab = np.zeros((20, 20), np.int32)
    lab[1:3, 1:3] = 7  # a 2 x 2 scrap
    lab[8:18, 6:16] = 7  # the 10 x 10 nucleus
    if flip:
        lab = lab[::-1, ::-1]
    poly = nuclei_from_labels(lab, simplify=0).polygons()[0]
    x, y = poly[:, 0], poly[:, 1]
    area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
    assert area == pytest.approx(100 - 4 / 8)  # the 10 x 10 square, 4 corners cut
    assert (x.min(), y.min(), x.max(), y.max()) == ((4, 2, 14, 12) if flip else (6, 8, 16, 18))


def test_keep_returns_what_selecting_afterwards_does_and_traces_only_those(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``nuclei_from_labels(keep=...)`` (a tile's seam rule) gives the same
    nuclei as selecting them from the full result, and traces the outlines
    of the kept nuclei only."""
    from skimage.draw import disk

    from nucleus_models import instances

    lab = np.zeros((60, 60), np.int32)
    for k, (cy, cx, r) in enumerate([(10, 10, 6), (30, 26, 8.5), (9, 40, 4), (50, 50, 5)], 1):
        rr, cc = disk((cy, cx), r, shape=lab.shape)
        lab[rr, cc] = 10 * k
    scores = np.linspace(0, 1, 41)

    def keep(c: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (c[:, 0] < 35) & (b[:, 3] < 45)

    full = nuclei_from_labels(lab, scores=scores, pixel_area_um2=0.16)
    traced: list[int] = []
    outline = instances._outline
    monkeypatch.setattr(instances, "_outline", lambda m: traced.append(1) or outline(m))
    part = nuclei_from_labels(lab, scores=scores, pixel_area_um2=0.16, keep=keep)
    want = full.select(keep(full.centroids, full.boxes))
    assert len(part) == len(want) == len(traced) == 2
    for name in ("centroids", "boxes", "scores", "labels", "polygon_offsets"):
        np.testing.assert_array_equal(getattr(part, name), getattr(want, name))
    np.testing.assert_array_equal(part.polygon_vertices, want.polygon_vertices)
    assert part.measurements.keys() == want.measurements.keys()
    for key in want.measurements:
        np.testing.assert_array_equal(part.measurements[key], want.measurements[key])
    none = nuclei_from_labels(lab, pixel_area_um2=0.16, keep=lambda c, b: c[:, 0] < 0)
    assert len(none) == 0 and set(none.measurements) == {"area_px", "area_um2"}


def test_centroids_areas_and_boxes_of_a_label_map_match_scipy() -> None:
    """Centroids (pixel centres, so + 0.5), areas and boxes of a label map with
    touching, non-consecutive and absent ids are scipy.ndimage's."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(3)
    lab = np.zeros((90, 120), np.int32)
    for k in rng.choice(np.arange(1, 400), 40, replace=False):
        y, x = rng.integers(0, 85), rng.integers(0, 115)
        lab[y : y + rng.integers(2, 12), x : x + rng.integers(2, 12)] = k  # later ones overlap
    n = nuclei_from_labels(lab)
    ids = np.unique(lab[lab > 0])
    assert len(n) == len(ids)
    com = np.array(ndi.center_of_mass(np.ones_like(lab), lab, ids))  # (row, col)
    np.testing.assert_allclose(n.centroids, com[:, ::-1] + 0.5, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(n.measurements["area_px"], ndi.sum_labels(lab > 0, lab, ids))
    boxes = [ndi.find_objects((lab == k).astype(np.int32))[0] for k in ids]
    np.testing.assert_array_equal(
        n.boxes, [(b[1].start, b[0].start, b[1].stop, b[0].stop) for b in boxes]
    )


def test_no_nuclei_have_no_polygons_and_an_overlay_of_none_is_the_image(tmp_path) -> None:
    """A run that finds nothing (a tiny or empty region) still writes its
    overlay: the image without outlines (it raised IndexError)."""
    from PIL import Image

    from nucleus_models.io import write_overlay

    none = Nuclei.empty(["area_px"])
    assert none.polygons() == []
    assert [p.shape for p in _two().polygons()] == [(3, 2), (4, 2)]
    img = np.full((20, 30, 3), 200, np.uint8)
    write_overlay(
        str(tmp_path / "o.png"),
        img,
        nuclei=none,
        origin=(0, 0),
        scale=1.0,
        class_colors=["rgb(0,200,255)"],
    )
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o.png")), img)


def test_an_overlay_draws_a_polygon_rois_outline() -> None:
    """The overlay of a polygon ROI showed the nuclei inside it but not the
    area analysed: its outline is drawn (in ROI_COLOR), apart from the nuclei."""
    from nucleus_models.io import render_overlay
    from nucleus_models.io.overlay import ROI_COLOR

    img = np.zeros((60, 80, 3), np.uint8)
    roi = [np.array([[110.0, 210.0], [150.0, 210.0], [150.0, 240.0]])]
    kw = {"origin": (100.0, 200.0), "scale": 1.0, "class_colors": ["rgb(0,255,0)", "rgb(0,0,255)"]}
    drawn = render_overlay(img, _two(), roi_polygons=roi, **kw)
    plain = render_overlay(img, _two(), **kw)
    ys, xs = np.nonzero((drawn == ROI_COLOR).all(-1))
    assert len(xs) > 100 and (xs.min(), xs.max(), ys.min(), ys.max()) == (9, 51, 9, 41)
    assert not (plain == ROI_COLOR).all(-1).any()
