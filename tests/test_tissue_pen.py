"""Pen ink (blue, green, black marker on the glass) is not tissue in a
brightfield mask at a known scale, while H&E and IHC tissue (haematoxylin
counterstain as blue as ink, pixel by pixel) keeps every pixel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nucleus_models.wsi.tissue import optical_density, pen_ink, tissue_mask

#: optical density of each ink at full strength (red, green, blue channels)
INKS = {"blue": (0.85, 0.42, 0.12), "green": (0.80, 0.30, 0.50), "black": (1.05, 1.05, 1.00)}


def _stroke(shape: tuple[int, int], y0: int, y1: int, width: float) -> np.ndarray:
    """Ink density 0..1 of a marker stroke from (20, y0) to (cols - 20, y1):
    soft edges (the thumbnail's blur) and streaks along it."""
    rows, cols = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    x0, x1 = 20.0, shape[1] - 20.0
    t = np.clip((cols - x0) / (x1 - x0), 0, 1)
    dist = np.hypot(rows - (y0 + t * (y1 - y0)), cols - (x0 + t * (x1 - x0)))
    edge = np.clip((width / 2 + 1.5 - dist) / 3.0, 0, 1)
    streaks = 0.7 + 0.3 * np.sin(cols / 7.0) ** 2  # the marker's uneven laydown
    return edge * streaks


def _with_ink(rgb: np.ndarray, density: np.ndarray, ink: tuple[float, float, float]) -> np.ndarray:
    """``rgb`` with ink on it: optical densities add (ink over tissue too)."""
    od = optical_density(rgb) + density[..., None] * np.asarray(ink, np.float32)
    return np.clip(np.round(255 * 10.0**-od), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("colour", sorted(INKS))
def test_a_pen_stroke_is_not_tissue_and_the_tissue_is_kept(shared_data: Path, colour: str) -> None:
    """An H&E field (MoNuSeg: purple nuclei, pink and pale stroma) on glass
    with a marker stroke across glass and tissue, as a 10 um/px overview: the
    stroke on the glass was tissue (its tiles analysed, nuclei found in the
    ink); now none of it is, and every tissue pixel away from it is kept.
    (Ink over the tissue is not told from it by colour: it stays tissue.)"""
    he = np.asarray(
        Image.open(shared_data / "monuseg2018/train/images/TCGA-18-5592-01Z-00-DX1.tif")
    )[:300, :300, :3]
    clean = np.full((400, 600, 3), 242, np.uint8)
    clean[50:350, 250:450] = he[:, :200]
    density = _stroke(clean.shape[:2], 40, 380, width=14)
    img = _with_ink(clean, density, INKS[colour])
    um_per_px = 10.0  # (the stroke: ~0.14 mm wide, 6 mm long)

    mask = tissue_mask(img, um_per_px=um_per_px)
    on_glass = (density > 0.05) & ~tissue_mask(clean, um_per_px=um_per_px)
    assert on_glass.sum() > 2000
    assert not (mask & on_glass).any(), int((mask & on_glass).sum())
    from scipy import ndimage as ndi

    away = ~ndi.binary_dilation(density > 0, iterations=3)
    assert np.array_equal(mask & away, tissue_mask(clean, um_per_px=um_per_px) & away)


def test_a_pen_ring_round_the_tissue_leaves_no_glass_inside_it(shared_data: Path) -> None:
    """A blue ring drawn round a tumour: neither the ring nor the glass it
    encloses (not a hole of the tissue any more) is tissue."""
    he = np.asarray(
        Image.open(shared_data / "monuseg2018/train/images/TCGA-18-5592-01Z-00-DX1.tif")
    )[:150, :150, :3]
    img = np.full((300, 300, 3), 242, np.uint8)
    img[75:225, 75:225] = he
    rows, cols = np.mgrid[:300, :300]
    ring = np.clip(1 - np.abs(np.hypot(rows - 150, cols - 150) - 130) / 6, 0, 1)
    inked = _with_ink(img, ring, INKS["blue"])
    mask = tissue_mask(inked, um_per_px=8.0)
    assert mask.sum() == tissue_mask(img, um_per_px=8.0).sum() == 150 * 150


def _real_brightfield(root: Path) -> list[tuple[str, np.ndarray]]:
    def rgb(p: Path) -> np.ndarray:
        return np.asarray(Image.open(p).convert("RGB"))

    images = []
    for p in sorted((root / "deepliif/Sample_Dataset/train").glob("*.png")):
        panels = rgb(p)
        side = panels.shape[0]
        images.append((f"{p.name} IHC", panels[:, :side]))
        images.append((f"{p.name} haematoxylin", panels[:, side : 2 * side]))
    for p in sorted((root / "deepliif/Sample_Large_Tissues").glob("*.png")):
        images.append((p.name, rgb(p)))
    images.append(("skimage ihc", rgb(root / "bundled_samples/skimage/ihc.png")))
    for p in sorted((root / "monuseg2018/train/images").glob("*.tif"))[::6]:
        images.append((p.name, rgb(p)))
    for p in sorted((root / "ccagt_agnor/images").glob("*.jpg"))[:2]:
        images.append((p.name, rgb(p)))
    return images


def _area_mean(rgb: np.ndarray, f: int) -> np.ndarray:
    h, w = rgb.shape[0] // f * f, rgb.shape[1] // f * f
    blocks = rgb[:h, :w].reshape(h // f, f, w // f, f, 3).astype(np.float32)
    return blocks.mean(axis=(1, 3)).round().astype(np.uint8)


def test_ihc_and_he_tissue_is_never_ink(shared_data: Path) -> None:
    """Haematoxylin-blue IHC (DeepLIIF: royal-blue nuclei, cyan-tinted
    stroma), brown DAB, H&E and AgNOR silver: no pixel is ink at their own
    resolution (~0.25 um/px) or read as if 16x coarser (nuclei as blue and as
    dark as ink, in patches 256x their true size), nor when averaged 4x and
    8x as an overview averages them."""
    for name, rgb in _real_brightfield(shared_data):
        for f in (1, 4, 8):
            img = rgb if f == 1 else _area_mean(rgb, f)
            for um_per_px in (0.25 * f, 4.0 * f):
                found = int(pen_ink(img, um_per_px).sum())
                assert found == 0, (name, f, um_per_px, found)


def test_the_tiles_of_a_pen_stroke_on_the_glass_are_not_analysed(
    tmp_path: Path, shared_data: Path
) -> None:
    """A slide with an H&E fragment and a blue marker stroke on the glass
    beside it: the stroke's tiles were analysed as tissue; now the run
    analyses the tiles and finds the nuclei of the slide without it."""
    from conftest import write_pyramidal_tiff

    from nucleus_models.detection import DetectionParams, detect_nuclei

    he = np.asarray(
        Image.open(shared_data / "monuseg2018/train/images/TCGA-18-5592-01Z-00-DX1.tif")
    )[:300, :300, :3]
    clean = np.full((1200, 1600, 3), 242, np.uint8)
    clean[100:400, 100:400] = he
    rows, cols = np.mgrid[:1200, :1600].astype(np.float32)
    # (a stroke 150 px = 75 um wide, 0.07 mm^2, from the lower left to the right edge)
    density = np.clip((75 + 1.5 - np.abs(rows - 1000 + 0.3 * (cols - 200))) / 3, 0, 1)
    density[:, :200] = 0
    inked = _with_ink(clean, density, INKS["blue"])
    found = []
    for name, pixels in (("inked.tif", inked), ("clean.tif", clean)):
        path = write_pyramidal_tiff(tmp_path / name, pixels, mpp=0.5)
        params = DetectionParams(str(path), model="classical-he", analysis_tile_size=256)
        res = detect_nuclei(params)
        found.append((len(res.nuclei), res.tiles["analysed"]))
    assert found[0] == found[1] and found[1][0] > 50, found


def test_a_marker_running_dry_is_ink_down_to_its_faintest_end() -> None:
    """A blue stroke on the glass whose marker ran dry, fading along its
    length from full strength to a fifth: its faint end, pale ink-hued
    pixels joined to the dense ones, is ink too, not a strip of tissue
    whose tiles are analysed."""
    img = np.full((200, 600, 3), 242, np.uint8)
    rows, cols = np.mgrid[:200, :600].astype(np.float32)
    edge = np.clip((7 + 1.5 - np.abs(rows - 100)) / 3.0, 0, 1) * (cols >= 20) * (cols < 580)
    density = edge * np.interp(cols, (20, 580), (1.0, 0.2))
    inked = _with_ink(img, density, INKS["blue"])
    mask = tissue_mask(inked, um_per_px=10.0)
    assert tissue_mask(inked).sum() > 5000  # (without a scale: all tissue)
    assert not mask.any(), int(mask.sum())


def test_a_black_dot_in_the_tissue_stays_out_of_a_mask_with_pen_ink() -> None:
    """A slide with a marker stroke on its glass and a black dot too small
    to be ink (0.04 mm^2) inside its tissue: the dot and its rim are still
    no tissue, as on a slide without ink (the ink's rim replaced the
    black's: the dot was tissue)."""
    img = np.full((400, 600, 3), 242, np.uint8)
    img[50:300, 250:450] = (200, 120, 180)
    img[190:210, 340:360] = 0
    density = _stroke(img.shape[:2], 360, 360, width=14)
    inked = _with_ink(img, density, INKS["blue"])
    assert pen_ink(inked, 10.0)[300:].any() and not pen_ink(inked, 10.0)[:300].any()
    mask = tissue_mask(inked, um_per_px=10.0)
    assert not mask[189:211, 339:361].any()
    assert np.array_equal(mask[:300], tissue_mask(img, um_per_px=10.0)[:300])


def test_the_byte_check_before_the_optical_density_loses_no_ink() -> None:
    """An 8-bit overview is first checked in its bytes for pixels that can
    be ink at all (~30 ms instead of ~150 on a 2048-px H&E overview), and
    let go when too few can be for any patch to be large enough; that must
    never let go of ink the optical density would find. One patch of
    MIN_INK_MM2 on glass, for each of 1500 colours (random, and the byte
    check's edges: red near 127, every channel near 60), gives the same
    ink as the same image in 16 bits, checked in optical density only."""
    rng = np.random.default_rng(5)
    colours = [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(1400)]
    colours += [(r, g, b) for r in (126, 127, 128) for g in (120, 127, 128, 200) for b in (10, 128)]
    colours += [(v, w, x) for v in (59, 60, 61) for w in (58, 60, 62) for x in (60, 61)]
    colours += [(60, 60, 60), (127, 128, 60), (127, 200, 90)]
    um = 0.05e6**0.5 / 12  # (a 12 x 12 px patch is MIN_INK_MM2 at this scale)
    img = np.full((16, 16, 3), 240, np.uint8)
    found = 0
    for c in colours:
        img[2:15, 2:15] = c  # (13 x 13: just above it)
        wide = pen_ink(img.astype(np.uint16), um)
        assert np.array_equal(pen_ink(img, um), wide), c
        found += bool(wide.any())
    assert 0 < found < len(colours)  # (some of the colours are ink, most not)
