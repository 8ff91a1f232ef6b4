"""``benchmark.evaluate`` (what ``nucleus-bench eval`` runs) on tiny synthetic
datasets and a stand-in model whose nuclei are known to the pixel.

A mutation run left each of these changes to the evaluation passing the
suite; each test here names the change it catches:

- predicted centroids not shifted to the metrics' pixel-centre convention;
- the point matching or density radius taken in pixels, or converted with the
  model's resolution instead of the image's;
- every image evaluated instead of the requested split's;
- an image segmented as if at the model's resolution (not resampled to it);
- pooled precision and recall with the false positives and negatives swapped;
- a per-image metric that is NaN making the mean NaN;
- images shrunk with bilinear instead of area interpolation (or grown with
  area instead of bilinear) on their way to the model's grid.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from benchmark.datasets import Dataset, Sample
from benchmark.evaluate import evaluate
from nucleus_models.models.base import ModelSpec, NucleusModel, TileInstances

STUB = "eval-test-dark"
STUB_MPP = 0.5
#: the RGB images the stand-in model was given (``prepare``), newest last
SEEN: list[np.ndarray] = []
BACKGROUND = (235, 200, 220)  # eosin pink
NUCLEUS = (70, 40, 130)  # haematoxylin dark


class _DarkSquares(NucleusModel):
    """Dark pixels -> 8-connected components, each scored 0.9: a network's
    stand-in whose nuclei are exactly the dark shapes it is shown."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    def prepare(self, thumbnail: np.ndarray, tissue: np.ndarray) -> dict[str, Any]:
        SEEN.append(np.array(thumbnail))
        return {}

    def preprocess(self, tiles: list[np.ndarray], context: dict[str, Any]) -> Any:
        return tiles

    def forward(self, batch: Any) -> Any:
        return [t.astype(float).mean(axis=2) < 128 for t in batch]

    def postprocess(
        self, raw: Any, tiles: list[np.ndarray], context: dict[str, Any]
    ) -> list[TileInstances]:
        from scipy import ndimage as ndi

        out = []
        for m in raw:
            lab, n = ndi.label(m, structure=np.ones((3, 3)))
            scores = np.full(n + 1, 0.9)
            out.append(TileInstances(lab.astype(np.int32), scores, np.zeros(n + 1, int)))
        return out


@pytest.fixture(autouse=True)
def stub_model() -> Iterator[ModelSpec]:
    """Register the stand-in model (0.5 um/px, brightfield) for one test."""
    from nucleus_models.models import registry

    registry._ensure_builtin()
    spec = ModelSpec(name=STUB, mpp=STUB_MPP, tile_size=512, max_nucleus_diameter_um=8.0)
    registry.register_model(spec)(lambda **_: _DarkSquares(spec))
    SEEN.clear()
    try:
        yield spec
    finally:  # the CLI XML lists exactly the registered models: leave no trace
        registry._REGISTRY.pop(STUB, None)


def _image(size: int, boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    """A pale ``size`` x ``size`` image with dark rectangles ``(x0, y0, x1, y1)`` (ends excluded)."""
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BACKGROUND
    for x0, y0, x1, y1 in boxes:
        img[y0:y1, x0:x1] = NUCLEUS
    return img


class _Points(Dataset):
    """A point (``_Outlined``: label map) dataset from ``{id: (image, truth, mpp)}``; ``ids(split)``
    keeps the ids whose ``split`` group is ``split``."""

    name = "fake_points"
    description = "synthetic images with nucleus points"
    layout = "none"
    kind = "points"

    def __init__(
        self,
        root: Path,
        samples: Mapping[str, tuple[np.ndarray, Any, float | None]],
        splits: dict[str, str] | None = None,
    ) -> None:
        super().__init__(root)
        self.samples = samples
        self.split_of = splits or {}

    def ids(self, split: str | None = None) -> list[str]:
        return [i for i in sorted(self.samples) if split is None or self.split_of.get(i) == split]

    def load(self, sample_id: str) -> Sample:
        img, truth, mpp = self.samples[sample_id]
        groups = {"split": self.split_of[sample_id]} if sample_id in self.split_of else {}
        if self.kind == "points":
            return Sample(id=sample_id, image=img, points=truth, mpp=mpp, groups=groups)
        return Sample(id=sample_id, image=img, labels=truth, mpp=mpp, groups=groups)


class _Outlined(_Points):
    name = "fake_outlined"
    kind = "instances"


def _run(ds: Dataset, tmp_path: Path, **kwargs: Any) -> dict[str, Any]:
    return evaluate(
        ds, model=STUB, out_dir=tmp_path / "out", progress=False, report=False, **kwargs
    )


# -- 1. centroids in the metrics' convention (pixel centres at integers) -------------
def test_predicted_centroids_put_pixel_centres_at_integers(tmp_path: Path) -> None:
    """A 3x3 nucleus around pixel (column 10, row 20) is at (10, 20) for the
    metrics, as the dataset's points are: within 0.2 px of its point, and its
    centre pixel inside a one-pixel true nucleus. Unshifted (the library's
    ``i + 0.5``) it is 0.7 px away and rounds onto the next pixel."""
    centres = [(10, 20), (30, 12), (25, 33)]
    img = _image(48, [(x - 1, y - 1, x + 2, y + 2) for x, y in centres])
    pts = np.array(centres, float)
    res = _run(_Points(tmp_path, {"a": (img, pts, 0.5)}), tmp_path, radius_um=0.1)  # 0.2 px
    row = res["rows"][0]
    assert row["radius_px"] == pytest.approx(0.2)
    assert (row["tp"], row["fp"], row["fn"]) == (3, 0, 0)
    assert row["mean_distance_px"] == pytest.approx(0.0, abs=1e-6)
    lines = (tmp_path / "out" / "predictions" / "a.csv").read_text().splitlines()[1:]
    written = sorted(tuple(float(v) for v in line.split(",")[:2]) for line in lines)
    assert written == sorted(map(tuple, pts.tolist()))
    # outlined truth: one pixel per nucleus, hit only by the centre pixel
    truth = np.zeros((48, 48), np.int32)
    for k, (x, y) in enumerate(centres, 1):
        truth[y, x] = k
    res = _run(_Outlined(tmp_path, {"a": (img, truth, 0.5)}), tmp_path)
    row = res["rows"][0]
    assert (row["tp"], row["fp"], row["fn"]) == (3, 0, 0)


# -- 2. radii in microns, converted with the image's resolution ---------------------
def test_point_and_density_radii_are_microns_at_the_images_resolution(tmp_path: Path) -> None:
    """At 0.25 um/px (the model works at 0.5), a 1 um matching radius is 4 px:
    a point 3 px from its nucleus matches, one 5 px away does not; 15 um of
    neighbourhood is 60 px, which holds all nine nuclei of a 20 px grid.
    Taken as pixels (1 px, 15 px) or converted with the model's 0.5 um/px
    (2 px, 30 px), or multiplied by the resolution, neither holds."""
    grid = [(x0, y0) for y0 in (28, 48, 68) for x0 in (28, 48, 68)]
    img = _image(128, [(x0, y0, x0 + 6, y0 + 6) for x0, y0 in grid])
    centres = np.array([(x0 + 2.5, y0 + 2.5) for x0, y0 in grid])
    truth = centres.copy()
    truth[4] += (3.0, 0.0)  # the middle nucleus's point: 3 px off (matched)
    truth[1] += (0.0, 5.0)  # the top middle one's: 5 px off (a miss and a false positive)
    res = _run(_Points(tmp_path, {"a": (img, truth, 0.25)}), tmp_path, radius_um=1.0)
    row = res["rows"][0]
    assert row["mpp"] == 0.25 and row["radius_px"] == pytest.approx(4.0)
    assert (row["tp"], row["fp"], row["fn"]) == (8, 1, 1)
    bins = {(b["lo"], b["hi"]): b for b in res["density"]["bins"]}
    dense = bins[(6.0, 10.0)]  # every true nucleus has the 8 others within 60 px
    assert (dense["n_true"], dense["tp_true"], dense["n_pred"], dense["tp_pred"]) == (9, 8, 9, 8)
    assert sum(b["n_true"] + b["n_pred"] for b in res["density"]["bins"]) == 18


# -- 3. the requested split only --------------------------------------------------
def test_only_the_requested_splits_images_are_evaluated(tmp_path: Path) -> None:
    """``split="test"`` scores the test image alone, not every image."""
    img = _image(48, [(10, 10, 16, 16), (30, 30, 36, 36)])
    pts = np.array([[12.5, 12.5], [32.5, 32.5]])
    empty = _image(48, [])
    samples = {"a": (empty, pts, 0.5), "b": (img, pts, 0.5), "c": (empty, pts, 0.5)}
    ds = _Points(tmp_path, samples, splits={"a": "train", "b": "test", "c": "train"})
    res = _run(ds, tmp_path, split="test")
    assert [r["id"] for r in res["rows"]] == ["b"]
    assert res["pooled"]["n_samples"] == 1 and res["pooled"]["f1"] == 1.0
    assert res["provenance"]["dataset"]["split"] == "test"
    assert sorted(p.name for p in (tmp_path / "out" / "predictions").iterdir()) == ["b.csv"]
    res = _run(ds, tmp_path, split="train")
    assert [r["id"] for r in res["rows"]] == ["a", "c"] and res["pooled"]["tp"] == 0


# -- 4. each image segmented at the model's resolution, from its own -------------
@pytest.mark.parametrize("mpp", [0.25, 1.0])
def test_images_are_resampled_from_their_own_resolution_to_the_models(
    tmp_path: Path, mpp: float
) -> None:
    """An image at 0.25 (1.0) um/px reaches the 0.5 um/px model at half
    (twice) its size, and its nuclei come back on the image's own grid where
    they were drawn; segmenting at the model's resolution instead (the image
    as it is) or not resampling shows the model the image unchanged."""
    size = 96
    boxes = [(20, 20, 32, 32), (60, 24, 72, 36), (36, 64, 48, 76)]
    img = _image(size, boxes)
    truth = np.zeros((size, size), np.int32)
    for k, (x0, y0, x1, y1) in enumerate(boxes, 1):
        truth[y0:y1, x0:x1] = k
    res = _run(_Outlined(tmp_path, {"a": (img, truth, mpp)}), tmp_path)
    (seen,) = SEEN
    assert seen.shape[:2] == (round(size * mpp / STUB_MPP),) * 2
    row = res["rows"][0]
    assert row["mpp"] == mpp and row["mpp_source"] == "sample"
    assert row["analysis_mpp"] == pytest.approx(STUB_MPP)
    pred = tifffile.imread(tmp_path / "out" / "predictions" / "a.tif")
    assert pred.shape == truth.shape
    assert row["n_pred"] == 3 and row["f1_iou50"] == 1.0 and row["aji"] > 0.9


# -- 5. pooled precision and recall -------------------------------------------------
def test_pooled_precision_and_recall_count_false_positives_and_negatives_apart(
    tmp_path: Path,
) -> None:
    """Two images, 4 nuclei found, 1 invented and 3 missed in all: pooled
    precision 4/5 and recall 4/7, by points and by masks (IoU > 0.5 too)."""
    boxes_a = [(4, 4, 10, 10), (20, 4, 26, 10), (36, 4, 42, 10), (4, 36, 10, 42)]
    boxes_b = [(4, 4, 10, 10)]
    img_a, img_b = _image(48, boxes_a), _image(48, boxes_b)

    def centre(b: tuple[int, int, int, int]) -> tuple[float, float]:
        return ((b[0] + b[2] - 1) / 2, (b[1] + b[3] - 1) / 2)

    # a: its first three nuclei found, its fourth invented, two missed; b: one found, one missed
    pts_a = np.array([centre(b) for b in boxes_a[:3]] + [(40.0, 40.0), (20.0, 40.0)])
    pts_b = np.array([centre(boxes_b[0]), (30.0, 30.0)])
    samples = {"a": (img_a, pts_a, 0.5), "b": (img_b, pts_b, 0.5)}
    pooled = _run(_Points(tmp_path, samples), tmp_path, radius_um=2.0)["pooled"]
    assert (pooled["tp"], pooled["fp"], pooled["fn"]) == (4, 1, 3)
    assert pooled["precision"] == pytest.approx(4 / 5) and pooled["recall"] == pytest.approx(4 / 7)

    def labels(boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
        lab = np.zeros((48, 48), np.int32)
        for k, (x0, y0, x1, y1) in enumerate(boxes, 1):
            lab[y0:y1, x0:x1] = k
        return lab

    extra = [(20, 36, 26, 42), (30, 20, 34, 24)]  # nuclei the images do not show
    samples = {
        "a": (img_a, labels(boxes_a[:3] + extra), 0.5),
        "b": (img_b, labels(boxes_b + extra[:1]), 0.5),
    }
    pooled = _run(_Outlined(tmp_path, samples), tmp_path)["pooled"]
    assert (pooled["tp"], pooled["fp"], pooled["fn"]) == (4, 1, 3)
    assert pooled["precision"] == pytest.approx(4 / 5) and pooled["recall"] == pytest.approx(4 / 7)
    assert pooled["det_f1"] == pytest.approx(8 / 12)
    assert (pooled["tp_iou50"], pooled["fp_iou50"], pooled["fn_iou50"]) == (4, 1, 3)
    assert pooled["precision_iou50"] == pytest.approx(4 / 5)
    assert pooled["recall_iou50"] == pytest.approx(4 / 7)


# -- 6. an undefined per-image metric is left out of the mean -----------------------
def test_a_nan_per_image_metric_is_left_out_of_the_mean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A metric undefined on one image (NaN; here every metric of an image
    without true nuclei, as some definitions make them) is left out of the
    mean over images, as the group means leave it out, rather than making
    the mean NaN (``null`` in metrics.json)."""
    import benchmark.evaluate as ev

    real = ev.instance_metrics

    def undefined_without_nuclei(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
        m = real(true, pred)
        return {k: float("nan") for k in m} if not np.any(true) else m

    monkeypatch.setattr(ev, "instance_metrics", undefined_without_nuclei)
    boxes = [(4, 4, 10, 10), (20, 4, 26, 10)]
    truth = np.zeros((48, 48), np.int32)
    truth[4:10, 4:10] = 1  # the second nucleus is not in the truth: det_f1 2/3
    samples = {"a": (_image(48, boxes), truth, 0.5), "b": (_image(48, []), truth * 0, 0.5)}
    res = _run(_Outlined(tmp_path, samples), tmp_path)
    a = res["rows"][0]
    assert res["rows"][1]["aji"] is None  # (NaN, as JSON)
    assert a["det_f1"] == pytest.approx(2 / 3)
    for key in ("det_f1", "aji", "pq", "f1_iou50"):
        assert res["mean"][key] == pytest.approx(a[key]), key
    assert res["mean"]["n_true"] == 0.5  # (counts still over both images)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["mean"]["det_f1"] == pytest.approx(2 / 3)


# -- images resampled to the model's grid: area when shrinking, bilinear when growing ----
def test_images_shrink_by_area_and_grow_bilinearly_on_their_way_to_the_model() -> None:
    """Shrunk 4x (0.125 -> 0.5 um/px), one dark column in four averages into
    every model pixel (bilinear reads two pale columns of each four and loses
    it); grown 4x (2.0 -> 0.5 um/px), a dark-to-pale edge becomes a ramp
    (area interpolation, growing, repeats each pixel 4x4)."""
    from nucleus_models.detection import segment_image

    fine = np.empty((64, 64, 3), np.uint8)
    fine[:] = BACKGROUND
    fine[:, ::4] = NUCLEUS
    segment_image(fine, mpp=0.125, model=STUB)
    expected = (np.array(NUCLEUS) + 3 * np.array(BACKGROUND)) / 4
    assert SEEN[-1].shape == (16, 16, 3)
    assert np.abs(SEEN[-1] - expected).max() <= 1
    coarse = np.empty((8, 8, 3), np.uint8)
    coarse[:] = BACKGROUND
    coarse[:, :4] = NUCLEUS
    segment_image(coarse, mpp=2.0, model=STUB)
    grown = SEEN[-1][10, :, 0].astype(int)  # one row's red channel, 32 px
    assert grown.shape == (32,) and grown[0] == NUCLEUS[0] and grown[-1] == BACKGROUND[0]
    assert np.all(np.diff(grown) >= 0)
    assert len(set(grown.tolist()) - {NUCLEUS[0], BACKGROUND[0]}) >= 3  # a ramp, not a step
