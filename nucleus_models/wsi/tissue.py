"""Low-resolution tissue masks (which tiles are worth analysing)."""

from __future__ import annotations

import numpy as np

__all__ = [
    "apparent_modality",
    "optical_density",
    "pen_ink",
    "thumbnail_window",
    "tissue_mask",
    "tile_tissue_fraction",
]


#: brightest channel below which a thumbnail pixel is black, not stain: a
#: slide's unscanned area (transparent, read as black) or black fill
#: (stained tissue: under 0.1 % of its pixels; MoNuSeg's 30 images: none)
NEAR_BLACK = 16


#: the largest hole in the tissue (mm^2) filled as tissue, where the
#: thumbnail's scale is known: a pen ring drawn round a tumour (often
#: centimetres across) enclosed glass that was then all "tissue", analysed
#: tile by tile and counted in the stain statistics; lumens and vessels
#: are far smaller
MAX_FILLED_HOLE_MM2 = 1.0


#: the smallest patch of pen ink (mm^2) left out of a brightfield mask whose
#: scale is known: a marker stroke is ~0.5 mm wide and millimetres long,
#: while a haematoxylin-blue nucleus (IHC's counterstain looks like blue ink
#: pixel by pixel) is ~1e-4 mm^2, and a crowd of them at a thumbnail's scale
#: averages with the paler cytoplasm and stroma round it
MIN_INK_MM2 = 0.05


def tissue_mask(
    thumbnail: np.ndarray, *, modality: str = "brightfield", um_per_px: float | None = None
) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 thumbnail (``um_per_px``: its
    resolution, if known; then a brightfield mask's holes are filled only
    up to :data:`MAX_FILLED_HOLE_MM2`).

    Brightfield: summed optical density above 0.2 (white glass is ~0.05,
    pale eosin ~0.3), closed and hole-filled; black (brightest channel below
    :data:`NEAR_BLACK`: a slide's unscanned area, black fill) and the
    2-pixel rim the thumbnail blurs around it are not tissue, though their
    optical density is the highest.  Fluorescence: brighter than
    half of Otsu's threshold on the mean channel (dark background).
    Thresholds are fixed, so the mask does not depend on how the slide is cut.
    An image of one flat colour (blank, all black) has no tissue.
    Where ``um_per_px`` is known, pen ink (:func:`pen_ink`: blue, green and
    black marker of 0.05 mm^2 or more) is not tissue either: on the glass,
    and over tissue only where the ink's colour is what shows (ink and
    stain add up; ink over tissue is mostly taken for tissue).

    >>> img = np.full((20, 20, 3), 245, np.uint8); img[5:15, 5:15] = (200, 120, 180)
    >>> int(tissue_mask(img).sum())
    100
    >>> img[7:13, 7:13] = 245  # a hole, 24 px after the closing: 0.24 mm^2 at 100 um/px
    >>> [int(tissue_mask(img, um_per_px=u).sum()) for u in (None, 100, 316)]
    [100, 100, 76]
    """
    from scipy import ndimage as ndi

    rgb = thumbnail[..., :3]
    black_rim = None  # black and the rim blurred around it: never tissue, not even as a hole
    if modality == "fluorescence":
        from skimage.filters import threshold_otsu

        grey = rgb.astype(np.float32).mean(axis=2)
        if float(grey.max()) - float(grey.min()) < 1.0:
            return np.zeros(grey.shape, bool)  # one flat level (Otsu needs two)
        mask = grey > 0.5 * threshold_otsu(grey)
    else:
        if _flat(rgb):
            return np.zeros(rgb.shape[:2], bool)  # one flat colour (e.g. all black)
        od = optical_density(rgb)
        mask = od.sum(axis=2) > 0.2
        # (channel by channel: rgb.max(axis=2) took 77 ms on a 2048-px thumbnail, this 3)
        black = np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2]) < NEAR_BLACK
        if black.any():
            black_rim = _grown(black, 2)
        if um_per_px is not None:
            # (only at a known scale: whether a pen-coloured patch is ink is its size in mm^2)
            ink = pen_ink(rgb, um_per_px, od=od)
            if ink.any():
                ink = _grown(ink, 2)  # (and the rim the thumbnail blurs round it)
                black_rim = ink if black_rim is None else black_rim | ink
        if black_rim is not None:
            mask &= ~black_rim
    mask = ndi.binary_closing(mask, iterations=2, border_value=0) | mask
    filled = ndi.binary_fill_holes(mask)
    if um_per_px is not None and modality != "fluorescence":
        # (a pen ring is drawn on brightfield slides; a fluorescence slide's dim
        # stretches between nuclei are holes of its bright-pixel mask)
        in_holes = filled & ~mask
        largest = MAX_FILLED_HOLE_MM2 * 1e6 / um_per_px**2  # (thumbnail pixels)
        if in_holes.sum() > largest:  # (else no hole is larger: no labelling, ~20 ms)
            holes, _ = ndi.label(in_holes)
            large = np.bincount(holes.ravel()) > largest
            large[0] = False  # (not a hole)
            if large.any():
                filled &= ~large[holes]
    if black_rim is not None:
        # (black or ink inside the tissue, a black ink dot or fill, is a hole the filling took back)
        filled &= ~black_rim
    return filled


def pen_ink(rgb: np.ndarray, um_per_px: float, *, od: np.ndarray | None = None) -> np.ndarray:
    """Pixels of an RGB uint8 brightfield image at ``um_per_px`` that are pen
    ink: blue, green or black marker drawn on the glass.

    By colour, in optical density (OD): blue and green ink absorb red far
    more than green (OD red >= 1.7x OD green, and OD blue <= 0.8x OD red),
    which haematoxylin, eosin and DAB do not (their OD green is at least
    their OD red: on MoNuSeg's 30 H&E images and CCAgT's silver stains,
    99.9 % of tissue pixels have OD green >= 0.66x OD red; CMU-1's
    green-blue margin dye specks are ink-coloured, but a few um^2); black
    ink is dark (every channel at most 60), grey (the densest channel's OD
    at most 1.3x the palest's; dense haematoxylin is purple) and not brown
    (OD red at least 0.9x the densest's: the darkest DAB and AgNOR silver
    are red-brown).  By size: IHC's haematoxylin nuclei are as blue as ink
    pixel by pixel (DeepLIIF's bladder and lung fields), so only a
    connected patch of such pixels of at least :data:`MIN_INK_MM2` whose
    ink-coloured pixels are more than half of it is ink.  Paler pixels of
    the ink's hue (grey for black ink) joined to it, a stroke's streaks and
    edges, are part of it.  Ink over tissue is not told from the tissue
    (their densities add).  Red ink is not looked for: it is the colour of
    blood and of eosin-rich tissue.

    >>> img = np.full((60, 60, 3), 240, np.uint8); img[20:40, :] = (40, 90, 170)  # blue stroke
    >>> [int(pen_ink(img, u).sum()) for u in (20.0, 2.0)]  # 0.48 mm^2, 0.0048 mm^2
    [1200, 0]
    """
    from scipy import ndimage as ndi

    rgb = rgb[..., :3]
    smallest = MIN_INK_MM2 * 1e6 / um_per_px**2
    if rgb.dtype == np.uint8:
        # (what can be ink at all, in the bytes: strong blue or green ink has
        # red at most 127 (OD 0.3) and darker than green, black ink every
        # channel at most 60; an H&E overview has next to none, and is done
        # here in ~30 ms instead of ~150)
        r8, g8 = rgb[..., 0], rgb[..., 1]
        maybe = (r8 <= 127) & ((g8 > r8) | ((g8 <= 60) & (rgb[..., 2] <= 60)))
        if np.count_nonzero(maybe) < smallest:
            return np.zeros(rgb.shape[:2], bool)
    od = optical_density(rgb) if od is None else od  # (``od``: the caller's, of ``rgb``)
    r, g, b = od[..., 0], od[..., 1], od[..., 2]
    cool = (g * 1.7 <= r) & (b <= 0.8 * r)  # blue or green ink's hue
    pale = cool & (r >= 0.1)  # (also a stroke's paler edges and streaks)
    strong = cool & (r >= 0.3)
    top = np.maximum(np.maximum(r, g), b)
    low = np.minimum(np.minimum(r, g), b)
    # black ink: grey, not brown (dense DAB and silver are darkest in blue and green) and dark
    grey = (top <= 1.3 * low) & (r >= 0.9 * top) & (low >= 0.1)  # (0.1: glass is paler)
    dark = grey & (low >= -np.log10(60 / 255))
    candidate = pale | grey
    inky = strong | dark
    if np.count_nonzero(inky) < smallest:  # (no patch can be large enough: no labelling)
        return np.zeros(rgb.shape[:2], bool)
    labels, n = ndi.label(candidate, structure=np.ones((3, 3), bool))
    size = np.bincount(labels.ravel(), minlength=n + 1)
    solid = np.bincount(labels.ravel(), weights=inky.ravel(), minlength=n + 1)
    ink = (solid >= smallest) & (solid > 0.5 * size)
    ink[0] = False
    return ink[labels]


def _grown(mask: np.ndarray, px: int) -> np.ndarray:
    """``mask`` dilated by ``px`` pixels (cross-shaped steps), computed in its
    bounding box only (a few black pixels: ~0.1 ms instead of 19 on a
    2048-px thumbnail).

    >>> m = np.zeros((6, 8), bool); m[2, 3] = True
    >>> int(_grown(m, 2).sum()), bool(_grown(m, 2)[0, 3]), bool(_grown(m, 2)[1, 2])
    (13, True, True)
    """
    from scipy import ndimage as ndi

    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    out = np.zeros_like(mask)
    if len(rows):
        box = (
            slice(max(rows[0] - px, 0), rows[-1] + px + 1),
            slice(max(cols[0] - px, 0), cols[-1] + px + 1),
        )
        out[box] = ndi.binary_dilation(mask[box], iterations=px)
    return out


def _flat(rgb: np.ndarray, tolerance: int = 2) -> bool:
    """True when each channel varies by at most ``tolerance`` over the image
    (one flat colour, give or take compression noise).  A sparse grid is
    looked at first: an image with any detail answers in microseconds.

    >>> black = np.zeros((64, 64, 3), np.uint8); noisy = black.copy(); noisy[5, 7] = 1
    >>> _flat(black), _flat(noisy), _flat(np.dstack([noisy[..., 0] * 200] * 3))
    (True, True, False)
    """
    if rgb.size == 0:
        return True

    def spread(a: np.ndarray) -> int:
        return int((a.max(axis=(0, 1)).astype(np.int16) - a.min(axis=(0, 1))).max())

    return spread(rgb[::16, ::16]) <= tolerance and spread(rgb) <= tolerance


def grid_sample(arr: np.ndarray, side: int = 256) -> np.ndarray:
    """Every ``step``-th row and column of ``arr``, ``step`` as large as
    leaves at least ``side`` x ``side`` pixels (all of a smaller array): the
    same median as of every pixel of a 2048-px thumbnail, ~40x faster.
    Arrays of one shape are sampled alike (an image and its mask).

    >>> grid_sample(np.zeros((1024, 2048))).shape, grid_sample(np.zeros((100, 100))).shape
    ((256, 512), (100, 100))
    """
    step = max(1, min(arr.shape[:2]) // side)
    return arr[::step, ::step]


def apparent_modality(rgb: np.ndarray) -> str | None:
    """What an RGB uint8 image (a slide's thumbnail) looks like from its
    background: ``"fluorescence"`` when most of it is dark (median brightness
    below 50 of 255), ``"brightfield"`` when most of it is bright (above 150),
    ``None`` in between (e.g. a crop filled with dense tissue).

    On this project's data: MoNuSeg's 30 H&E images have medians 82-211,
    CCAgT's silver stains 153-212, CMU-1-Small-Region 243; BBBC038's 37
    fluorescence images 3-52 and the DAPI NDPI slide 5.

    >>> apparent_modality(np.full((8, 8, 3), 240, np.uint8)), apparent_modality(np.zeros((8, 8, 3), np.uint8))
    ('brightfield', 'fluorescence')
    """
    if rgb.size == 0:
        return None
    median = float(np.median(grid_sample(rgb)[..., :3].mean(axis=-1)))
    if median < 50:
        return "fluorescence"
    if median > 150:
        return "brightfield"
    return None


#: -log10(max(v, 1) / 255) for every uint8 value v, in float32
_OD_LUT = -np.log10(np.clip(np.arange(256, dtype=np.float32), 1.0, 255.0) / np.float32(255.0))


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Per-channel optical density ``-log10(max(I, 1) / 255)`` as float32.

    uint8 images are looked up in a 256-entry table (the same float32 values
    as the formula, ~10x faster on a 2048-px thumbnail); other types are
    computed.

    >>> od = optical_density(np.array([[[128, 25, 0]]], np.uint8))
    >>> od.dtype, [round(float(v), 3) for v in od[0, 0]]
    (dtype('float32'), [0.299, 1.009, 2.407])
    """
    if rgb.dtype == np.uint8:
        return _OD_LUT[rgb]
    return -np.log10(np.clip(rgb.astype(np.float32), 1.0, 255.0) / np.float32(255.0))


def tile_tissue_fraction(
    mask: np.ndarray, box: tuple[float, float, float, float], scale: float
) -> float:
    """Fraction of tissue in base-pixel ``box`` (x0, y0, x1, y1) of a mask at ``scale``."""
    sub = thumbnail_window(mask, box, scale)
    return float(sub.mean()) if sub.size else 0.0


def thumbnail_window(
    arr: np.ndarray, box: tuple[float, float, float, float], scale: float
) -> np.ndarray:
    """The pixels of a thumbnail (or its mask) at ``scale`` that cover base-pixel
    ``box`` (x0, y0, x1, y1), at least one pixel wide and high.

    >>> thumbnail_window(np.arange(100).reshape(10, 10), (15, 0, 31, 10), 0.1).tolist()
    [[1, 2, 3]]
    """
    x0 = int(np.floor(box[0] * scale))
    y0 = int(np.floor(box[1] * scale))
    x1 = max(int(np.ceil(box[2] * scale)), x0 + 1)
    y1 = max(int(np.ceil(box[3] * scale)), y0 + 1)
    return arr[y0:y1, x0:x1]
