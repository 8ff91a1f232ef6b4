"""Seam-free merge: disks straddling tile borders are found exactly once, uncut,
whatever the tile size, overlap or scheduler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from nucleus_models.detection import DetectionParams, detect_nuclei
from nucleus_models.errors import ParameterError
from nucleus_models.instances import nuclei_from_labels
from nucleus_models.models.base import TileInstances
from nucleus_models.wsi.runner import TileJob


def _match(found: np.ndarray, truth: np.ndarray, tol: float = 1.5) -> tuple[int, int, int]:
    d = np.hypot(*(found[:, None, :] - truth[None, :, :]).transpose(2, 0, 1))
    r, c = linear_sum_assignment(d)
    ok = d[r, c] <= tol
    return int(ok.sum()), len(found) - int(ok.sum()), len(truth) - int(ok.sum())


def _run(path: Path, **kw: object) -> object:
    kw.setdefault("model", "classical-he")  # weight-free and fast: the seams are what is tested
    return detect_nuclei(DetectionParams(inputImageFile=str(path), **kw))  # type: ignore[arg-type]


@pytest.mark.parametrize("tile_size", [128, 200, 256])
@pytest.mark.parametrize("overlap", [24, 40])
def test_every_disk_found_exactly_once(disk_slide, tile_size: int, overlap: int) -> None:
    path, centres, radius = disk_slide
    res = _run(path, analysis_tile_size=tile_size, analysis_tile_overlap=overlap)
    nuc = res.nuclei
    assert res.tiles["total"] > 4  # really tiled
    tp, fp, fn = _match(nuc.centroids, centres)
    assert (tp, fp, fn) == (len(centres), 0, 0)
    # no disk is cut at a seam: each has (about) the full disk area
    area_px = nuc.measurements["area_px"]
    assert area_px.min() > 0.9 * np.pi * radius**2, area_px.min()
    assert area_px.max() < 1.1 * np.pi * radius**2 + 2 * np.pi * radius


def test_results_do_not_depend_on_tiling_or_scheduler(disk_slide) -> None:
    path, centres, _ = disk_slide
    ref = _run(path, analysis_tile_size=2048).nuclei  # one tile
    for kw in (
        {"analysis_tile_size": 128, "analysis_tile_overlap": 40},
        {
            "analysis_tile_size": 300,
            "analysis_tile_overlap": 24,
            "scheduler": "multithreading",
            "num_workers": 2,
        },
        {"analysis_tile_size": 200, "analysis_tile_overlap": 40, "batch_size": 3},
    ):
        other = _run(path, **kw).nuclei
        assert len(other) == len(ref) == len(centres)
        np.testing.assert_allclose(other.centroids, ref.centroids, atol=1e-6)
        np.testing.assert_array_equal(other.measurements["area_px"], ref.measurements["area_px"])
        np.testing.assert_array_equal(other.polygon_vertices, ref.polygon_vertices)


def test_an_empty_scheduler_runs_a_thread_pool_on_a_cpu_and_one_worker_serially(
    disk_slide,
) -> None:
    """The default (empty) scheduler: threads when there is more than one
    worker, serial with one; recorded in the provenance; the same nuclei."""
    from nucleus_models.wsi import available_cores

    path, centres, _ = disk_slide
    serial = _run(path, analysis_tile_size=256, num_workers=1)
    threads = _run(path, analysis_tile_size=256, num_workers=2)
    every_core = _run(path, analysis_tile_size=256)  # num_workers 0: all cores
    assert (serial.tiles["scheduler"], serial.tiles["workers"]) == ("serial", 1)
    assert (threads.tiles["scheduler"], threads.tiles["workers"]) == ("multithreading", 2)
    cores = min(available_cores(), 8)  # the default pool has at most 8 threads
    assert every_core.tiles["workers"] == cores
    assert every_core.tiles["scheduler"] == ("multithreading" if cores > 1 else "serial")
    for res in (threads, every_core):
        assert len(res.nuclei) == len(serial.nuclei) == len(centres)
        np.testing.assert_array_equal(res.nuclei.polygon_vertices, serial.nuclei.polygon_vertices)
    explicit = _run(path, analysis_tile_size=256, scheduler="multithreading", num_workers=1)
    assert (explicit.tiles["scheduler"], explicit.tiles["workers"]) == ("multithreading", 1)
    # a many-core server: the default pool stops at 8 threads; asked-for counts stand
    from unittest import mock

    from nucleus_models.detection import effective_scheduler

    with mock.patch("nucleus_models.wsi.runner.available_cores", return_value=64):
        assert effective_scheduler("", 0, "cpu") == ("multithreading", 8)
        assert effective_scheduler("", 16, "cpu") == ("multithreading", 16)
        assert effective_scheduler("multithreading", 0, "cpu") == ("multithreading", 64)
        assert effective_scheduler("", 0, "cuda") == ("pipeline", 8)


def test_dask_multiprocessing_matches_serial(disk_slide, caplog: pytest.LogCaptureFixture) -> None:
    import contextlib
    import logging
    import socket
    import warnings

    path, centres, _ = disk_slide
    serial = _run(path, analysis_tile_size=256, num_workers=1).nuclei
    busy = socket.socket()  # dask's default port taken (another run, another service)
    with contextlib.suppress(OSError):
        busy.bind(("127.0.0.1", 8787))
        busy.listen()
    with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        dask = _run(path, analysis_tile_size=256, scheduler="multiprocessing", num_workers=2).nuclei
    busy.close()
    # the cluster's own chatter stays out of the job's log
    assert not [r for r in caplog.records if r.name.startswith("distributed")], caplog.text
    assert not [w for w in seen if "already in use" in str(w.message)]
    assert len(dask) == len(serial) == len(centres)
    np.testing.assert_allclose(dask.centroids, serial.centroids, atol=1e-6)


def test_downsampled_analysis_maps_back_to_base_pixels(tmp_path: Path) -> None:
    """A 0.25 um/px slide analysed at 0.5 um/px: coordinates come back in base pixels."""
    from conftest import disk_centres, draw_disks, write_pyramidal_tiff

    radius = 14.0  # 7 px at the model's resolution
    centres = disk_centres(1200, 1000, (512,), radius=radius)
    path = write_pyramidal_tiff(
        tmp_path / "40x.tif", draw_disks(1200, 1000, centres, radius), mpp=0.25
    )
    res = _run(path, analysis_tile_size=256)
    tp, fp, fn = _match(res.nuclei.centroids, centres, tol=2.5)
    assert (fp, fn) == (0, 0) and tp == len(centres)
    np.testing.assert_allclose(
        np.median(res.nuclei.measurements["area_um2"]), np.pi * (radius * 0.25) ** 2, rtol=0.2
    )


@pytest.mark.parametrize(
    ("mpp", "rms", "worst"),
    [
        (0.35, 0.15, 0.5),  # one 1024 px tile: rms 0.116 (the base layer, read and shrunk)
        (0.12, 0.5, 1.5),  # one tile: 0.353 (a 4x pyramid level, read by large_image)
    ],
)
def test_resampled_tiles_place_nuclei_where_they_are(
    tmp_path: Path, mpp: float, rms: float, worst: float
) -> None:
    """A slide finer than the model's 0.5 um/px analysed in small tiles: each
    tile's window starts on a rounded base pixel, and its nuclei are placed
    from that pixel, so they land where one large tile puts them (the windows'
    edges times the downsample put them up to 0.75 px off, differently in
    each tile: a nucleus on a seam could be kept by both tiles or neither).
    Shrunk 2x or more, large_image reads a pyramid level and floors the
    window's edges to its pixels: the windows start on them (at 0.12 um/px,
    placed from the unfloored edges, nuclei were up to 3.8 base px off, rms
    1.65, and 3 of 729 were misplaced past 1.5 px)."""
    from conftest import draw_disks, write_pyramidal_tiff

    k = 0.35 / mpp  # (the same field in um as at 0.35 um/px)
    radius = 8.0 * k
    rng = np.random.default_rng(1)
    size = int(1200 * k), int(1000 * k)
    centres = np.array(
        [
            (x + rng.uniform(-3, 3), y + rng.uniform(-3, 3))
            for x in np.arange(30, size[0] - 30, 45.0 * k)
            for y in np.arange(30, size[1] - 30, 45.0 * k)
        ]
    )
    path = write_pyramidal_tiff(tmp_path / "fine.tif", draw_disks(*size, centres, radius), mpp=mpp)
    res = _run(path, analysis_tile_size=100, analysis_tile_overlap=24)
    assert res.tiles["total"] > 30
    tp, fp, fn = _match(res.nuclei.centroids, centres)
    # (a nucleus within a tenth of a pixel of a seam can still be found by both
    # tiles: their windows sample it at different phases; 1 of 600 at 0.12)
    assert fn == 0 and fp <= (0 if mpp == 0.35 else 1) and tp == len(centres), (tp, fp, fn)
    d = np.hypot(*(res.nuclei.centroids[:, None, :] - centres[None]).transpose(2, 0, 1))
    off = res.nuclei.centroids - centres[d.argmin(axis=1)]
    assert np.sqrt(np.mean(off**2)) < rms
    assert np.abs(off).max() < worst
    area = res.nuclei.measurements["area_um2"] / res.nuclei.measurements["area_px"]
    np.testing.assert_allclose(area, mpp**2, rtol=1e-4)


def test_roi_rectangle_and_polygon(disk_slide) -> None:
    path, centres, _ = disk_slide
    roi = [100, 150, 400, 300]
    res = _run(path, analysis_roi=roi, analysis_tile_size=128)
    inside = (
        (centres[:, 0] >= 100)
        & (centres[:, 0] < 500)
        & (centres[:, 1] >= 150)
        & (centres[:, 1] < 450)
    )
    tp, fp, fn = _match(res.nuclei.centroids, centres[inside])
    assert (tp, fp, fn) == (int(inside.sum()), 0, 0)
    assert res.region == roi
    # a triangle: only disks whose centre lies inside it
    tri = [0, 0, 800, 0, 0, 800]
    res = _run(path, analysis_roi=tri + [0, 0], analysis_tile_size=200)
    import shapely

    poly = shapely.Polygon(np.array(tri).reshape(-1, 2))
    want = centres[shapely.contains_xy(poly, centres[:, 0], centres[:, 1])]
    tp, fp, fn = _match(res.nuclei.centroids, want)
    assert (fp, fn) == (0, 0) and tp == len(want) > 10
    # drawn by hand: a bow-tie, a lasso whose stroke crossed itself and a
    # square, as one ROI; each crossing polygon is read even-odd (its lobes)
    bow = [0, 0, 300, 300, 300, 0, 0, 300]
    lasso = [400, 400, 700, 400, 700, 700, 550, 700, 550, 250, 450, 250]
    square = [100, 500, 300, 500, 300, 700, 100, 700]
    res = _run(path, analysis_roi=[*bow, -1, -1, *lasso, -1, -1, *square], analysis_tile_size=200)
    geom = shapely.union_all(
        [shapely.make_valid(shapely.Polygon(np.reshape(p, (-1, 2)))) for p in (bow, lasso, square)]
    )
    want = centres[shapely.contains_xy(geom, centres[:, 0], centres[:, 1])]
    tp, fp, fn = _match(res.nuclei.centroids, want)
    assert (fp, fn) == (0, 0) and tp == len(want) > 10


def test_self_crossing_roi_polygons_are_their_lobes() -> None:
    from nucleus_models.wsi.tiling import parse_roi

    bow = parse_roi([0, 0, 100, 100, 100, 0, 0, 100])  # its shoelace sum is 0
    assert bow.as_list() == [0, 0, 101, 101] and len(bow.polygons) == 1
    with pytest.raises(ParameterError, match="no area"):
        parse_roi([0, 0, 10, 10, 20, 20, 30, 30])
    with pytest.raises(ParameterError, match="no area"):
        parse_roi([0, 0, 10, 0, 10, 10, 10, 0])  # out and back along one line
    # the tissue mask (which tiles run) and the centroid filter read one
    # geometry: a stroke that retraces itself along a line leaves a block
    # that shapely keeps and a plain even-odd fill would drop
    import shapely

    from nucleus_models.detection import _polygon_mask
    from nucleus_models.wsi.tiling import polygon_geometry

    retrace = np.array(
        [(10, 10), (190, 10), (190, 190), (10, 190), (10, 100), (120, 100)]
        + [(120, 60), (80, 60), (80, 140), (10, 140)],
        float,
    )
    mask = _polygon_mask((retrace,), (200, 200), 1.0)
    yy, xx = np.mgrid[0:200, 0:200]
    kept = shapely.contains_xy(polygon_geometry(retrace), xx.ravel(), yy.ravel())
    assert kept.sum() > 25000 and not (kept.reshape(200, 200) & ~mask).any()


def test_existing_dask_scheduler_by_address(disk_slide) -> None:
    """'tcp://host:port': an existing dask.distributed scheduler on this machine."""
    from dask.distributed import LocalCluster

    path, centres, _ = disk_slide
    with LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
    ) as cluster:
        res = _run(path, analysis_tile_size=256, scheduler=cluster.scheduler_address)
    tp, fp, fn = _match(res.nuclei.centroids, centres)
    assert (tp, fp, fn) == (len(centres), 0, 0)


def test_learned_model_does_not_depend_on_batch_size(shared_data: Path, monkeypatch) -> None:
    """The U-Net pads a batch to its largest tile: a narrow tile at the image's
    right or bottom edge must be batched only with tiles of its own size, so
    it sees the same border (and gives the same nuclei) whatever the batch
    size."""
    from nucleus_models.models.unet import UNetModel

    shapes: list[list[tuple[int, ...]]] = []
    preprocess = UNetModel.preprocess

    def spy(self, tiles, context):  # type: ignore[no-untyped-def]
        shapes.append([t.shape for t in tiles])
        return preprocess(self, tiles, context)

    monkeypatch.setattr(UNetModel, "preprocess", spy)
    image = sorted((shared_data / "monuseg2018" / "train" / "images").glob("*.tif"))[0]
    kw = {
        "model": "unet-monuseg",
        "input_mpp": 0.25,
        "device": "cpu",
        "precision": "float32",
        # 1000 px at 0.25 um/px is 625 px: 5 x 5 tiles, cores of 128 px but
        # 113 at the right and bottom, reads with context on one side only at
        # the image's edges (the overlap is below the largest nucleus, which
        # only warns)
        "analysis_tile_size": 128,
        "analysis_tile_overlap": 48,
    }
    ref = _run(image, batch_size=1, **kw)
    assert ref.tiles["total"] == 25 and len(ref.nuclei) > 100
    for bs in (2, 4):
        shapes.clear()
        other = _run(image, batch_size=bs, **kw).nuclei
        assert sum(len(b) for b in shapes) == 25 and max(len(b) for b in shapes) == bs
        assert all(len(set(b)) == 1 for b in shapes), shapes
        assert len(other) == len(ref.nuclei), bs
        np.testing.assert_allclose(other.centroids, ref.nuclei.centroids, atol=1e-6)
        np.testing.assert_array_equal(other.polygon_vertices, ref.nuclei.polygon_vertices)


def test_the_cores_a_run_uses_respect_affinity_and_a_containers_cpu_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A container limited to 4 of a host's 64 cores (``--cpus 4``: a cgroup
    quota) or pinned to some cores (affinity) starts as many workers as it
    may use, not one per host core."""
    from nucleus_models.wsi import runner

    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("400000 100000\n")
    assert runner.cgroup_cpu_limit(str(v2)) == 4.0
    (v2 / "cpu.max").write_text("max 100000\n")
    assert runner.cgroup_cpu_limit(str(v2)) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("250000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert runner.cgroup_cpu_limit(str(v1)) == 2.5
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert runner.cgroup_cpu_limit(str(v1)) is None
    assert runner.cgroup_cpu_limit(str(tmp_path / "none")) is None

    monkeypatch.setattr(runner.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(runner, "cgroup_cpu_limit", lambda root="": 4.0)
    assert runner.available_cores() == 4
    assert runner.resolve_workers(0) == 4 and runner.resolve_workers(-1) == 3
    assert runner.resolve_workers(6) == 6  # asked for: as given
    monkeypatch.setattr(runner, "cgroup_cpu_limit", lambda root="": 0.5)
    assert runner.available_cores() == 1
    monkeypatch.setattr(runner, "cgroup_cpu_limit", lambda root="": None)
    monkeypatch.setattr(runner.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert runner.available_cores() == 3


@pytest.mark.parametrize("workers", [1, 2])
def test_a_run_builds_its_model_once(
    disk_slide, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    """The model a run prepares with is the one its tile workers use: built
    once per run, not again for the tiles."""
    from nucleus_models import models
    from nucleus_models.wsi import runner

    path, centres, _ = disk_slide
    real, built = models.get_model, []

    def counting(name: str, **options: object) -> object:
        built.append(name)
        return real(name, **options)

    monkeypatch.setattr(models, "get_model", counting)
    runner._built_model.cache_clear()
    try:
        res = _run(path, analysis_tile_size=256, num_workers=workers)
    finally:
        runner._built_model.cache_clear()
    assert built == ["classical-he"]
    assert len(res.nuclei) == len(centres)


def test_area_px_is_in_base_pixels_like_the_coordinates(tmp_path: Path) -> None:
    """A 40x slide (0.25 um/px) analysed at the model's 0.5 um/px: the CSV's
    and GeoJSON's area_px is counted in the slide's pixels, as x, y and the
    boxes are (it was the analysis grid's count, 4x too small here)."""
    from conftest import disk_centres, draw_disks, write_pyramidal_tiff

    radius = 14.0  # base px: 7 um across, the fixture's disks at 0.5 um/px
    centres = disk_centres(600, 500, (256,), radius=radius)
    path = write_pyramidal_tiff(
        tmp_path / "disks40x.tif", draw_disks(600, 500, centres, radius), mpp=0.25
    )
    res = _run(path)
    assert res.tiles["analysis_mpp"] == 0.5
    nuc = res.nuclei
    assert _match(nuc.centroids, centres, tol=3.0)[0] == len(centres) == len(nuc)
    disk = np.pi * radius**2
    np.testing.assert_allclose(nuc.measurements["area_px"], disk, rtol=0.15)
    np.testing.assert_allclose(nuc.measurements["area_um2"], disk * 0.25**2, rtol=0.15)


def _tile_job(downsample: float, size: tuple[int, int]) -> TileJob:
    base = (int(size[0] * downsample), int(size[1] * downsample))
    return TileJob("", None, "", (), downsample=downsample, image_size=size, base_size=base)


def _instances(labels: np.ndarray) -> TileInstances:
    n = int(labels.max())
    return TileInstances(labels.astype(np.int32), np.ones(n + 1, np.float32), np.zeros(n + 1))


def test_a_tile_drops_nuclei_cut_at_its_inner_edges_and_keeps_those_at_the_slides() -> None:
    """With an overlap smaller than a nucleus, a nucleus touching an inner
    edge of the read window is cut (its centroid may still lie in the core):
    dropped. One touching the slide's own edge is whole: kept. Both corner
    tiles of a 100 x 100 slide, each read 3 px past its core."""
    from nucleus_models.wsi.runner import _tile_nuclei
    from nucleus_models.wsi.tiling import Tile

    lab = np.zeros((43, 43), np.int32)
    lab[10:20, 0:8] = 1  # touches the window's left edge; centroid 4 px inside
    lab[0:8, 10:20] = 2  # touches its top edge
    lab[20:30, 35:43] = 3  # touches its right edge
    lab[35:43, 20:30] = 4  # touches its bottom edge
    lab[15:25, 15:25] = 5  # touches nothing
    job = _tile_job(1.0, (100, 100))
    # the bottom-right tile: left and top are inner edges, right and bottom the slide's
    far = _tile_nuclei(job, Tile(3, (60, 60, 100, 100), (57, 57, 100, 100)), _instances(lab))
    assert sorted(far.centroids.tolist()) == [[77, 77], [82, 96], [96, 82]]  # 5, 4, 3
    # the top-left tile (the same nuclei mirrored): left and top are the slide's
    near = _tile_nuclei(job, Tile(0, (0, 0, 40, 40), (0, 0, 43, 43)), _instances(lab[::-1, ::-1]))
    assert sorted(near.centroids.tolist()) == [[4, 18], [18, 4], [23, 23]]  # 3, 4, 5


def test_a_tile_keeps_a_nucleus_by_where_it_reports_it() -> None:
    """Resampled (1.5 base px per analysis px), a window starts on a rounded
    base pixel; a tile keeps exactly the nuclei whose reported centroid, in
    analysis pixels, lies in its core: judged from the window's own edges
    instead, a nucleus near a seam went to both tiles or to neither."""
    from scipy import ndimage as ndi

    from nucleus_models.wsi.runner import _base_window, _tile_nuclei
    from nucleus_models.wsi.tiling import Tile, in_core

    rng = np.random.default_rng(0)
    blobs = np.zeros((80, 80), bool)
    blobs[10:70, 10:70] = rng.random((60, 60)) < 0.45  # ~350 nuclei, none at the edges
    lab, _ = ndi.label(blobs)
    inst = _instances(lab)
    job = _tile_job(1.5, (200, 200))
    for x0 in (1, 3, 5):  # windows at 1.5, 4.5, 7.5 base px: rounded, 0.5 px off
        tile = Tile(0, (x0 + 20, x0 + 20, x0 + 60, x0 + 60), (x0, x0, x0 + 80, x0 + 80))
        bx0, by0, bx1, by1 = _base_window(job, tile)
        every = nuclei_from_labels(lab).transformed(
            scale=((bx1 - bx0) / 80, (by1 - by0) / 80), offset=(bx0, by0)
        )
        want = every.centroids[in_core(every.centroids / 1.5, tile.core)]
        got = _tile_nuclei(job, tile, inst).centroids
        np.testing.assert_allclose(got[np.lexsort(got.T)], want[np.lexsort(want.T)])


class _SeamModel:
    """A model whose two tiles outline things near their seam (x = 32 of a
    64 x 32 slide, tiles of 32 with 16 px overlap) a little differently, as
    two tiles that see a nucleus with different context (or, resampled,
    different pixels) do. Its image is filled with the window's left edge,
    so it knows which tile it is segmenting."""

    def preprocess(self, images: list[np.ndarray], context: object) -> list[np.ndarray]:
        return images

    def forward(self, x: list[np.ndarray]) -> list[np.ndarray]:
        return x

    def postprocess(self, raw: object, images: list[np.ndarray], context: object) -> list[object]:
        out = []
        for img in images:
            left = int(img[0, 0, 0])  # 0: the left tile, 16: the right one
            nudge = 0 if left == 0 else 1
            full = np.zeros((32, 64), np.int32)
            # one nucleus on the seam: columns 27-35 in the left tile (centroid
            # x 31.5, its core), 28-36 in the right one (32.5, its core)
            full[4:12, 27 + nudge : 36 + nudge] = 1
            # two distinct touching nuclei, their border a column apart in the
            # two tiles (each tile's left one overlaps the other's right one
            # by a column: an eighth of it)
            full[18:26, 24 : 32 - nudge] = 2
            full[18:26, 32 - nudge : 40] = 3
            lab = np.ascontiguousarray(full[:, left : left + img.shape[1]])
            out.append(_instances(lab))
        return out

    def predict_batch(self, crops: list[np.ndarray], context: object) -> list[object]:
        return self.postprocess(None, crops, context)


def test_a_nucleus_two_tiles_outline_differently_on_their_seam_is_reported_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two tiles outlined a nucleus on their seam a column apart, each with
    its centroid 0.5 px inside its own core: both kept it, so it was reported
    twice (about 1 nucleus in 600 of unet-monuseg's on a MoNuSeg mosaic at
    2.5x shrink with 96 px tiles). Now once: the sighting nearer the other
    tile's core goes (a tie: the later one). Two distinct touching nuclei
    whose outlines overlap by a sliver across the seam both stay."""
    from nucleus_models.wsi import runner
    from nucleus_models.wsi.tiling import tile_grid

    job = _tile_job(1.0, (64, 32))
    tiles = tile_grid((0, 0, 64, 32), tile_size=32, overlap=16)
    assert [t.read for t in tiles] == [(0, 0, 48, 32), (16, 0, 64, 32)]
    monkeypatch.setattr(runner, "_model", lambda name, options: _SeamModel())
    monkeypatch.setattr(
        runner,
        "read_tile",
        lambda job, t: np.full(
            (t.read[3] - t.read[1], t.read[2] - t.read[0], 3), t.read[0], np.uint8
        ),
    )
    for kw in ({}, {"batch_size": 2}):
        nuc = runner.run_tiles(job, tiles, **kw)
        assert sorted(nuc.centroids.tolist()) == [[28.0, 22.0], [31.5, 8.0], [35.5, 22.0]]
        assert len(nuc.polygons()) == 3


def test_an_in_memory_image_keeps_one_sighting_of_a_seam_nucleus_too() -> None:
    """segment_array (segment_image, cross-validation) painted both tiles'
    sightings of a seam nucleus, the second over most of the first: a
    fourth instance of 8 px, a sliver that evaluation counted as a false
    positive. Now the three nuclei, whole."""
    from nucleus_models.wsi.runner import segment_array

    image = np.zeros((32, 64, 3), np.uint8)
    image[..., 0] = np.arange(64)  # each crop's first pixel: its left edge
    lab, scores, classes = segment_array(image, _SeamModel(), {}, tile_size=32, overlap=16)
    assert len(scores) == len(classes) == 4  # entry 0 unused
    areas = np.bincount(lab.ravel())
    # the seam nucleus, then the touching two (the right one, painted later,
    # takes the column where the two tiles' outlines of them overlap)
    assert areas[1:].tolist() == [72, 56, 72]
    assert nuclei_from_labels(lab).centroids.tolist() == [[31.5, 8.0], [27.5, 22.0], [35.5, 22.0]]


class _UnequalSeamModel(_SeamModel):
    """The left tile outlines the seam nucleus narrow (columns 29-33,
    centroid x 31.5: its core), the right one whole (27-38, 33.0: its core):
    the whole outline covers all of the narrow one, under half of itself."""

    def postprocess(self, raw: object, images: list[np.ndarray], context: object) -> list[object]:
        out = []
        for img in images:
            left = int(img[0, 0, 0])  # 0: the left tile, 16: the right one
            full = np.zeros((32, 64), np.int32)
            if left == 0:
                full[4:12, 29:34] = 1
            else:
                full[4:12, 27:39] = 1
            out.append(_instances(np.ascontiguousarray(full[:, left : left + img.shape[1]])))
        return out


@pytest.mark.parametrize("downsample", [1.0, 2.0])
def test_a_seam_nucleus_one_tile_outlines_smaller_is_reported_once(
    monkeypatch: pytest.MonkeyPatch, downsample: float
) -> None:
    """Two sightings of one nucleus of different sizes are one (the share is
    of the smaller one), at a downsampled analysis too (the centroids and
    boxes compared with the cores in analysis pixels, not base ones): the
    whole one, deeper inside its core, stays. The same in memory."""
    from nucleus_models.wsi import runner
    from nucleus_models.wsi.runner import segment_array
    from nucleus_models.wsi.tiling import tile_grid

    job = _tile_job(downsample, (64, 32))
    tiles = tile_grid((0, 0, 64, 32), tile_size=32, overlap=16)
    monkeypatch.setattr(runner, "_model", lambda name, options: _UnequalSeamModel())
    monkeypatch.setattr(
        runner,
        "read_tile",
        lambda job, t: np.full(
            (t.read[3] - t.read[1], t.read[2] - t.read[0], 3), t.read[0], np.uint8
        ),
    )
    nuc = runner.run_tiles(job, tiles)
    np.testing.assert_allclose(nuc.centroids, [[33.0 * downsample, 8.0 * downsample]])
    image = np.zeros((32, 64, 3), np.uint8)
    image[..., 0] = np.arange(64)
    lab, scores, _ = segment_array(image, _UnequalSeamModel(), {}, tile_size=32, overlap=16)
    assert len(scores) == 2 and np.bincount(lab.ravel())[1:].tolist() == [96]
    assert nuclei_from_labels(lab).centroids.tolist() == [[33.0, 8.0]]
