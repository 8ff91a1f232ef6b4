"""Slides large_image reads slowly or not as 8-bit RGB: no pyramid, 12-bit
samples, an alpha channel."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from nucleus_models.wsi import open_slide
from nucleus_models.wsi.slide import level_multiple


def _he(shared_data: Path, side: int) -> np.ndarray:
    """A ``side`` x ``side`` H&E image tiled from a MoNuSeg crop."""
    path = sorted((shared_data / "monuseg2018/train/images").glob("*.tif"))[0]
    crop = np.asarray(Image.open(path).convert("RGB"))[:512, :512]
    reps = -(-side // 512)
    return np.ascontiguousarray(np.tile(crop, (reps, reps, 1))[:side, :side])


def _single_level(path: Path, img: np.ndarray) -> Path:
    """A tiled TIFF of one level (no pyramid), as a scanner's export or a
    stitched mosaic may be."""
    import tifffile

    photometric = "rgb" if img.ndim == 3 else None
    tifffile.imwrite(path, img, tile=(128, 128), photometric=photometric, planarconfig="contig")
    return path


def test_an_overview_without_a_pyramid_level_is_read_tile_by_tile(
    shared_data: Path, tmp_path: Path
) -> None:
    """A slide with no stored level near the overview's scale is read a row
    of tiles at a time and shrunk with INTER_AREA, telling its progress (large_image
    made the missing levels with PIL: a 30000 px slide's 2048 px overview
    took 64 s, silent; ~24 s this way), and gives the same overview."""
    import cv2
    from conftest import write_pyramidal_tiff

    img = _he(shared_data, 1024)
    flat = open_slide(_single_level(tmp_path / "flat.tif", img), input_mpp=0.25)
    assert flat.overview_level(256) == flat.source.levels - 1  # the base
    seen: list[float] = []
    thumb, scale = flat.thumbnail(256, progress=seen.append)
    assert thumb.shape == (256, 256, 3) and scale == 0.25
    assert len(seen) >= 8 and seen == sorted(seen) and seen[-1] == 1.0
    ref = cv2.resize(img, (256, 256), interpolation=cv2.INTER_AREA)
    assert int(np.abs(thumb.astype(int) - ref).max()) <= 1
    # a pyramid, or a shrink large_image makes from the next level: its own read
    pyramid = open_slide(write_pyramidal_tiff(tmp_path / "p.tif", img, mpp=0.25))
    assert pyramid.overview_level(256) is None and flat.overview_level(600) is None


def test_detection_says_when_it_reads_the_overview_tile_by_tile(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job log and HistomicsUI's progress message say what the run does
    while it reads a slide without a pyramid, and the progress bar moves."""
    from nucleus_models import detection
    from nucleus_models.detection import DetectionParams, detect_nuclei
    from nucleus_models.progress import FilterProgress

    monkeypatch.setattr(detection, "OVERVIEW_PX", 256)  # (a 1024 px slide, not 30000)
    path = _single_level(tmp_path / "flat.tif", _he(shared_data, 1024))
    notes: list[str] = []
    bar: list[float] = []
    params = DetectionParams(
        inputImageFile=str(path), model="classical-he", input_mpp=0.5, analysis_roi=[0, 0, 512, 512]
    )
    result = detect_nuclei(params, progress=bar.append, note=notes.append)
    assert len(result.nuclei) > 50
    assert len(notes) == 2, notes
    assert notes[0].startswith("reading the tissue overview from 1024 x 1024 px of the slide")
    assert notes[1].startswith("overview read in ") and "tiles that hold tissue" in notes[1]
    overview = [f for f in bar if f <= detection.OVERVIEW_SHARE]
    assert len(overview) >= 8 and bar == sorted(bar) and bar[-1] == 1.0
    # in the CLI: a line in the job's log, and the progress message
    out = io.StringIO()
    FilterProgress("NucleusDetection", stream=out).note("reading <it> & more")
    assert out.getvalue().splitlines() == [
        "reading <it> & more",
        "<filter-comment>reading &lt;it&gt; &amp; more</filter-comment>",
    ]


def test_a_12_bit_slide_is_scaled_by_its_bit_depth(shared_data: Path, tmp_path: Path) -> None:
    """RGB samples of 0-4095 in a 16-bit TIFF read as the 8-bit image they
    came from (divided by 257, the model saw them at most 16 of 255: no
    tissue, no nuclei), in the overview, the tiles and the detection."""
    from nucleus_models.detection import DetectionParams, detect_nuclei
    from nucleus_models.wsi.runner import TileJob, read_tile
    from nucleus_models.wsi.tiling import Tile

    img = _he(shared_data, 512)
    deep = (img.astype(np.uint32) * 4095 // 255).astype(np.uint16)
    p8, p12 = _single_level(tmp_path / "u8.tif", img), _single_level(tmp_path / "u12.tif", deep)
    s8, s12 = open_slide(p8, input_mpp=0.25), open_slide(p12, input_mpp=0.25)
    region = s12.read_region(100, 50, 300, 200)  # before the overview: it reads it
    assert int(np.abs(region.astype(int) - s8.read_region(100, 50, 300, 200)).max()) <= 1
    assert s12.white == 4095
    t8, t12 = s8.thumbnail(128)[0], s12.thumbnail(128)[0]
    assert int(np.abs(t12.astype(int) - t8).max()) <= 1
    # a tile worker opens the slide itself: the run's white level comes with the job
    job = TileJob(str(p12), 0.25, "classical-he", (), base_size=(512, 512), white=4095.0)
    tile = read_tile(job, Tile(0, (0, 0, 256, 256), (0, 0, 256, 256)))
    assert int(np.abs(tile.astype(int) - img[:256, :256]).max()) <= 1
    counts = [
        len(
            detect_nuclei(
                DetectionParams(inputImageFile=str(p), model="classical-he", input_mpp=0.5)
            ).nuclei
        )
        for p in (p8, p12)
    ]
    assert counts[0] > 50 and abs(counts[1] - counts[0]) <= 0.02 * counts[0], counts


def test_transparent_pixels_are_not_analysed(shared_data: Path, tmp_path: Path) -> None:
    """An RGBA image's transparent pixels (alpha 0, the colour under them
    kept) read black, as large_image's level reads already made them, so
    no nucleus is found there; opaque pixels read as they are."""
    from nucleus_models.detection import DetectionParams, detect_nuclei

    img = _he(shared_data, 512)
    rgba = np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])
    rgba[:, 256:, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    slide = open_slide(tmp_path / "rgba.png", input_mpp=0.25)
    region = slide.read_region(0, 0, 512, 512)
    assert np.array_equal(region[:, :256], img[:, :256]) and not region[:, 256:].any()
    nuclei = detect_nuclei(
        DetectionParams(
            inputImageFile=str(tmp_path / "rgba.png"), model="classical-he", input_mpp=0.5
        )
    ).nuclei
    assert len(nuclei) > 20 and nuclei.centroids[:, 0].max() < 256 + 8


def test_an_overview_level_one_pixel_short_of_half_sizes_is_read(tmp_path: Path) -> None:
    """A stored level whose size was rounded down (a 1025 px base's quarter
    stored as 256 px, not 257) has one tile fewer a row than the rounded-up
    size gives: the overview was 'cannot read tile 16,0 ... (file truncated
    or corrupt?)' for a sound slide; it is the level, shrunk."""
    import cv2
    import tifffile

    yy, xx = np.mgrid[0:1025, 0:1025]
    base = np.dstack([xx % 256, yy % 256, (xx // 8 + yy // 8) % 256]).astype(np.uint8)
    quarter = cv2.resize(base, (256, 256), interpolation=cv2.INTER_AREA)
    path = tmp_path / "floor.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(base, tile=(16, 16), photometric="rgb", subifds=1)
        tw.write(quarter, tile=(16, 16), photometric="rgb", subfiletype=1)
    slide = open_slide(path, input_mpp=0.25)
    level = slide.overview_level(64)
    assert level is not None and level < slide.source.levels - 1  # the quarter, not the base
    thumb, _ = slide.thumbnail(64)
    ref = cv2.resize(quarter, (64, 64), interpolation=cv2.INTER_AREA)
    assert thumb.shape == (64, 64, 3) and int(np.abs(thumb.astype(int) - ref).max()) <= 1


def test_an_overview_of_samples_opencv_cannot_resize_is_read(
    shared_data: Path, tmp_path: Path
) -> None:
    """Read tile by tile, the overview of 32-bit integer samples (12-bit
    data in them) ended in an OpenCV assertion traceback (its resize takes
    no 32-bit integers); it is the image the slide holds, 12-bit scaled."""
    import cv2

    img = _he(shared_data, 1024)
    data = img.astype(np.int32) * 4095 // 255
    slide = open_slide(_single_level(tmp_path / "int32.tif", data), input_mpp=0.25)
    assert slide.overview_level(64) is not None
    thumb, _ = slide.thumbnail(64)
    assert slide.white == 4095
    ref = cv2.resize(img, (64, 64), interpolation=cv2.INTER_AREA)
    assert thumb.shape == (64, 64, 3) and int(np.abs(thumb.astype(int) - ref).max()) <= 1


def test_an_overview_of_a_slide_not_a_whole_number_of_tiles_is_the_whole_slide(
    shared_data: Path, tmp_path: Path
) -> None:
    """Read tile by tile, the overview of a slide whose width and height are
    not whole numbers of tiles (as most are) holds its last column and row
    of tiles, cut to the slide, neither stretched nor padded."""
    import cv2

    img = _he(shared_data, 1000)[:700]  # 1000 x 700 px: tiles of 128, the last ones partial
    flat = open_slide(_single_level(tmp_path / "flat.tif", img), input_mpp=0.25)
    assert flat.overview_level(250) == flat.source.levels - 1
    thumb, scale = flat.thumbnail(250)
    assert thumb.shape == (175, 250, 3) and scale == 0.25
    ref = cv2.resize(img, (250, 175), interpolation=cv2.INTER_AREA)
    assert int(np.abs(thumb.astype(int) - ref).max()) <= 1


def test_a_pyramid_with_a_level_every_4x_is_read_by_large_image(tmp_path: Path) -> None:
    """A slide storing every other level (an SVS: 1, 1/4, 1/16) has a
    stored level at, or one finer than, each overview's scale: large_image
    reads it quickly, so the overview is not read tile by tile (nor the
    4x finer level read where the level asked for is stored)."""
    import cv2
    import tifffile

    img = np.random.default_rng(0).integers(0, 255, (1024, 1024, 3), np.uint8)
    with tifffile.TiffWriter(tmp_path / "sparse.tif") as tw:
        tw.write(img, tile=(128, 128), photometric="rgb", subfiletype=0)
        quarter = cv2.resize(img, (256, 256), interpolation=cv2.INTER_AREA)
        tw.write(quarter, tile=(128, 128), photometric="rgb", subfiletype=1)
    s = open_slide(tmp_path / "sparse.tif", input_mpp=0.25)
    stored = [v is not None for v in s.source._nonemptyLevelsList()]
    assert stored == [False, True, False, True], stored  # (1/8, 1/4, 1/2, 1)
    assert [s.overview_level(n) for n in (512, 256, 128)] == [None, None, None]


def test_grey_alpha_and_many_bands_read_as_rgb() -> None:
    """Grey + alpha is composited over black like RGBA and comes out RGB;
    more than four bands keep the first three; 16-bit alpha is on its own
    scale (65535 opaque)."""
    from nucleus_models.wsi.slide import to_rgb_uint8

    la = np.array([[[200, 255], [200, 0], [200, 128]]], np.uint8)
    out = to_rgb_uint8(la)
    assert out.shape == (1, 3, 3)
    assert out[0, :, 0].tolist() == [200, 0, round(200 * 128 / 255)]
    assert (out == out[:, :, :1]).all()  # grey in every band
    bands = np.arange(5, dtype=np.uint8)[None, None, :] * 40 + np.zeros((2, 2, 1), np.uint8)
    assert np.array_equal(to_rgb_uint8(bands), bands[:, :, :3])
    rgba16 = np.array([[[65535, 32896, 0, 65535], [65535, 32896, 0, 32768]]], np.uint16)
    out16 = to_rgb_uint8(rgba16)
    assert out16[0, 0].tolist() == [255, 128, 0]
    assert abs(int(out16[0, 1, 0]) - 128) <= 1 and abs(int(out16[0, 1, 1]) - 64) <= 1


def test_detection_reads_a_deep_slides_overview_once(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The white level the detection's overview set goes with the tile
    jobs: a tile reader without it read a second overview of its own (for
    a slide without a pyramid, as long as the first), each worker process
    again."""
    from nucleus_models.detection import DetectionParams, detect_nuclei
    from nucleus_models.wsi.slide import Slide

    img = _he(shared_data, 512)
    deep = (img.astype(np.uint32) * 4095 // 255).astype(np.uint16)
    path = _single_level(tmp_path / "u12.tif", deep)
    calls: list[int] = []
    thumbnail = Slide.thumbnail

    def counted(self: Slide, *args: object, **kwargs: object) -> object:
        calls.append(1)
        return thumbnail(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Slide, "thumbnail", counted)
    params = DetectionParams(inputImageFile=str(path), model="classical-he", input_mpp=0.5)
    assert len(detect_nuclei(params).nuclei) > 50
    assert len(calls) == 1


def _pyramid(path: Path, base: np.ndarray, levels: int) -> Path:
    """A tiled TIFF of ``base`` and ``levels`` stored halvings of it
    (INTER_AREA, in its own sample type), as pyramid writers make them."""
    import cv2
    import tifffile

    with tifffile.TiffWriter(path) as tw:
        tw.write(base, tile=(128, 128), photometric="rgb", subifds=levels)
        level = base.astype(np.float64)
        for _ in range(levels):
            size = (level.shape[1] // 2, level.shape[0] // 2)
            level = cv2.resize(level, size, interpolation=cv2.INTER_AREA)
            stored = np.rint(level) if np.issubdtype(base.dtype, np.integer) else level
            tw.write(stored.astype(base.dtype), tile=(128, 128), photometric="rgb", subfiletype=1)
    return path


@pytest.mark.parametrize(
    ("kind", "scale", "dtype"),
    [
        ("float-0-1", 1 / 255, np.float32),
        ("float-0-255", 1.0, np.float32),
        ("int32-12bit", 4095 / 255, np.int32),
        ("uint16-12bit", 4095 / 255, np.uint16),
    ],
)
def test_every_level_of_a_pyramid_not_of_uint8_reads_like_the_base(
    tmp_path: Path, kind: str, scale: float, dtype: type
) -> None:
    """A pyramid of samples other than uint8 read at a downsample (large_image
    reads a level and shrinks it through PIL, cutting the samples to uint8
    its own way first) read black for floats in [0, 1] (mean 0 for 127 at
    the base), mid-grey for int32, 16 greys for 12-bit uint16; every level
    and shrink now reads as the 8-bit image it holds, shrunk alike."""
    import cv2

    yy, xx = np.mgrid[0:1024, 0:1024]
    img = np.dstack([xx // 4, yy // 4, (xx + yy) // 8]).astype(np.uint8)
    base = img.astype(np.float64) * scale
    base = (np.rint(base) if np.issubdtype(dtype, np.integer) else base).astype(dtype)
    slide = open_slide(_pyramid(tmp_path / f"{kind}.tif", base, 3), input_mpp=0.25)
    reads = [
        (0, 0, 1024, 1024, 1024, 1024),  # the base
        (0, 0, 1024, 1024, 300, 300),  # a level, shrunk
        (96, 192, 600, 450, 200, 150),
        (0, 0, 1024, 1024, 64, 64),  # the coarsest level, shrunk
    ]
    for x, y, w, h, ow, oh in reads:
        got = slide.read_region(x, y, w, h, out_w=ow, out_h=oh).astype(int)
        ref = cv2.resize(img[y : y + h, x : x + w], (ow, oh), interpolation=cv2.INTER_AREA)
        diff = np.abs(got - ref)
        assert got.shape == (oh, ow, 3)
        assert diff.mean() < 2 and np.percentile(diff, 99) <= 6, (kind, ow, diff.mean())
    thumb, _ = slide.thumbnail(128)
    ref = cv2.resize(img, (128, 128), interpolation=cv2.INTER_AREA)
    assert np.abs(thumb.astype(int) - ref).mean() < 1.0


def test_a_dark_tile_of_a_float_slide_is_scaled_like_the_rest(tmp_path: Path) -> None:
    """Float samples were scaled tile by tile: x 255 where a tile's samples
    were all at most 1, as they are in a near-black tile of a [0, 255]
    slide (read 204 of 255 for 0.8); the overview sets one scale for the
    slide, [0, 1] or [0, 255], as it does for 12-bit data."""
    img = np.full((512, 512, 3), 200.0, np.float32)
    img[:256, :256] = 0.8
    _single_level(tmp_path / "f255.tif", img)
    _single_level(tmp_path / "f01.tif", img / 255)
    f255 = open_slide(tmp_path / "f255.tif", input_mpp=0.25)
    assert f255.read_region(0, 0, 128, 128).max() == 1  # before the overview: it reads it
    assert f255.white == 255.0 and f255.read_region(300, 300, 128, 128).min() == 200
    f01 = open_slide(tmp_path / "f01.tif", input_mpp=0.25)
    assert f01.read_region(0, 0, 128, 128).max() == 1 and f01.white == 1.0
    assert f01.read_region(300, 300, 128, 128).min() == 200


def test_white_level_leaves_transparent_pixels_out_of_the_ground() -> None:
    """A 12-bit brightfield scan (RGBA, 16-bit) whose unscanned margin is
    transparent (alpha 0, colour 0): the margin, most of the overview, was
    taken for fluorescence's dark ground, two bits added, and the tissue
    read 4x too dark (4000 of 16383: 62 of 255)."""
    from nucleus_models.wsi.slide import to_rgb_uint8, white_level

    over = np.zeros((10, 10, 4), np.uint16)
    over[:3, :, :3], over[:3, :, 3] = 4000, 65535  # scanned, opaque: near white
    assert white_level(over) == 4095.0
    assert to_rgb_uint8(over, white=white_level(over))[0, 0].tolist() == [249, 249, 249]
    grey = over[..., [0, 3]]  # grey + alpha: the same
    assert white_level(grey) == 4095.0
    dark = np.full((10, 10, 4), 50, np.uint16)  # an opaque dark ground is still one
    dark[..., 3], dark[0, 0, :3] = 65535, 1000
    assert white_level(dark) == 4095.0 == white_level(dark[..., :3])


def test_white_level_of_signed_samples_is_at_most_their_own_maximum() -> None:
    """int16 samples hold at most 32767: a bright int16 slide was read as
    16-bit (/ 257), at most 127 of 255, half as bright as it is."""
    from nucleus_models.wsi.slide import white_level

    assert white_level(np.full((2, 2, 3), 30000, np.int16)) == 32767.0
    assert white_level(np.full((2, 2, 3), 30000, np.uint16)) == 65535.0
    assert white_level(np.full((2, 2, 3), 3000, np.int16)) == 4095.0
    assert white_level(np.full((2, 2, 3), 2**30, np.int32)) == 2.0**31 - 1


def _pyramid_of(path: Path, base: np.ndarray, factors: list[int]) -> Path:
    """A tiled TIFF of ``base`` and its levels shrunk by ``factors`` only
    (INTER_AREA; levels between them missing, as in many scanners' files)."""
    import cv2
    import tifffile

    with tifffile.TiffWriter(path) as tw:
        tw.write(base, tile=(128, 128), photometric="rgb", subifds=len(factors))
        for f in factors:
            size = (base.shape[1] // f, base.shape[0] // f)
            level = cv2.resize(base.astype(np.float64), size, interpolation=cv2.INTER_AREA)
            tw.write(np.rint(level).astype(base.dtype), tile=(128, 128), photometric="rgb")
    return path


@pytest.mark.parametrize(
    ("factors", "read"),
    [
        ([4], (0, 0, 512, 512, 256, 256)),  # 2x level missing: the base is read
        ([2], (0, 0, 512, 512, 64, 64)),  # shrunk past the coarsest level stored
        ([2, 4], (0, 0, 510, 510, 127, 127)),  # a window of no whole 4x level pixels
    ],
)
def test_a_uint16_pyramid_read_at_a_level_it_lacks_is_shrunk_by_area(
    tmp_path: Path, factors: list[int], read: tuple[int, int, int, int, int, int]
) -> None:
    """A pyramid of samples other than uint8 read at a downsample asked
    large_image for the region at 1 / 2**k of its size; where that level was
    not stored (or the window not a whole number of its pixels) large_image
    read a finer level and fitted it to that size by nearest neighbour
    (every other base pixel of a 0.25 um/px uint16 slide without a 2x level
    read at 0.5 um/px: mean error 15 of 255 on a fine texture, vs 4 for the
    same slide in uint8). It is now asked for the level it reads, at its
    own scale, and shrunk by area from there."""
    import cv2

    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.integers(0, 256, (512, 512, 3)).astype(np.uint8), (0, 0), 0.7)
    deep = img.astype(np.uint16) * 16  # (12-bit)
    slide = open_slide(_pyramid_of(tmp_path / "u16.tif", deep, factors), input_mpp=0.25)
    x, y, w, h, ow, oh = read
    got = slide.read_region(x, y, w, h, out_w=ow, out_h=oh).astype(int)
    f = level_multiple(w, h, ow, oh)  # (a level read reads whole level pixels)
    ref = cv2.resize(
        img[y : y + h - h % f, x : x + w - w % f], (ow, oh), interpolation=cv2.INTER_AREA
    )
    assert got.shape == (oh, ow, 3)
    assert np.abs(got - ref).mean() < 1.5


def _sparse_nuclei(
    value: int, side: int = 1024, n: int = 12, r: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """A 16-bit RGB fluorescence composite: black everywhere but ``n``
    small nuclei (discs of radius ``r``) of ``value`` in every band; and
    their centres (x, y)."""
    img = np.zeros((side, side, 3), np.uint16)
    centres = np.random.default_rng(1).integers(16, side - 16, (n, 2))
    yy, xx = np.mgrid[0:side, 0:side]
    for cx, cy in centres:
        img[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = value
    return img, centres


@pytest.mark.parametrize(("value", "white"), [(40000, 65535.0), (4000, 4095.0)])
@pytest.mark.parametrize("layout", ["single-level", "pyramid"])
def test_sparse_bright_nuclei_on_a_black_ground_are_not_clipped(
    tmp_path: Path, value: int, white: float, layout: str
) -> None:
    """Small nuclei on an RGB composite's black ground average down in the
    overview (a 7 px nucleus in a 16 px overview pixel: a fifth of its
    value), and the black, an RGB overview's unscanned fill, is no dark
    ground: the white level was set from the averaged peak (16383 for
    nuclei of 40000, 1023 for 12-bit ones of 4000) and every nucleus read
    255, clipped. The base pixels under the overview's brightest say how
    bright they are."""
    img, centres = _sparse_nuclei(value)
    path = tmp_path / f"{layout}.tif"
    slide = open_slide(
        _single_level(path, img) if layout == "single-level" else _pyramid(path, img, 4),
        input_mpp=0.25,
    )
    thumb, _ = slide.thumbnail(64)
    assert slide.white == white
    expected = round(value * 255 / white)
    for cx, cy in centres:
        assert slide.read_region(int(cx) - 1, int(cy) - 1, 3, 3).max() == expected
    assert 0 < thumb.max() < expected  # (the overview: averaged, not clipped)


def test_a_12_bit_alpha_is_opaque_at_4095(tmp_path: Path) -> None:
    """A 12-bit RGBA scan in a 16-bit TIFF stores alpha 0-4095 as it does
    its colour: alpha was taken over 16 bits (65535 opaque) and every
    pixel read 16x too dark (3000 of 4095: 12, not 187). Opaque is the bit
    depth of the slide's own largest alpha, in the overview, the tiles
    (base and level reads) and a tile worker's reads (a tile whose alpha
    is all 1000 is a quarter opaque, not nearly opaque at 10 bits); 0
    black. On a dark fluorescence ground (a white level 2 bits above
    12) the alpha is still 12-bit."""
    import tifffile

    from nucleus_models.wsi.runner import TileJob, read_tile
    from nucleus_models.wsi.tiling import Tile

    img = np.zeros((512, 512, 4), np.uint16)
    img[..., :3], img[..., 3] = 3000, 4095
    img[:, 256:, 3], img[:128, :128, 3] = 0, 1000
    opaque, part = round(3000 * 255 / 4095), round(3000 * 1000 / 4095 * 255 / 4095)
    path = tmp_path / "rgba12.tif"
    kw = {"tile": (128, 128), "photometric": "rgb", "extrasamples": [2]}  # (unassociated alpha)
    tifffile.imwrite(path, img, **kw)
    slide = open_slide(path, input_mpp=0.25)
    base = slide.read_region(0, 0, 512, 512)[..., 0]
    assert (base[200, 200], base[64, 64], base[200, 400]) == (opaque, part, 0)
    assert slide.white == 4095 and slide.alpha_white == 4095
    level = slide.read_region(0, 0, 512, 512, out_w=128, out_h=128)[..., 0]
    assert (level[50, 50], level[16, 16], level[50, 100]) == (opaque, part, 0)
    thumb = slide.thumbnail(64)[0][..., 0]
    assert (thumb[30, 30], thumb[8, 8], thumb[30, 50]) == (opaque, part, 0)
    job = TileJob(
        str(path), 0.25, "classical-he", (), base_size=(512, 512), white=4095.0, alpha_white=4095.0
    )
    corner = read_tile(job, Tile(0, (0, 0, 128, 128), (0, 0, 128, 128)))
    assert int(corner.min()) == int(corner.max()) == part
    dark = img.copy()
    dark[..., :3], dark[200:204, 200:204, :3] = 20, 3000  # (fluorescence: a dark ground)
    tifffile.imwrite(tmp_path / "dark.tif", dark, **kw)
    fl = open_slide(tmp_path / "dark.tif", input_mpp=0.25)
    assert fl.read_region(200, 200, 4, 4).min() == round(3000 * 255 / fl.white)
    assert fl.white == 16383 and fl.alpha_white == 4095


def test_the_brightest_of_nuclei_of_unlike_brightness_sets_the_white_level(
    tmp_path: Path,
) -> None:
    """Eleven 12-bit nuclei (4000) and one of 40000 on a black ground: the
    white level is the bit depth of the brightest base sample under any of
    the overview's brightest pixels, not of whichever was read last (16383:
    the bright nucleus read 255, clipped)."""
    img, centres = _sparse_nuclei(4000)
    cx, cy = centres[-1]
    yy, xx = np.mgrid[0 : img.shape[0], 0 : img.shape[1]]
    img[(xx - cx) ** 2 + (yy - cy) ** 2 <= 9] = 40000
    slide = open_slide(_single_level(tmp_path / "mixed.tif", img), input_mpp=0.25)
    slide.thumbnail(64)
    assert slide.white == 65535
    read = [int(slide.read_region(int(x) - 1, int(y) - 1, 3, 3).max()) for x, y in centres]
    assert read == [round(4000 * 255 / 65535)] * 11 + [round(40000 * 255 / 65535)]


def test_a_transparent_margins_stored_colour_does_not_set_the_white_level(
    tmp_path: Path,
) -> None:
    """A 12-bit RGBA scan whose unscanned tiles are transparent with their
    colour stored at the container's 65535, sparse nuclei of 4000 on its
    black ground, one beside the margin: the base pixels that set the white
    level are the opaque ones under the overview's brightest opaque pixels
    (the margin's colour taken: 65535, every nucleus 16 not 249; the
    margin's pixels picked instead of the nuclei: 1023, all clipped)."""
    import tifffile

    img, centres = _sparse_nuclei(4000)
    rgba = np.zeros((*img.shape[:2], 4), np.uint16)
    rgba[..., :3], rgba[..., 3] = img, 4095
    yy, xx = np.mgrid[0 : img.shape[0], 0 : img.shape[1]]
    rgba[(xx - 764) ** 2 + (yy - 500) ** 2 <= 9, :3] = 4000  # (beside the margin)
    rgba[:, 768:, :3], rgba[:, 768:, 3] = 65535, 0  # (6 tiles of 128 scanned)
    kw = {"tile": (128, 128), "photometric": "rgb", "extrasamples": [2]}
    tifffile.imwrite(tmp_path / "margin.tif", rgba, **kw)
    slide = open_slide(tmp_path / "margin.tif", input_mpp=0.25)
    slide.thumbnail(64)
    assert slide.white == 4095
    nuclei = [(int(x), int(y)) for x, y in centres if x < 760] + [(764, 500)]
    assert len(nuclei) > 5
    for x, y in nuclei:
        assert slide.read_region(x - 1, y - 1, 3, 3).max() == round(4000 * 255 / 4095)


def test_a_runs_tiles_are_read_with_the_slides_alpha_level(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 12-bit RGBA scan (alpha 4095 opaque) with a corner of alpha 1000:
    the run hands the tiles its slide's alpha level as it does its white
    level, so the corner tile reads a quarter opaque like the overview, not
    nearly opaque (its own largest alpha, 1000, at 10 bits)."""
    import tifffile

    import nucleus_models.wsi as wsi
    from nucleus_models.detection import DetectionParams, detect_nuclei
    from nucleus_models.wsi.runner import read_tile
    from nucleus_models.wsi.tiling import Tile

    rgba = np.zeros((512, 512, 4), np.uint16)
    rgba[..., :3] = _he(shared_data, 512).astype(np.uint32) * 4095 // 255
    rgba[..., 3], rgba[:128, :128, 3] = 4095, 1000
    path = tmp_path / "rgba12.tif"
    tifffile.imwrite(path, rgba, tile=(128, 128), photometric="rgb", extrasamples=[2])
    jobs = []

    class Captured(Exception):
        pass

    def run_tiles(job: Any, *a: Any, **k: Any) -> Any:
        jobs.append(job)
        raise Captured  # (the job is all this test needs)

    monkeypatch.setattr(wsi, "run_tiles", run_tiles)
    with pytest.raises(Captured):
        detect_nuclei(DetectionParams(str(path), model="classical-he", input_mpp=0.5))
    (job,) = jobs
    ref = open_slide(path, input_mpp=0.5)
    ref.thumbnail(64)
    assert ref.alpha_white == 4095
    corner = read_tile(job, Tile(0, (0, 0, 100, 100), (0, 0, 100, 100)))
    assert np.array_equal(corner, ref.read_region(0, 0, 100, 100))


@pytest.mark.parametrize("bands", ["rgba", "grey+alpha"])
def test_a_12_bit_scans_8_bit_alpha_is_opaque_at_255(tmp_path: Path, bands: str) -> None:
    """A 12-bit scan in a 16-bit TIFF whose alpha is written 0-255: its
    alpha's own bit depth is opaque (255), whatever its colour's (4095: each
    pixel 16x too dark), in the overview and in a run's tiles (the
    slide's alpha level, handed to them: a tile whose alpha is all 128 is
    half opaque, not opaque at 8 bits)."""
    import tifffile

    from nucleus_models.wsi.runner import TileJob, read_tile
    from nucleus_models.wsi.tiling import Tile

    n = 4 if bands == "rgba" else 2
    img = np.zeros((512, 512, n), np.uint16)
    img[..., : n - 1], img[..., -1] = 3000, 255
    img[:128, :128, -1] = 128
    path = tmp_path / f"{bands}.tif"
    photometric = "rgb" if bands == "rgba" else "minisblack"
    tifffile.imwrite(path, img, tile=(128, 128), photometric=photometric, extrasamples=[2])
    slide = open_slide(path, input_mpp=0.25)
    thumb = slide.thumbnail(64)[0][..., 0]
    assert slide.white == 4095 and slide.alpha_white == 255
    opaque, half = round(3000 * 255 / 4095), round(3000 * 128 / 255 * 255 / 4095)
    assert (thumb[40, 40], thumb[8, 8]) == (opaque, half)
    assert slide.read_region(200, 200, 8, 8).min() == opaque
    job = TileJob(
        str(path), 0.25, "classical-he", (), base_size=(512, 512), white=4095.0, alpha_white=255.0
    )
    corner = read_tile(job, Tile(0, (0, 0, 64, 64), (0, 0, 64, 64)))
    assert int(corner.min()) == int(corner.max()) == half
