"""Multi-frame slides (multiplex fluorescence channels, z-stacks): the frame
a run analyses, chosen by index or channel name, or picked, read by every
read of the run (overview, white level, tiles, workers) and recorded."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nucleus_models.detection import DetectionParams, detect_nuclei, write_outputs
from nucleus_models.errors import ParameterError

REPO = Path(__file__).resolve().parents[1]
SIZE = 256
#: nuclei of the DAPI channel: disks of radius 10 every 50 px
CENTRES = np.array([(x, y) for y in range(30, SIZE, 50) for x in range(30, SIZE, 50)], float)


def _planes(names: tuple[str, ...], nuclear: str = "DAPI") -> np.ndarray:
    """One 12-bit plane a channel in a 16-bit container: bright disks in
    the ``nuclear`` one only; a bright square (stained tissue, no nuclei)
    in the others."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    planes = np.full((len(names), SIZE, SIZE), 100, np.uint16)
    for i, name in enumerate(names):
        if name == nuclear:
            for cx, cy in CENTRES:
                planes[i][(yy - cy) ** 2 + (xx - cx) ** 2 < 10**2] = 3000
        else:
            planes[i, 40:160, 40:160] = 2000
    return planes


def _ome(
    path: Path,
    names: tuple[str, ...] | None,
    planes: np.ndarray,
    axes: str = "CYX",
    tile: int = 128,
) -> Path:
    import tifffile

    meta: dict[str, object] = {"axes": axes}
    if names is not None:
        meta["Channel"] = {"Name": list(names)}
    tifffile.imwrite(path, planes, ome=True, tile=(tile, tile), metadata=meta)
    return path


@pytest.fixture(scope="module")
def multiplex(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-channel OME-TIFF, DAPI second."""
    names = ("CD3", "DAPI", "CK")
    return _ome(tmp_path_factory.mktemp("frames") / "mif.ome.tif", names, _planes(names))


def _found(centroids: np.ndarray) -> int:
    """How many of the DAPI disks have a nucleus within 4 px of their centre."""
    if not len(centroids):
        return 0
    d = np.hypot(*(CENTRES[:, None, :] - centroids[None, :, :]).transpose(2, 0, 1))
    return int((d.min(axis=1) < 4).sum())


def _detect(path: Path, frame: str = "", **kw: object):  # noqa: ANN202
    params = DetectionParams(
        str(path), model="unet-bbbc038", input_mpp=0.5, precision="float32", frame=frame, **kw
    )
    return detect_nuclei(params)


def test_large_image_opens_the_ome_tiffs_here() -> None:
    """The sources the tests below read through (the Docker image installs the same)."""
    import large_image

    large_image.tilesource.loadTileSources()
    assert {"tiff", "tifffile"} <= set(large_image.tilesource.AvailableTileSources)


def test_the_dapi_channel_is_picked_and_found(multiplex: Path, caplog) -> None:  # noqa: ANN001
    """No frame given: the one channel named DAPI is analysed, not frame 0
    (which large_image reads by default: its square is no nucleus), and
    the log and provenance say so."""
    caplog.set_level("INFO", logger="nucleus_models")
    r = _detect(multiplex)
    assert _found(r.nuclei.centroids) == len(CENTRES)
    assert r.slide["frame"] == {
        "index": 1,
        "channel": "DAPI",
        "frames": 3,
        "chosen": "nuclear channel",
    }
    assert r.warnings == []
    assert any("frame 1 (DAPI) of 3 frames" in m for m in caplog.messages)


@pytest.mark.parametrize("frame", ["dapi", "1", "DAPI"])
def test_a_frame_given_by_name_in_any_case_or_by_index(multiplex: Path, frame: str) -> None:
    r = _detect(multiplex, frame)
    assert _found(r.nuclei.centroids) == len(CENTRES)
    assert r.slide["frame"]["index"] == 1 and r.slide["frame"]["chosen"] == "given"


def test_another_channel_forced_finds_none_of_the_dapi_nuclei(multiplex: Path) -> None:
    r = _detect(multiplex, "cd3")
    assert _found(r.nuclei.centroids) == 0
    assert r.slide["frame"] == {"index": 0, "channel": "CD3", "frames": 3, "chosen": "given"}


@pytest.mark.parametrize(
    ("frame", "expect"),
    [
        (
            "FITC",
            "'FITC': mif.ome.tif has no channel of that name; it has 3 frames: 0 CD3, 1 DAPI, 2 CK",
        ),
        ("3", "frame 3 is out of range: mif.ome.tif has 3 frames: 0 CD3, 1 DAPI, 2 CK"),
    ],
)
def test_an_unknown_channel_or_index_is_one_line_listing_the_channels(
    multiplex: Path, frame: str, expect: str
) -> None:
    with pytest.raises(ParameterError, match=expect) as err:
        _detect(multiplex, frame)
    assert "\n" not in str(err.value)


def test_a_plain_slide_takes_frame_0_only(tmp_path: Path) -> None:
    import tifffile

    from nucleus_models.wsi.slide import choose_frame, open_slide

    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, _planes(("DAPI",))[0], tile=(128, 128))
    slide = open_slide(path)
    assert choose_frame(slide, "").read_frame is None and choose_frame(slide, "0").index == 0
    with pytest.raises(
        ParameterError, match=r"frame 1 is out of range: plain.tif has 1 frame \(0\)"
    ):
        choose_frame(slide, "1")
    with pytest.raises(ParameterError, match="no channel of that name"):
        choose_frame(slide, "DAPI")


def test_no_nuclear_channel_reads_frame_0_with_a_warning_naming_the_parameter(
    tmp_path: Path,
) -> None:
    unnamed = _ome(tmp_path / "unnamed.ome.tif", None, _planes(("A", "B"), nuclear="B"))
    r = _detect(unnamed)
    assert r.slide["frame"] == {"index": 0, "channel": None, "frames": 2, "chosen": "first"}
    (warning,) = r.warnings
    assert "2 frames (0-1; no channel names)" in warning and "--frame" in warning
    assert _found(r.nuclei.centroids) == 0  # (frame 0: the square)
    two = ("DAPI", "Hoechst", "CK")
    both = _ome(tmp_path / "two.ome.tif", two, _planes(two, nuclear="Hoechst"))
    (warning,) = _detect(both).warnings
    assert (
        "several are nuclear stains (DAPI, Hoechst)" in warning and "0 DAPI, 1 Hoechst" in warning
    )


@pytest.mark.parametrize(
    ("axes", "order", "dapi"),
    [
        ("ZCYX", ["CK", "CD3", "DAPI"] * 2, 2),  # (OME's XYCZT: channels of each plane)
        ("CZYX", ["CK", "CK", "CD3", "CD3", "DAPI", "DAPI"], 4),  # (XYZCT: planes of each channel)
    ],
)
def test_a_z_stack_of_channels_reads_the_first_dapi_plane(
    tmp_path: Path, axes: str, order: list[str], dapi: int
) -> None:
    """Frames of a z-stack of 3 channels: the channel names are placed by
    the OME-XML's dimension order, and DAPI's first plane is read."""
    from nucleus_models.wsi.slide import choose_frame, frame_channels, open_slide

    names = ("CK", "CD3", "DAPI")
    planes = np.stack([_planes(names), _planes(names)], axis=axes.index("Z"))
    slide = open_slide(_ome(tmp_path / "z.ome.tif", names, planes, axes=axes))
    assert frame_channels(slide) == order
    assert choose_frame(slide).index == dapi and choose_frame(slide, "cd3").index == order.index(
        "CD3"
    )
    slide.frame = dapi
    assert slide.read_region(20, 20, 20, 20, out_w=20, out_h=20)[10, 10, 0] > 30  # (DAPI's disk)


def test_large_images_own_channel_names_are_used() -> None:
    """Sources that name channels (large_image's ``channels``, each frame's
    ``IndexC``) are read as they are."""
    from nucleus_models.wsi.slide import Slide, choose_frame

    meta = {"frames": [{"IndexC": c} for c in (0, 1, 0, 1)], "channels": ["CD8", "Hoechst 33342"]}
    slide = Slide("x.tif", 10, 10, 0.5, "metadata", None, meta)
    assert choose_frame(slide).index == 1 and choose_frame(slide).channel == "Hoechst 33342"
    assert choose_frame(slide, "cd8").index == 0
    # (a library caller's integer, 0 included, is an index; None: none given)
    assert choose_frame(slide, 0).index == 0 and choose_frame(slide, 0).how == "given"
    assert choose_frame(slide, 3).index == 3 and choose_frame(slide, None).index == 1


def test_the_white_level_and_overview_come_from_the_chosen_frame(tmp_path: Path) -> None:
    """A 16-bit first channel (up to 60000) and a 12-bit DAPI: DAPI's
    overview, read tile by tile (no pyramid level near its scale), is
    DAPI's own and scaled by DAPI's white level, not by frame 0's."""
    from nucleus_models.wsi.slide import open_slide

    names = ("CD3", "DAPI")
    planes = _planes(names)
    planes[0, 40:160, 40:160] = 60000
    slide = open_slide(_ome(tmp_path / "w.ome.tif", names, planes, tile=32))
    assert slide.overview_level(32) is not None  # (the tile-by-tile path)
    slide.frame = 1
    thumb, scale = slide.thumbnail(32)
    # (12 bits, and 2 more for a dark ground: frame 0's would be 65535)
    assert slide.white == 16383.0
    y, x = (int(v * scale) for v in CENTRES[0][::-1])
    assert thumb[y, x, 0] == round(3000 / 16383 * 255)
    assert thumb[int(100 * scale), int(100 * scale), 0] < 5  # (frame 0's square: 233)


def test_tiles_read_in_workers_use_the_frame(multiplex: Path) -> None:
    """What a worker (thread, process, dask) is given reads the run's frame."""
    from nucleus_models.wsi.runner import TileJob, read_tile
    from nucleus_models.wsi.tiling import Tile

    job = TileJob(str(multiplex), 0.5, "unet-bbbc038", (), white=4095.0, base_size=(SIZE, SIZE))
    tile = Tile(0, (0, 0, SIZE, SIZE), (0, 0, SIZE, SIZE))
    dapi = pickle.loads(pickle.dumps(job.__class__(**{**job.__dict__, "frame": 1})))
    assert read_tile(dapi, tile)[30, 30, 0] == 187  # (3000 of 4095)
    assert read_tile(job, tile)[30, 30, 0] == 6  # (frame 0: 100)
    r = _detect(multiplex, scheduler="multithreading", num_workers=2, analysis_tile_size=128)
    assert r.tiles["total"] > 1 and _found(r.nuclei.centroids) == len(CENTRES)


def test_the_cli_records_the_frame_in_every_output(multiplex: Path, tmp_path: Path) -> None:
    out = tmp_path / "n.anot"
    csv, geo, png = tmp_path / "n.csv", tmp_path / "n.geojson", tmp_path / "n.png"
    res = subprocess.run(
        [sys.executable, "-m", "cli", "NucleusDetection", str(multiplex), str(out)]
        + [
            "--model",
            "unet-bbbc038",
            "--input_mpp",
            "0.5",
            "--frame",
            "Dapi",
            "--precision",
            "float32",
        ]
        + [f"--nuclei_csv={csv}", f"--nuclei_geojson={geo}", f"--overlay_image={png}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "region of frame 1 (DAPI)" in res.stdout
    want = {"index": 1, "channel": "DAPI", "frames": 3, "chosen": "given"}
    attrs = json.loads(out.read_text())["attributes"]
    assert attrs["slide"]["frame"] == want and attrs["params"]["frame"] == "Dapi"
    assert json.loads(csv.read_text().splitlines()[0][2:])["slide"]["frame"] == want
    assert json.loads(geo.read_text())["properties"]["slide"]["frame"] == want
    import cv2

    overlay = cv2.imread(str(png))
    # (DAPI's disk inside its outline, its ground between: not frame 0's square)
    assert overlay[30, 30].tolist() == [47] * 3 and overlay[100, 100].max() < 5
    bad = subprocess.run(
        [sys.executable, "-m", "cli", "NucleusDetection", str(multiplex), str(tmp_path / "b.anot")]
        + ["--frame", "FITC", "--input_mpp", "0.5"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "0 CD3, 1 DAPI, 2 CK" in bad.stderr and not (tmp_path / "b.anot").exists()


def test_a_plain_slide_records_no_frame(tmp_path: Path) -> None:
    """Single-frame slides' slide record is as before (no frame entry)."""
    import tifffile

    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, _planes(("DAPI",))[0], tile=(128, 128))
    r = _detect(path)
    assert "frame" not in r.slide and _found(r.nuclei.centroids) == len(CENTRES)
    write_outputs(r)  # (nothing asked for: nothing written)


def test_channel_names_without_the_frames_channel_indices_are_not_guessed() -> None:
    """large_image's ``channels`` with frames that carry no ``IndexC`` name
    them in order only where there is a frame per channel: 4 frames of 2
    channels (a z-stack, in an order nothing says) are not taken as the
    channels and then unnamed planes, which read frame 1 as "DAPI" whatever
    it holds; no channel is named, and frame 0 is read with a warning."""
    from nucleus_models.wsi.slide import Slide, choose_frame, frame_channels

    meta = {"frames": [{}, {}, {}, {}], "channels": ["CD8", "DAPI"]}
    slide = Slide("x.tif", 10, 10, 0.5, "metadata", None, meta)
    assert frame_channels(slide) == [None] * 4
    choice = choose_frame(slide)
    assert (choice.index, choice.how) == (0, "first") and choice.warning
    meta = {"frames": [{}, {}], "channels": ["CD8", "DAPI"]}
    two = Slide("x.tif", 10, 10, 0.5, "metadata", None, meta)
    assert frame_channels(two) == ["CD8", "DAPI"] and choose_frame(two).index == 1


@pytest.mark.parametrize("frame", ["-1", -1, " ", None])
def test_minus_one_or_nothing_is_the_frame_picked(frame: object) -> None:
    """``-1`` (HistomicsTK's "no frame") is the default pick, as empty is,
    not a channel named "-1"."""
    from nucleus_models.wsi.slide import Slide, choose_frame

    meta = {"frames": [{"IndexC": c} for c in (0, 1)], "channels": ["CD8", "DAPI"]}
    slide = Slide("x.tif", 10, 10, 0.5, "metadata", None, meta)
    assert choose_frame(slide, frame) == choose_frame(slide, "")
    assert choose_frame(slide, frame).index == 1


def test_channel_names_come_from_the_slides_own_image_of_several(tmp_path: Path) -> None:
    """An OME-TIFF describing several images (an overview or label first,
    then the slide) named the frames from the first image's channels: the
    slide's DAPI (its third channel) was unnamed and its first frame taken
    for DAPI. The names are those of the image of the slide's size, as its
    resolution is."""
    import tifffile

    from nucleus_models.wsi.slide import Slide, choose_frame, frame_channels

    path = tmp_path / "two.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(
            np.zeros((2, 32, 32), np.uint16),
            metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "CD3"]}},
        )
        names = ["CD3", "CK", "DAPI"]
        tw.write(
            np.zeros((3, 64, 64), np.uint16), metadata={"axes": "CYX", "Channel": {"Name": names}}
        )
    # (frames as a source that reads the second image gives them)
    meta = {"sizeX": 64, "sizeY": 64, "frames": [{"IndexC": c} for c in range(3)]}
    slide = Slide(str(path), 64, 64, 0.5, "metadata", None, meta)
    assert frame_channels(slide) == names
    assert choose_frame(slide).index == 2


def test_a_single_channel_slide_named_as_the_channel_asked_for_is_read(tmp_path: Path) -> None:
    """``--frame DAPI`` (a folder job's, for all its slides) on a
    single-channel OME-TIFF whose one channel is DAPI was refused ("has no
    channel of that name; it has 1 frame"): a plain slide's channel name was
    never looked up. It is read, and another name is still refused."""
    from nucleus_models.wsi import open_slide
    from nucleus_models.wsi.slide import choose_frame

    path = _ome(tmp_path / "dapi.ome.tif", ("DAPI",), _planes(("DAPI",))[0], axes="YX")
    slide = open_slide(path, input_mpp=0.5)
    choice = choose_frame(slide, "dapi")
    assert (choice.index, choice.channel, choice.how, choice.read_frame) == (
        0,
        "DAPI",
        "given",
        None,
    )
    with pytest.raises(ParameterError, match="no channel of that name"):
        choose_frame(slide, "CD3")
    assert choose_frame(slide).how == "only"
