"""Tests of the dataset loaders in benchmark.datasets.

Real data is read from ``../shared/data`` relative to the repository root (or
``$NUCLEUS_SHARED_DATA``); when it is missing these tests fail, they do not skip.
BBBC039 and Kromp et al. 2020 are not in the shared data, so they are tested on
tiny fixtures written in their documented layouts.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from benchmark.datasets import (
    Dataset,
    DatasetError,
    Sample,
    fingerprint,
    get_dataset,
    list_datasets,
)
from benchmark.datasets.monuseg import MoNuSeg

ALL_NAMES = [
    "bbbc038",
    "bbbc039",
    "ccagt",
    "deepliif",
    "folder",
    "kromp2020",
    "monuseg",
    "pt_fixation",
]


def _shared_root() -> Path:
    env = os.environ.get("NUCLEUS_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared() -> Path:
    root = _shared_root()
    if not root.is_dir():
        pytest.fail(
            f"shared test data not found at {root}: the real datasets must be available "
            "at ../shared/data relative to the repository root, or set NUCLEUS_SHARED_DATA",
            pytrace=False,
        )
    return root


def need(shared: Path, rel: str) -> Path:
    """Return ``shared / rel`` or fail loudly when that dataset folder is missing."""
    p = shared / rel
    if not p.exists():
        pytest.fail(f"shared dataset folder missing: {p}", pytrace=False)
    return p


def check_sample(s: Sample) -> None:
    """Invariants every Sample must satisfy."""
    assert isinstance(s.id, str) and s.id
    assert s.modality in ("brightfield", "fluorescence")
    if s.modality == "brightfield" and s.image.size:
        assert s.image.ndim == 3 and s.image.shape[2] == 3 and s.image.dtype == np.uint8
    if s.labels is not None:
        assert s.labels.dtype == np.int32
        assert s.labels.shape == s.image.shape[:2]
        assert s.labels.min() >= 0
    if s.points is not None:
        assert s.points.dtype == np.float64 and s.points.ndim == 2 and s.points.shape[1] == 2
        if s.point_classes is not None:
            assert len(s.point_classes) == len(s.points)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in s.groups.items())


# -- registry ---------------------------------------------------------------------
def test_registry_lists_all_eight() -> None:
    assert list_datasets() == ALL_NAMES


def test_get_dataset_unknown_name() -> None:
    with pytest.raises(KeyError, match="unknown dataset"):
        get_dataset("nope", ".")


@pytest.mark.parametrize("name", ALL_NAMES)
def test_wrong_layout_raises_clear_error(name: str, tmp_path: Path) -> None:
    (tmp_path / "something_else").mkdir()
    (tmp_path / "readme.txt").write_text("not a dataset")
    with pytest.raises(DatasetError) as exc:
        get_dataset(name, tmp_path)
    msg = str(exc.value)
    assert "\n" not in msg
    assert name in msg and str(tmp_path) in msg


@pytest.mark.parametrize("name", ALL_NAMES)
def test_missing_root_raises(name: str, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        get_dataset(name, tmp_path / "absent")


# -- MoNuSeg ----------------------------------------------------------------------
def test_monuseg_real(shared: Path) -> None:
    root = need(shared, "monuseg2018/train")
    ds = get_dataset("monuseg", root)
    stems = {p.stem for p in (root / "images").glob("*.tif")}
    xmls = {p.stem for p in (root / "annotations").glob("*.xml")}
    assert ds.kind == "instances" and len(ds) == 13
    assert ds.ids() == sorted(stems & xmls)
    s = ds.load("TCGA-A7-A13E-01Z-00-DX1")
    check_sample(s)
    assert s.image.shape == (1000, 1000, 3)
    assert 200 < s.n_instances <= s.extra["n_regions"]
    assert s.labels.max() == s.n_instances  # sequential labels
    assert s.groups["organ"] == "breast" and s.groups["tcga_site"] == "A7"
    assert s.groups["patient"] == "TCGA-A7-A13E"
    assert s.mpp == pytest.approx(0.25, abs=0.01)
    # parent folder (holding train/) works too; unlabelled images on request
    full = get_dataset("monuseg", root.parent, include_unlabelled=True)
    assert len(full) == len(stems) == 30
    unl = full.load(sorted(stems - xmls)[0])
    assert unl.labels is None and unl.image.shape == (1000, 1000, 3)


MONUSEG_TEST_IDS = [
    "TCGA-2Z-A9J9-01A-01-TS1", "TCGA-44-2665-01B-06-BS6", "TCGA-69-7764-01A-01-TS1",
    "TCGA-A6-6782-01A-01-BS1", "TCGA-AC-A2FO-01A-01-TS1", "TCGA-AO-A0J2-01A-01-BSA",
    "TCGA-CU-A0YN-01A-02-BSB", "TCGA-EJ-A46H-01A-03-TSC", "TCGA-FG-A4MU-01B-01-TS1",
    "TCGA-GL-6846-01A-01-BS1", "TCGA-HC-7209-01A-01-TS1", "TCGA-HT-8564-01Z-00-DX1",
    "TCGA-IZ-8196-01A-01-BS1", "TCGA-ZF-A9R5-01A-01-TS1",
]  # fmt: skip


def test_monuseg_flat_test_download(shared: Path, tmp_path: Path) -> None:
    """The challenge's test download has tiles and XMLs side by side (MoNuSegTestData/)."""
    root = need(shared, "monuseg2018/train")
    flat = tmp_path / "MoNuSegTestData"
    flat.mkdir()
    stems = sorted(p.stem for p in (root / "annotations").glob("*.xml"))[:2]
    for stem in stems:
        (flat / f"{stem}.tif").symlink_to((root / "images" / f"{stem}.tif").resolve())
        (flat / f"{stem}.xml").symlink_to((root / "annotations" / f"{stem}.xml").resolve())
    (flat / "notes.txt").write_text("not an image")
    ds, ref = get_dataset("monuseg", flat), get_dataset("monuseg", root)
    assert ds.ids() == stems
    for stem in stems:
        a, b = ds.load(stem), ref.load(stem)
        check_sample(a)
        assert np.array_equal(a.labels, b.labels) and np.array_equal(a.image, b.image)
    # some unpackings keep the XMLs in Annotations/ beside the tiles
    (flat / "Annotations").mkdir()
    for stem in stems:
        (flat / f"{stem}.xml").rename(flat / "Annotations" / f"{stem}.xml")
    moved = get_dataset("monuseg", flat)
    assert moved.ids() == stems
    assert np.array_equal(moved.load(stems[0]).labels, ref.load(stems[0]).labels)
    with pytest.raises(DatasetError, match="MoNuSegTestData"):
        get_dataset("monuseg", tmp_path / "MoNuSegTestData" / ".." / "..")
    # the test set's organs, two of them unseen in training, group the report
    organs = {MoNuSeg.groups_for(i)["organ"] for i in MONUSEG_TEST_IDS}
    assert organs == {"bladder", "breast", "colon", "kidney", "prostate", "brain", "lung"}


def test_monuseg_rasterisation_overwrites_and_clips(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    tifffile.imwrite(
        tmp_path / "images" / "TCGA-ZZ-0001-01Z-00-DX1.tif", np.zeros((20, 20, 3), np.uint8)
    )
    regions = [
        [(2, 2), (10, 2), (10, 10), (2, 10)],  # square 1
        [(6, 6), (25, 6), (25, 14), (6, 14)],  # overlaps 1, runs past the right edge
        [(15, 15), (15, 15.5)],  # degenerate: no label
    ]
    body = "".join(
        "<Region><Vertices>"
        + "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in r)
        + "</Vertices></Region>"
        for r in regions
    )
    xml = f'<Annotations MicronsPerPixel="0.2468"><Annotation><Regions>{body}</Regions></Annotation></Annotations>'
    (tmp_path / "annotations" / "TCGA-ZZ-0001-01Z-00-DX1.xml").write_text(xml)
    s = get_dataset("monuseg", tmp_path).load("TCGA-ZZ-0001-01Z-00-DX1")
    assert s.n_instances == 2
    assert s.labels[8, 8] == 2  # later region overwrites
    assert s.labels[3, 3] == 1
    assert s.labels[10, 19] == 2  # clipped at the border
    assert s.mpp == pytest.approx(0.2468)
    assert s.groups["organ"] == "unknown" and s.groups["tcga_site"] == "ZZ"


# -- BBBC038 ----------------------------------------------------------------------
def test_bbbc038_real(shared: Path) -> None:
    root = need(shared, "dsb2018_bbbc038")
    ds = get_dataset("bbbc038", root)
    assert len(ds) == 45 and ds.splits() == ["stage1_test"]
    assert len(ds.ids("stage1_test")) == 45
    assert get_dataset("bbbc038", root / "stage1_test").ids() == ds.ids()
    # one RGBA fluorescence image and one brightfield image
    rgba = "0e132f71c8b4875c3c2dd7a22997468a3e842b46aa9bd47cf7b0e8b7d63f0925"
    bright = "0f1f896d9ae5a04752d3239c690402c022db4d72c0d2c087d73380896f72c466"
    for sid in (rgba, bright):
        s = ds.load(sid)
        check_sample(s)
        n_masks = len(list((root / "stage1_test" / sid / "masks").glob("*.png")))
        assert s.n_instances == n_masks == s.labels.max()
        assert s.groups["modality"] == s.modality
    assert ds.load(rgba).modality == "fluorescence" and ds.load(rgba).image.ndim == 2
    assert ds.load(bright).modality == "brightfield" and ds.load(bright).image.shape[2] == 3


def _encode_rle(mask: np.ndarray) -> str:
    """Column-major 1-based runs, as the Data Science Bowl's CSVs (written independently)."""
    flat = np.concatenate([[0], mask.T.ravel().astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(flat))
    starts, ends = edges[0::2], edges[1::2]
    return " ".join(f"{a + 1} {b - a}" for a, b in zip(starts, ends, strict=True))


def test_bbbc038_solution_csv(shared: Path, tmp_path: Path) -> None:
    """The challenge's download: images only, nuclei in stage1_solution.csv beside them."""
    root = need(shared, "dsb2018_bbbc038")
    ref = get_dataset("bbbc038", root)
    ids = [
        "0e132f71c8b4875c3c2dd7a22997468a3e842b46aa9bd47cf7b0e8b7d63f0925",
        "0f1f896d9ae5a04752d3239c690402c022db4d72c0d2c087d73380896f72c466",
    ]
    rows = ["ImageId,EncodedPixels,Height,Width,Usage"]
    for sid in ids:
        d = tmp_path / "stage1_test" / sid / "images"
        d.mkdir(parents=True)
        (d / f"{sid}.png").symlink_to(
            (root / "stage1_test" / sid / "images" / f"{sid}.png").resolve()
        )
        labels = ref.load(sid).labels
        for k in range(1, int(labels.max()) + 1):
            h, w = labels.shape
            rows.append(f"{sid},{_encode_rle(labels == k)},{h},{w},Public")
    # an image with no CSV rows stays out, as one with an empty masks/ folder does
    other = tmp_path / "stage1_test" / "unlabelled" / "images"
    other.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(other / "unlabelled.png")
    (tmp_path / "stage1_solution.csv").write_text("\n".join(rows) + "\n")
    for where in (tmp_path, tmp_path / "stage1_test"):  # the CSV beside a stage folder too
        ds = get_dataset("bbbc038", where)
        assert ds.ids() == sorted(ids)
        assert tmp_path / "stage1_solution.csv" in ds.files()
        for sid in ids:
            s = ds.load(sid)
            check_sample(s)
            assert np.array_equal(s.labels, ref.load(sid).labels)
            assert s.extra["n_masks"] == s.n_instances == ref.load(sid).n_instances
    # a run past the image's end is a one-line error naming the sample
    bad = rows[:2] + [f"{ids[0]},999999 5,,,Public"]
    (tmp_path / "stage1_solution.csv").write_text("\n".join(bad) + "\n")
    with pytest.raises(DatasetError, match="runs outside") as exc:
        get_dataset("bbbc038", tmp_path).load(ids[0])
    assert "\n" not in str(exc.value) and ids[0] in str(exc.value)


# -- BBBC039 (fixture) ------------------------------------------------------------
def _write_bbbc039(root: Path) -> None:
    for d in ("images", "masks", "metadata"):
        (root / d).mkdir(parents=True)
    names = ["IXMtest_A02_s1_w1AAAA", "IXMtest_B03_s2_w1BBBB"]
    for name in names:
        img = (np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 50).astype(np.uint16)
        tifffile.imwrite(root / "images" / f"{name}.tif", img)
        code = np.zeros((20, 30), np.uint8)
        code[2:6, 2:6] = 1  # isolated nucleus
        code[10:15, 3:8] = 2  # two touching nuclei, told apart by their code
        code[10:15, 8:12] = 3
        code[2:6, 20:25] = 1  # another isolated nucleus, same code as the first
        rgb = np.stack([code, np.zeros_like(code), (code > 0).astype(np.uint8) * 255], axis=2)
        Image.fromarray(rgb).save(root / "masks" / f"{name}.png")
    (root / "metadata" / "training.txt").write_text(f"{names[0]}.png\n")
    (root / "metadata" / "validation.txt").write_text("")
    (root / "metadata" / "test.txt").write_text(f"{names[1]}.png\n")


def test_bbbc039_fixture(tmp_path: Path) -> None:
    _write_bbbc039(tmp_path)
    ds = get_dataset("bbbc039", tmp_path)
    assert len(ds) == 2
    assert ds.ids("train") == ["IXMtest_A02_s1_w1AAAA"]
    assert ds.ids("test") == ["IXMtest_B03_s2_w1BBBB"]
    assert ds.ids("validation") == []
    s = ds.load("IXMtest_A02_s1_w1AAAA")
    check_sample(s)
    assert s.modality == "fluorescence" and s.image.dtype == np.uint16 and s.image.ndim == 2
    assert s.n_instances == 4
    assert s.labels[12, 5] != s.labels[12, 9]  # touching nuclei are separate
    assert s.labels[3, 3] != s.labels[3, 22]  # same code, not connected
    assert s.groups == {"split": "training", "well": "A02"}
    with pytest.raises(DatasetError, match="unknown split"):
        ds.ids("nonsense")


# -- Kromp et al. 2020 (fixture) --------------------------------------------------
def _write_kromp(root: Path) -> None:
    (root / "rawimages").mkdir(parents=True)
    (root / "groundtruth").mkdir()
    for name, dtype in (("Ganglioneuroblastoma_0", np.uint8), ("Neuroblastoma_7", np.uint16)):
        tifffile.imwrite(root / "rawimages" / f"{name}.tif", np.full((16, 24), 7, dtype))
        gt = np.zeros((16, 24), np.uint16)
        gt[1:5, 1:5] = 17
        gt[8:12, 10:20] = 300
        tifffile.imwrite(root / "groundtruth" / f"{name}.tif", gt)
    header = (
        "Image_Name;Diagnosis;Preparation;Train-/Testset split;Testset class;Magnification;"
        "Modality;Software;Mean background;Mean foreground;Signal/noise ratio;S/N Class"
    )
    rows = [
        "Ganglioneuroblastoma_0;Ganglioneuroblastoma;tissue section;train;;10x;"
        "Zeiss Axioplan II;Metafer;10;60;6;high",
        "Neuroblastoma_7;Neuroblastoma;cell line cytospin;test;NB-III;63x;"
        "Leica LSM;LAS;12;40;3.3;low",
    ]
    (root / "image_description.csv").write_text("\n".join([header, *rows]) + "\n")


def test_kromp2020_fixture(tmp_path: Path) -> None:
    _write_kromp(tmp_path)
    ds = get_dataset("kromp2020", tmp_path)
    assert len(ds) == 2 and ds.splits() == ["test", "train"]
    assert ds.ids("train") == ["Ganglioneuroblastoma_0"]
    s = ds.load("Neuroblastoma_7")
    check_sample(s)
    assert s.image.dtype == np.uint16 and s.modality == "fluorescence"
    assert s.n_instances == 2 and s.labels.max() == 2
    g = s.groups
    assert g["preparation"] == "cell line cytospin" and g["diagnosis"] == "Neuroblastoma"
    assert g["split"] == "test" and g["challenge_level"] == "NB-III"
    assert g["magnification"] == "63x" and g["snr_class"] == "low"
    # no test-set class: the challenge level falls back to the S/N class
    assert ds.load("Ganglioneuroblastoma_0").groups["challenge_level"] == "high"


# -- Prostate fixation -----------------------------------------------------------
def test_pt_fixation_real(shared: Path) -> None:
    root = need(shared, "prostate_fixation_pt")
    ds = get_dataset("pt_fixation", root, points_only=True)
    assert ds.kind == "points" and len(ds) == 48
    assert ds.splits() == ["formalin", "frozen", "paxgene"]
    assert len(ds.ids("PAXgene")) == 16
    s = ds.load("Formalin_1")
    check_sample(s)
    assert s.image.size == 0 and s.labels is None
    assert s.groups == {"fixation": "Formalin", "patient": "P01"}
    assert s.n_points == 1082 and s.mpp == pytest.approx(0.23)
    assert s.points.min() >= 0 and s.points.max() < 2444
    dup = ds.load("Formalin_12")  # this file repeats some markers
    assert dup.extra["n_duplicate_markers"] > 0
    assert len(np.unique(dup.points, axis=0)) == dup.n_points
    patients = {ds.load(i).groups["patient"] for i in ds.ids("frozen")}
    assert len(patients) == 16
    # images are not shipped: loading them must fail clearly
    with pytest.raises(DatasetError, match="Formalin_1.tif not found in .*put them in HE/"):
        get_dataset("pt_fixation", root).load("Formalin_1")


def test_pt_fixation_with_image(tmp_path: Path) -> None:
    (tmp_path / "annotations").mkdir()
    (tmp_path / "HE").mkdir()
    markers = "".join(
        f"<Marker><MarkerX>{x}</MarkerX><MarkerY>{y}</MarkerY><MarkerZ>1</MarkerZ></Marker>"
        for x, y in [(3, 4), (10, 2), (3, 4)]
    )
    xml = (
        "<CellCounter_Marker_File><Image_Properties><Image_Filename>Frozen_3.tif"
        "</Image_Filename></Image_Properties><Marker_Data>"
        "<Marker_Type><Type>1</Type><Marker><MarkerX>1</MarkerX><MarkerY>1</MarkerY></Marker>"
        f"</Marker_Type><Marker_Type><Type>8</Type>{markers}</Marker_Type>"
        "</Marker_Data></CellCounter_Marker_File>"
    )
    (tmp_path / "annotations" / "CellCounter_Frozen_3.xml").write_text(xml)
    tifffile.imwrite(tmp_path / "HE" / "Frozen_3.tif", np.zeros((12, 12, 3), np.uint8))
    s = get_dataset("pt_fixation", tmp_path).load("Frozen_3")
    check_sample(s)
    assert s.image.shape == (12, 12, 3)
    np.testing.assert_array_equal(s.points, [[3.0, 4.0], [10.0, 2.0]])
    assert s.groups == {"fixation": "Frozen", "patient": "P03"}
    assert s.extra["image_filename"] == "Frozen_3.tif"


# -- CCAgT ------------------------------------------------------------------------
def test_ccagt_real(shared: Path) -> None:
    root = need(shared, "ccagt_agnor")
    ds = get_dataset("ccagt", root)
    assert len(ds) == 4
    for sid in ("M_2042_-257760_58320", "H_10177_-266400_93960"):
        s = ds.load(sid)
        check_sample(s)
        e = s.extra
        assert s.mpp == pytest.approx(0.111) and s.groups["slide"] == sid[0]
        assert e["instance_source"] == "panoptic"
        assert set(e["agnor_counts"]) == set(range(1, s.n_instances + 1))
        n_nor = int(e["nor_labels"].max())
        assert n_nor > 0 and sum(e["agnor_counts"].values()) == n_nor  # every NOR has a nucleus
        for nor_id, parent in e["nor_parent"].items():
            # NOR pixels are part of their nucleus's full area
            assert np.all(s.labels[e["nor_labels"] == nor_id] == parent)
        assert set(e["nor_classes"].values()) <= {"cluster", "satellite"}
    # the H tile has nuclei with several AgNORs
    assert max(e["agnor_counts"].values()) >= 4


# -- DeepLIIF ---------------------------------------------------------------------
def test_deepliif_real(shared: Path) -> None:
    root = need(shared, "deepliif")
    ds = get_dataset("deepliif", root)
    assert ds.ids() == ["Bladder1", "Lung1"]
    s = ds.load("Bladder1")
    check_sample(s)
    assert s.image.shape == (512, 512, 3)
    pos = s.extra["positive"]
    n_pos = sum(pos.values())
    assert n_pos >= 5 and len(pos) - n_pos >= 50 and len(pos) == s.n_instances
    assert s.point_classes.sum() == n_pos and len(s.points) == s.n_instances
    cm = s.extra["class_map"]
    k = next(lab for lab, p in pos.items() if p)
    assert np.all(cm[s.labels == k] == 2)
    assert set(s.extra["panels"]) == {"hematoxylin", "dapi", "lap2", "ki67", "segmentation"}
    full = get_dataset("deepliif", root, include_unlabelled=True)
    assert len(full) == 7
    u = full.load(full.ids("unlabelled")[0])
    assert u.labels is None and u.image.ndim == 3


# -- base behaviour -----------------------------------------------------------------
def test_iteration_len_and_fingerprint(tmp_path: Path) -> None:
    _write_bbbc039(tmp_path)
    ds: Dataset = get_dataset("bbbc039", tmp_path)
    samples = list(ds)
    assert [s.id for s in samples] == ds.ids() and len(samples) == len(ds)
    fp = fingerprint(ds)
    assert len(fp) == 64 and fp == fingerprint(get_dataset("bbbc039", tmp_path))
    (tmp_path / "metadata" / "validation.txt").write_text("extra\n")
    assert fingerprint(get_dataset("bbbc039", tmp_path)) != fp
    with pytest.raises(DatasetError, match="no sample"):
        ds.load("missing")


def test_fingerprint_real_is_stable(shared: Path) -> None:
    ds = get_dataset("pt_fixation", need(shared, "prostate_fixation_pt"), points_only=True)
    assert fingerprint(ds) == fingerprint(ds)
    assert len(ds.files()) == 48


# -- mutation-test gaps: exact geometry, ids, channels ----------------------------
def test_monuseg_outline_rasterises_at_pixel_centres_with_sequential_ids() -> None:
    from benchmark.datasets.monuseg import rasterize_polygons

    # x 2..12, y 3..7: a wide rectangle, so an x/y swap or a one-pixel shift shows
    rect = np.array([(2, 3), (12, 3), (12, 7), (2, 7)], float)
    inner = np.array([(3, 4), (5, 4), (5, 6), (3, 6)], float)  # fully overwritten
    other = np.array([(14, 10), (16, 10), (16, 12), (14, 12)], float)
    lab = rasterize_polygons([inner, rect, other], (16, 20))
    rr, cc = np.nonzero(lab == 1)
    assert (rr.min(), rr.max(), cc.min(), cc.max()) == (3, 7, 2, 12)
    assert (lab == 1).sum() == 5 * 11
    # the region drawn over leaves no gap in the ids: 1..N
    assert sorted(np.unique(lab).tolist()) == [0, 1, 2]


def test_natural_order_uint16_masks_and_modality_guess(tmp_path: Path) -> None:
    from benchmark.datasets.base import natural_key, to_rgb_uint8
    from benchmark.datasets.bbbc038 import guess_modality

    assert sorted(["a_10", "a_2", "a_1"], key=natural_key) == ["a_1", "a_2", "a_10"]
    # a 16-bit file whose values fit 8 bits (up to 255 itself) converts
    assert to_rgb_uint8(np.array([[0, 255]], np.uint16)).max() == 255
    rng = np.random.default_rng(0)
    dark_colour = rng.integers(0, 90, (32, 32, 3)).astype(np.uint8)  # colourful, dark
    assert guess_modality(dark_colour) == "brightfield"
    assert guess_modality(np.full((32, 32, 3), 200, np.uint8)) == "brightfield"  # bright grey
    dapi = np.zeros((32, 32, 3), np.uint8)
    dapi[8:12, 8:12] = 180
    assert guess_modality(dapi) == "fluorescence"


def test_bbbc039_diagonal_pixels_are_one_object_and_val_is_validation(tmp_path: Path) -> None:
    from benchmark.datasets.bbbc039 import decode_bbbc039_mask

    assert decode_bbbc039_mask(np.array([[1, 0], [0, 1]], np.uint8)).max() == 1
    _write_bbbc039(tmp_path)
    (tmp_path / "metadata" / "validation.txt").write_text("IXMtest_B03_s2_w1BBBB.png\n")
    (tmp_path / "metadata" / "test.txt").write_text("")
    ds = get_dataset("bbbc039", tmp_path)
    assert ds.ids("val") == ds.ids("validation") == ["IXMtest_B03_s2_w1BBBB"]


def test_kromp_colour_masks_channel_first_images_and_comma_csv(tmp_path: Path) -> None:
    from benchmark.datasets.kromp2020 import to_label_map

    colour = np.zeros((6, 6, 3), np.uint8)
    colour[1:3, 1:3] = (200, 10, 10)
    colour[3:5, 3:5] = (10, 200, 10)
    lab = to_label_map(colour)
    assert lab[0, 0] == 0 and lab.max() == 2 and lab[1, 1] != lab[3, 3] != 0
    _write_kromp(tmp_path)
    raw = np.zeros((3, 16, 24), np.uint8)
    raw[0, 1:5, 1:5] = 90  # channel-first RGB as some TIFF writers store it
    tifffile.imwrite(tmp_path / "rawimages" / "Neuroblastoma_7.tif", raw, photometric="minisblack")
    csv_text = (tmp_path / "image_description.csv").read_text().replace(";", ",")
    (tmp_path / "image_description.csv").write_text(csv_text)
    ds = get_dataset("kromp2020", tmp_path)
    s = ds.load("Neuroblastoma_7")
    assert s.image.shape == (16, 24, 3) and s.image[2, 2, 0] == 90
    assert s.groups["split"] == "test" and ds.ids("train") == ["Ganglioneuroblastoma_0"]


def test_ccagt_colours_cover_the_tile_and_nors_go_to_their_nucleus() -> None:
    from benchmark.datasets.ccagt import build_instances, segments_from_panoptic

    pan = np.zeros((10, 12, 3), np.uint8)
    pan[:, :6] = (1, 0, 0)  # colours differing only in which channel holds the 1
    pan[:, 6:] = (0, 1, 0)
    sem = np.ones((10, 12), np.int64)
    seg, cls = segments_from_panoptic(pan, sem)
    assert seg.min() == 1 and len(np.unique(seg)) == 2  # no black: every pixel a segment
    # one nucleus with a square cluster and two square satellites painted over it
    sem = np.zeros((20, 20), np.int64)
    sem[2:18, 2:18] = 1
    pan = np.zeros((20, 20, 3), np.uint8)
    pan[2:18, 2:18] = (10, 20, 30)
    for (y, x), c, colour in (
        ((5, 5), 2, (50, 0, 0)),
        ((12, 5), 3, (0, 50, 0)),
        ((12, 12), 3, (0, 0, 50)),
    ):
        sem[y : y + 3, x : x + 3] = c
        pan[y : y + 3, x : x + 3] = colour
    inst = build_instances(*segments_from_panoptic(pan, sem))
    assert inst["nor_parent"] == {1: 1, 2: 1, 3: 1}
    assert inst["cluster_counts"] == {1: 1} and inst["satellite_counts"] == {1: 2}
    assert inst["agnor_counts"] == {1: 3} and (inst["labels"] == 1).sum() == 16 * 16


def test_deepliif_image_is_the_ihc_panel_and_points_lie_on_their_nuclei(shared: Path) -> None:
    from benchmark.datasets.base import read_image

    ds = get_dataset("deepliif", need(shared, "deepliif"))
    s = ds.load("Bladder1")
    full = read_image(next(p for p in ds.files() if p.stem == "Bladder1"))[..., :3]
    np.testing.assert_array_equal(s.image, full[:, :512])
    x, y = np.rint(s.points).astype(int).T
    on_own = s.labels[y, x] == np.arange(1, len(s.points) + 1)
    assert on_own.mean() > 0.9


def test_folder_binary_masks_join_diagonal_pixels_and_mpp_txt_is_used(tmp_path: Path) -> None:
    from benchmark.datasets.folder import instance_labels

    diag = np.zeros((4, 4), np.uint8)
    diag[1, 1] = diag[2, 2] = 255
    assert instance_labels(diag)[0].max() == 1
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(diag.repeat(2, 0).repeat(2, 1)).save(tmp_path / "masks" / "a.png")
    (tmp_path / "mpp.txt").write_text("0.5\n")
    assert get_dataset("folder", tmp_path).load("a").mpp == pytest.approx(0.5)


def test_kromp_synonym_columns_the_first_filled_one_wins(tmp_path: Path) -> None:
    """A CSV with two columns for one group (``Preparation`` and ``Sample
    preparation``; ``Train-/Testset split`` and ``Split``): the first one
    with a value gives it, a later synonym only fills it where the first is
    empty (a mutation run letting the later column overwrite passed the suite)."""
    from benchmark.datasets.kromp2020 import read_image_description

    path = tmp_path / "image_description.csv"
    path.write_text(
        "Image_Name;Preparation;Train-/Testset split;Sample preparation;Split\n"
        "a.tif;tissue section;train;cytospin;test\n"
        "b.tif;;test;touch imprint;train\n"
    )
    meta = read_image_description(path)
    assert meta["a"]["preparation"] == "tissue section" and meta["a"]["split"] == "train"
    assert meta["b"]["preparation"] == "touch imprint" and meta["b"]["split"] == "test"
