"""Opening slides of every supported kind, resolution handling, tissue masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nucleus_models.errors import SlideError
from nucleus_models.wsi import open_slide, tissue_mask


def test_svs_and_ndpi_resolution_from_metadata(shared_data: Path) -> None:
    svs = open_slide(shared_data / "wsi" / "CMU-1-Small-Region.svs")
    assert (svs.width, svs.height) == (2220, 2967)
    assert svs.mpp == pytest.approx(0.499, abs=1e-3) and svs.mpp_source == "metadata"
    ndpi = open_slide(next((shared_data / "wsi").glob("*.ndpi")))
    assert ndpi.mpp is not None and 0.1 < ndpi.mpp < 1.0
    region = ndpi.read_region(1000, 1000, 256, 256, out_w=128, out_h=128)
    assert region.shape == (128, 128, 3) and region.dtype == np.uint8


def test_a_tile_read_at_the_models_resolution_is_the_harness_image(shared_data: Path) -> None:
    """Reading a 40x region for a 0.4 um/px model (a shrink under 2x) gives
    the pixels the training and evaluation images have (OpenCV's INTER_AREA
    of the base layer), not large_image's Lanczos; larger shrinks (the
    thumbnail) still come from a coarser layer at the size asked for."""
    import cv2
    import tifffile

    path = sorted((shared_data / "monuseg2018/train/images").glob("*.tif"))[0]
    s = open_slide(path, input_mpp=0.25)
    image = tifffile.imread(path)[..., :3]
    whole = s.read_region(0, 0, s.width, s.height, out_w=625, out_h=625)
    assert np.array_equal(whole, cv2.resize(image, (625, 625), interpolation=cv2.INTER_AREA))
    part = s.read_region(160, 320, 480, 320, out_w=300, out_h=200)
    ref = cv2.resize(image[320:640, 160:640], (300, 200), interpolation=cv2.INTER_AREA)
    assert np.array_equal(part, ref)
    thumb, scale = s.thumbnail(400)
    assert thumb.shape == (400, 400, 3) and scale == pytest.approx(0.4)
    small = cv2.resize(image, (400, 400), interpolation=cv2.INTER_AREA).astype(int)
    assert np.abs(thumb.astype(int) - small).mean() < 3


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF"])
def test_plain_images_need_input_mpp(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"img.{fmt.lower()}"
    arr = np.zeros((120, 160, 3), np.uint8)
    arr[20:60, 30:90] = (200, 40, 90)
    Image.fromarray(arr).save(path, format=fmt)
    s = open_slide(path)
    assert (s.width, s.height) == (160, 120)
    with pytest.raises(SlideError, match="--input_mpp"):
        s.require_mpp()
    s = open_slide(path, input_mpp=0.25)
    assert s.require_mpp() == 0.25 and s.mpp_source == "override"
    px = s.read_region(30, 20, 60, 40)
    assert px.shape == (40, 60, 3)
    if fmt != "JPEG":
        assert (px == (200, 40, 90)).all()


def test_override_beats_metadata(shared_data: Path) -> None:
    s = open_slide(shared_data / "wsi" / "CMU-1-Small-Region.svs", input_mpp=0.3)
    assert s.mpp == 0.3 and s.mpp_source == "override"


def test_thumbnail_and_tissue_mask(shared_data: Path) -> None:
    s = open_slide(shared_data / "wsi" / "CMU-1-Small-Region.svs")
    thumb, scale = s.thumbnail(512)
    assert max(thumb.shape[:2]) == 512 and scale == pytest.approx(512 / 2967, rel=1e-3)
    mask = tissue_mask(thumb)
    assert 0.3 < mask.mean() < 0.99  # tissue and some glass
    fluo = np.zeros((100, 100, 3), np.uint8)
    fluo[40:60, 40:60] = 180
    fm = tissue_mask(fluo, modality="fluorescence")
    assert fm[50, 50] and not fm[5, 5]
    assert not tissue_mask(np.full((50, 50, 3), 250, np.uint8)).any()


def test_optical_density_table_is_the_formula() -> None:
    """The uint8 lookup gives the float32 formula's values, bit for bit."""
    from nucleus_models.wsi.tissue import optical_density

    every = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    img = np.random.default_rng(0).integers(0, 256, (64, 48, 4), dtype=np.uint8)
    for rgb in (every, img[..., :3]):
        formula = -np.log10(np.clip(rgb.astype(np.float32), 1.0, 255.0) / 255.0)
        od = optical_density(rgb)
        assert od.dtype == np.float32 and np.array_equal(od, formula)
        assert np.array_equal(optical_density(rgb.astype(np.float32)), formula)


def test_in_memory_16bit_images_are_stretched_not_divided() -> None:
    """12-bit fluorescence in a 16-bit container keeps its contrast in segment_image/training."""
    from nucleus_models.wsi import to_rgb_uint8

    img = np.zeros((20, 20), np.uint16)
    img[5:10, 5:10] = 4000  # 12-bit data: /257 would give 15
    fixed = to_rgb_uint8(img)
    stretched = to_rgb_uint8(img, stretch=True)
    assert fixed.shape == stretched.shape == (20, 20, 3)
    assert int(fixed.max()) == round(4000 / 257)
    assert int(stretched.max()) == 255 and int(stretched.min()) == 0
    u8 = np.full((4, 4, 3), 7, np.uint8)
    np.testing.assert_array_equal(to_rgb_uint8(u8, stretch=True), u8)  # uint8 untouched


def test_reinhard_statistics_of_a_slide_come_from_its_tissue_at_the_analysis_resolution(
    shared_data: Path,
) -> None:
    """A Reinhard-normalised model trained with each image's statistics at
    0.4 um/px gets a slide's from windows of its tissue read at that
    resolution: their spread matches the whole slide's at 0.4 um/px, where a
    thumbnail's is too small (it averages nuclei and stroma together)."""
    from nucleus_models.detection import _tissue_windows
    from nucleus_models.stain import reinhard_stats
    from nucleus_models.wsi import clip_region, parse_roi

    s = open_slide(shared_data / "wsi" / "CMU-1-Small-Region.svs")
    thumb, tscale = s.thumbnail(256)
    tissue = tissue_mask(thumb)
    region = clip_region(parse_roi(None), s.width, s.height)
    downsample = 0.4 / s.require_mpp()
    sample = _tissue_windows(s, tissue, tscale, region, downsample)
    assert sample.shape == (512, 8 * 512, 3)
    assert _tissue_windows(s, tissue, tscale, region, downsample).tobytes() == sample.tobytes()
    w, h = round(s.width / downsample), round(s.height / downsample)
    whole = s.read_region(0, 0, s.width, s.height, out_w=w, out_h=h)[..., :3]
    ref = np.asarray(reinhard_stats(whole, tissue_mask(whole))["src_sigma_lab"])
    got = np.asarray(reinhard_stats(sample, tissue_mask(sample))["src_sigma_lab"])
    small = np.asarray(reinhard_stats(thumb, tissue)["src_sigma_lab"])
    assert np.all(np.abs(got / ref - 1) < 0.15), (got, ref)
    assert np.all(small / ref < 0.85), (small, ref)


@pytest.mark.parametrize("model", ["classical-he", "unet-monuseg"])
def test_an_all_black_image_has_no_tissue(tmp_path: Path, model: str) -> None:
    """An all-black image (a failed scan) is "no tissue", as an all-white one
    is, for the brightfield models too: it was all tissue to them (optical
    density 7), and the run ended with no nuclei, exit 0, and only a warning
    that it looked like fluorescence."""
    from conftest import write_pyramidal_tiff

    from nucleus_models.detection import DetectionParams, detect_nuclei
    from nucleus_models.errors import NoTissueError

    assert not tissue_mask(np.zeros((50, 50, 3), np.uint8)).any()
    assert not tissue_mask(np.full((50, 50, 3), (70, 45, 130), np.uint8)).any()
    path = write_pyramidal_tiff(tmp_path / "black.tif", np.zeros((300, 400, 3), np.uint8), mpp=0.5)
    with pytest.raises(NoTissueError, match="no tissue found"):
        detect_nuclei(DetectionParams(inputImageFile=str(path), model=model))


def test_a_black_corner_is_not_tissue_nor_in_the_slides_stain_statistics(
    tmp_path: Path, shared_data: Path
) -> None:
    """A slide's unscanned area read as black (or black fill) is no tissue:
    the brightfield mask took it for the densest tissue, its tiles were
    analysed, and it was in the stain statistics of the slide. A 40x slide
    of 60k x 40k px with 28 MP of MoNuSeg tissue and a 4000 x 3000 px black
    corner: 6 of the 40 tiles analysed were the corner's, the Reinhard mean
    L was -11.4 instead of 8.5 and ``classical-he`` found 0 nuclei in a
    3000-px fragment where it finds 1714 without the corner."""
    from conftest import write_pyramidal_tiff

    from nucleus_models.detection import DetectionParams, detect_nuclei
    from nucleus_models.stain import reinhard_stats

    he = np.asarray(
        Image.open(shared_data / "monuseg2018/train/images/TCGA-18-5592-01Z-00-DX1.tif")
    )
    img = np.full((600, 800, 3), 242, np.uint8)
    img[50:350, 50:350] = he[:300, :300, :3]
    clean = img.copy()
    img[:200, 600:] = 0  # the black corner, away from the tissue
    mask = tissue_mask(img)
    assert not mask[:210, 590:].any()
    assert np.array_equal(mask, tissue_mask(clean))
    assert reinhard_stats(img, mask) == reinhard_stats(clean, tissue_mask(clean))

    found = []
    for name, pixels in (("black.tif", img), ("clean.tif", clean)):
        path = write_pyramidal_tiff(tmp_path / name, pixels, mpp=0.5)
        params = DetectionParams(str(path), model="classical-he", analysis_tile_size=256)
        res = detect_nuclei(params)
        found.append((len(res.nuclei), res.tiles["analysed"]))
    assert found[0] == found[1] == (found[1][0], 4) and found[1][0] > 50, found  # (old: 0, 6)


def test_black_inside_the_tissue_is_not_tissue_either() -> None:
    """Black enclosed by tissue (a black ink dot, a scanner's black fill) was
    masked out and then filled back as a hole: in the stain statistics and
    the tiles' tissue fractions after all."""
    img = np.full((200, 200, 3), 242, np.uint8)
    img[20:180, 20:180] = (200, 120, 180)
    img[80:120, 80:120] = 0
    for um_per_px in (None, 10.0):  # (a 0.16 mm^2 hole: one that is filled)
        mask = tissue_mask(img, um_per_px=um_per_px)
        assert not mask[79:121, 79:121].any()
        assert mask[20:76, 20:180].all()


def test_a_fluorescence_masks_large_holes_are_still_filled() -> None:
    """The hole-size limit is for brightfield pen rings: in a fluorescence
    thumbnail the dim stretches between nuclei are holes of the bright mask
    and stay tissue, however large."""
    img = np.zeros((40, 40, 3), np.uint8)
    img[5:35, 5:35] = 120
    img[10:30, 10:30] = 0  # 400 px: 40 mm^2 at 316 um/px
    kept = tissue_mask(img, modality="fluorescence", um_per_px=316)
    assert kept.sum() == 900 and kept[20, 20]
    img = 255 - img  # (the same shapes, brightfield: the hole stays glass)
    assert not tissue_mask(img, um_per_px=316)[20, 20]


def test_glass_inside_a_pen_ring_is_not_tissue(tmp_path: Path, shared_data: Path) -> None:
    """A pen ring drawn round the tissue (as pathologists circle a tumour)
    enclosed glass that the mask's hole filling made "tissue": every tile
    inside it was analysed (a 20k x 15k px slide with a 9 MP fragment: 42
    tiles instead of 9, 23.5 s instead of 4.8) and in the stain statistics.
    Holes larger than MAX_FILLED_HOLE_MM2 stay glass; small ones are filled."""
    from conftest import write_pyramidal_tiff

    from nucleus_models.detection import DetectionParams, detect_nuclei
    from nucleus_models.wsi.tissue import MAX_FILLED_HOLE_MM2

    he = np.asarray(
        Image.open(shared_data / "monuseg2018/train/images/TCGA-18-5592-01Z-00-DX1.tif")
    )
    mpp, n = 1.0, 1800  # (a coarse scan keeps the test small)
    img = np.full((n, n, 3), 242, np.uint8)
    img[800:1000, 800:1000] = he[:400:2, :400:2, :3]
    yy, xx = np.mgrid[0:n, 0:n]
    r = np.hypot(xx - n / 2, yy - n / 2)
    img[(r > 800) & (r < 815)] = (40, 60, 160)  # the ring: 2 mm^2 of glass inside
    assert np.pi * 800**2 * mpp**2 * 1e-6 > 1.5 * MAX_FILLED_HOLE_MM2
    path = write_pyramidal_tiff(tmp_path / "ring.tif", img, mpp=mpp)
    params = DetectionParams(str(path), model="classical-he", analysis_tile_size=512)
    res = detect_nuclei(params)
    # of the 64 tiles of the 3600-px analysis grid the old mask kept 45 (the
    # ring and all inside it), now 25 (the ring's and the tissue's)
    assert res.tiles["total"] == 64 and res.tiles["analysed"] <= 30, res.tiles
    assert len(res.nuclei) > 50


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_plain_image_too_large_for_large_image_says_so(tmp_path: Path, fmt: str) -> None:
    """A PNG or JPEG over large_image's 4096 px is neither unsupported nor
    corrupt (as the error said): it is too large to read whole, and a tiled
    TIFF of it is what to run on."""
    path = tmp_path / f"wide.{fmt.lower()}"
    Image.fromarray(np.full((16, 4200, 3), 200, np.uint8)).save(path, format=fmt)
    with pytest.raises(
        SlideError, match=rf"plain {fmt} image of 4200x16 px is larger than the 4096"
    ):
        open_slide(path)
    broken = tmp_path / f"broken.{fmt.lower()}"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(SlideError, match="unsupported or corrupt"):
        open_slide(broken)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_corrupt_plain_image_over_4096_px_is_corrupt_not_too_large(
    tmp_path: Path, fmt: str
) -> None:
    """A PNG or JPEG whose header says 4200 px wide but whose data is cut
    short (a failed upload) was 'larger than the 4096 px large_image reads
    whole; save it as a tiled TIFF': only the header was read, and the
    advice fails too. It is corrupt."""
    whole = tmp_path / f"whole.{fmt.lower()}"
    rng = np.random.default_rng(0)  # noise: data that does not compress to nothing
    Image.fromarray(rng.integers(0, 255, (16, 4200, 3), np.uint8)).save(whole, format=fmt)
    data = whole.read_bytes()
    for name, payload in (("cut", data[: len(data) // 2]), ("flipped", _flip_mid(data))):
        path = tmp_path / f"{name}.{fmt.lower()}"
        path.write_bytes(payload)
        with Image.open(path) as im:
            assert im.size == (4200, 16)  # the header is whole
        with pytest.raises(SlideError, match="corrupt") as err:
            open_slide(path)
        assert "larger than" not in str(err.value), (name, str(err.value))


def test_a_progressive_jpeg_over_4096_px_is_not_decoded_to_say_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A progressive JPEG is held whole by libjpeg however small the draft
    (~3 bytes a pixel: 342 MB for 10000 x 10000 px, ~11 GB for 60000 x
    60000): a sound one was decoded to tell it from a corrupt one, and was
    killed, or called corrupt on 'Insufficient memory' (simulated here). Its
    end is checked instead: sound is too large, cut short is corrupt."""
    from PIL import JpegImagePlugin

    whole = tmp_path / "whole.jpg"
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (16, 4200, 3), np.uint8))
    img.save(whole, format="JPEG", progressive=True)
    data = whole.read_bytes()

    def out_of_memory(self: object) -> None:
        raise OSError("Insufficient memory (case 4)")

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", out_of_memory)
    with pytest.raises(SlideError, match="larger than the 4096 px"):
        open_slide(whole)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideError, match="corrupt: a JPEG image of 4200x16 px"):
        open_slide(cut)


def _flip_mid(data: bytes) -> bytes:
    """``data`` with the bytes in its middle inverted (same length)."""
    mid = len(data) // 2
    return data[:mid] + bytes(255 - b for b in data[mid : mid + 64]) + data[mid + 64 :]


def test_a_window_narrower_than_a_base_pixel_reads_one(tmp_path: Path) -> None:
    """Upsampled (the slide coarser than the model), a read window of a
    pixel or two rounded to no base pixel: a tile size of 1, or without
    overlap a last tile one pixel wide, ended in OpenCV's traceback."""
    from conftest import write_pyramidal_tiff

    from nucleus_models.wsi.runner import TileJob, read_tile
    from nucleus_models.wsi.tiling import tile_grid

    img = np.random.default_rng(0).integers(0, 255, (250, 250, 3), np.uint8)
    path = write_pyramidal_tiff(tmp_path / "coarse.tif", img, mpp=1.0)
    d = 0.2497  # base pixels per analysis pixel: 1001 x 1001 analysis pixels
    size = (1001, 1001)
    job = TileJob(str(path), None, "classical-he", (), downsample=d, image_size=size)
    for tile_size, overlap in ((10, 0), (1, 0)):  # (10: a last core at 1000)
        tiles = tile_grid(
            (990, 990, 1001, 1001), tile_size=tile_size, overlap=overlap, image_size=size
        )
        for t in tiles:
            w, h = t.read_size
            assert read_tile(job, t).shape == (h, w, 3), (tile_size, t)


def test_a_black_frame_round_the_glass_encloses_no_tissue() -> None:
    """A scan padded with black on every side (an unscanned margin, a crop's
    letterbox), its black noisy as a JPEG's (values up to 12): the black is
    no tissue, and neither is the glass it frames, which hole filling would
    take for a hole in it if the black counted."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 13, (120, 160, 3)).astype(np.uint8)  # near-black
    img[10:110, 10:150] = 242  # glass
    img[40:80, 50:100] = (200, 120, 180)  # tissue
    for um_per_px in (None, 10.0):  # (the framed glass: 1.3 mm^2, a hole too large at 10)
        mask = tissue_mask(img, um_per_px=um_per_px)
        assert mask[40:80, 50:100].all()
        assert mask.sum() == 40 * 50


def test_a_dim_nucleus_is_fluorescence_tissue() -> None:
    """Fluorescence tissue is anything brighter than half of Otsu's threshold:
    a dim nucleus beside bright ones (Otsu's threshold falls in the gap
    between them) is kept, not left out of the analysis."""
    from skimage.filters import threshold_otsu

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 11, (100, 100))  # dark background
    for rows, cols in ((slice(10, 30), slice(10, 30)), (slice(50, 70), slice(10, 30))):
        grey[rows, cols] = rng.integers(150, 256, (20, 20))  # bright nuclei
    grey[50:70, 50:70] = rng.integers(40, 61, (20, 20))  # a dim one
    img = np.repeat(grey[..., None], 3, axis=2).astype(np.uint8)
    assert 60 < threshold_otsu(img.mean(axis=2)) < 150
    mask = tissue_mask(img, modality="fluorescence")
    assert mask[50:70, 50:70].all() and mask.sum() == 3 * 400


def test_pale_tissue_on_grey_glass_is_not_a_flat_image() -> None:
    """Only an image whose every channel varies by 2 levels or less is one
    flat colour with no tissue: pale stain 18 levels below a greyish glass
    (summed optical density 0.24 against 0.13) is tissue."""
    img = np.full((60, 60, 3), 230, np.uint8)
    img[20:40, 20:40] = 212
    mask = tissue_mask(img)
    assert mask[20:40, 20:40].all() and mask.sum() == 400


def test_silver_stained_cells_look_brightfield(shared_data: Path) -> None:
    """CCAgT's AgNOR silver stains, their medians 153-212 of 255, are
    brightfield (a model given them is not warned about the modality)."""
    from nucleus_models.wsi.tissue import apparent_modality

    jpgs = sorted((shared_data / "ccagt_agnor" / "images").glob("*.jpg"))
    assert len(jpgs) == 4
    for jpg in jpgs:
        assert apparent_modality(np.asarray(Image.open(jpg).convert("RGB"))) == "brightfield"


def test_stain_statistics_of_an_image_without_tissue_are_of_the_whole_image() -> None:
    """An empty tissue mask (a blank region, a mask that found nothing) gives
    the whole image's Reinhard statistics, not NaN from no pixels at all."""
    from nucleus_models.stain import reinhard_stats

    img = np.full((40, 40, 3), 200, np.uint8)
    img[:20] = (150, 80, 170)
    got = reinhard_stats(img, np.zeros((40, 40), bool))
    assert got == reinhard_stats(img)
    assert np.isfinite(np.asarray(got["src_mu_lab"])).all()
