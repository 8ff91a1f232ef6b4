"""Opening slides with large_image, and their resolution.

This package is the only place in the project that imports ``large_image``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SlideError

__all__ = [
    "FrameChoice",
    "Slide",
    "alpha_level",
    "choose_frame",
    "frame_label",
    "level_multiple",
    "open_slide",
    "to_rgb_uint8",
    "white_level",
]

log = logging.getLogger(__name__)


def _large_image() -> Any:
    import large_image

    # large_image sets its logger to INFO at import ("Cannot use memcached");
    # tifffile warns about every damaged page. We report such problems ourselves.
    logging.getLogger("large_image").setLevel(logging.WARNING)
    for name in ("tifffile", "tifftools"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return large_image


#: :meth:`Slide.read_region` reads the base layer itself when shrinking by less than this
LEVEL_READ_SHRINK = 2.0

#: the overview pixels whose base pixels :meth:`Slide.thumbnail` reads for
#: the slide's brightest sample (:func:`white_level`'s ``base_peak``)
BASE_PEAK_PIXELS = 16


def _shrink(w: int, h: int, out_w: int, out_h: int) -> float:
    """How many base pixels a ``w x h`` region read to ``out_w x out_h``
    puts in one output pixel, along its more shrunk side."""
    return max(w / max(out_w, 1), h / max(out_h, 1))


def level_multiple(w: int, h: int, out_w: int, out_h: int) -> int:
    """The base pixels a ``w x h`` region read to ``out_w x out_h`` should
    start and end on a multiple of, for :meth:`Slide.read_region` to read
    exactly that region: 1 where it reads the base layer; from
    :data:`LEVEL_READ_SHRINK` on, large_image reads a pyramid level and
    floors the region's edges to that level's pixels (a window starting at
    base pixel 1001 of a 4x level was read from 1000), so the power of two
    no level it can pick is coarser than (a generous bound: a larger one
    only moves the edges further).

    >>> level_multiple(480, 480, 300, 300), level_multiple(601, 601, 300, 300)
    (1, 2)
    >>> level_multiple(1250, 1250, 300, 300), level_multiple(800, 800, 200, 200)
    (4, 4)
    """
    shrink = _shrink(w, h, out_w, out_h)
    if shrink < LEVEL_READ_SHRINK:
        return 1
    # (large_image sizes its output preserving the aspect ratio, in whole
    # pixels: its shrink can exceed this one by a pixel's worth)
    shrink *= 1 + 2 / max(1, min(out_w, out_h))
    return 1 << int(math.floor(math.log2(shrink) + 1e-4))


@dataclass
class Slide:
    """A readable slide: size, resolution and region reads in RGB (or grey).

    Attributes
    ----------
    path : str
        File the slide was opened from.
    width, height : int
        Size of the base (highest-resolution) layer in pixels.
    mpp : float
        Microns per base pixel (from metadata or the ``input_mpp`` override).
    mpp_source : str
        Where ``mpp`` came from: ``"metadata"`` (large_image's), ``"ome-xml"``
        (an OME-TIFF's ``PhysicalSizeX``), ``"magnification"`` or ``"override"``.
    """

    path: str
    width: int
    height: int
    mpp: float | None
    mpp_source: str
    source: Any
    metadata: dict[str, Any]
    #: the sample value read as 255 in uint8 (integer data wider than 8
    #: bits; :func:`white_level`): from the overview, once read, so every
    #: tile of the slide is scaled alike; None: not yet known or not needed
    white: float | None = None
    #: the alpha value read as opaque (integer data wider than 8 bits with
    #: an alpha band; :func:`alpha_level`), from the overview as ``white``;
    #: None: not yet known or not needed
    alpha_white: float | None = None
    #: the frame of a multi-frame slide (a channel, z-plane, ...; large_image's
    #: index) every read uses (:func:`choose_frame`); None: large_image's
    #: default, its first
    frame: int | None = None

    @property
    def frame_count(self) -> int:
        """The frames the slide has (1 for a plain slide)."""
        return max(1, len(self.metadata.get("frames") or []))

    def _frame_kw(self) -> dict[str, Any]:
        return {} if self.frame is None else {"frame": self.frame}

    def require_mpp(self) -> float:
        """Return the resolution or raise a clear error if it is unknown."""
        if self.mpp is None:
            raise SlideError(
                f"{Path(self.path).name}: resolution unknown (no microns-per-pixel, OME-XML "
                "PhysicalSizeX or magnification in its metadata); pass --input_mpp, the microns "
                "per base pixel "
                "('Input resolution (um/px)' in HistomicsUI)"
            )
        return self.mpp

    def metadata_mpp(self) -> tuple[float | None, str]:
        """The resolution the slide's own metadata gives and where from
        (``"metadata"``, ``"ome-xml"``, ``"magnification"`` or
        ``"unknown"``), even where ``input_mpp`` overrides it."""
        return _slide_mpp(Path(self.path), self.metadata, self.width, self.height)

    def read_region(
        self, x: int, y: int, w: int, h: int, *, out_w: int | None = None, out_h: int | None = None
    ) -> np.ndarray:
        """Read base-pixel region ``(x, y, w, h)`` resampled to ``out_w x out_h``.

        Returns an ``(out_h, out_w, C)`` uint8 array (RGB for colour slides,
        one channel repeated to three for single-channel images).
        """
        out_w = w if out_w is None else out_w
        out_h = h if out_h is None else out_h
        arr = self._raw_region(x, y, w, h, out_w, out_h)
        if self.white is None and _needs_white(arr):
            self.thumbnail(512)  # (sets the slide's white level from its overview)
        rgb = to_rgb_uint8(arr, white=self.white, alpha_white=self.alpha_white)
        return _fit(rgb, out_w, out_h)

    def _raw_region(self, x: int, y: int, w: int, h: int, out_w: int, out_h: int) -> np.ndarray:
        """A region as large_image gives it (its own type and bands), from
        the base layer when shrinking by less than :data:`LEVEL_READ_SHRINK`,
        else from a level, at most ``out_w x out_h``."""
        li = _large_image()
        region = {"left": x, "top": y, "width": w, "height": h, "units": "base_pixels"}
        # Shrinking by less than 2x, the base layer is the one large_image
        # would read: read it as it is and shrink it with OpenCV's INTER_AREA,
        # as the training and evaluation images are (large_image's Lanczos
        # took ~75 of the ~90 ms a 1792-px 40x tile took to read at 0.4 um/px);
        # from 2x on, large_image reads a coarser layer
        # (level_multiple: which region a level read reads exactly)
        shrink = _shrink(w, h, out_w, out_h)
        level_read = shrink >= LEVEL_READ_SHRINK
        output: dict[str, Any] = {}
        own_resize = False
        if level_read:
            output = {"output": {"maxWidth": out_w, "maxHeight": out_h}}
            if self._samples_not_uint8():
                # large_image shrinks a level's region to the output through
                # PIL, first cutting any samples but uint8 to uint8 its own
                # way (floats clipped to 0-255: [0, 1] data read black;
                # int32 offset by 2**31: mid-grey; uint16 / 256: 16 greys
                # for 12-bit data). Ask it for the level's region at the
                # level's own scale, untouched (resample=None: at most a
                # pixel's nearest-neighbour fit, in the samples' own type),
                # and shrink that here as the base layer is. The size asked
                # for is the region at the scale of the level large_image
                # reads (a finer stored one where the level is missing, the
                # coarsest where shrinking further), rounded down: rounded up
                # (or at a scale it has no level for), it reads a finer level
                # and fits it to that size by nearest neighbour.
                f = self._level_factor(shrink)
                cw = max(1, min(x + w, self.width) - max(x, 0))
                ch = max(1, min(y + h, self.height) - max(y, 0))
                output = {
                    "output": {"maxWidth": max(1, cw // f), "maxHeight": max(1, ch // f)},
                    "resample": None,
                }
                own_resize = True
        try:
            arr, _ = self.source.getRegion(
                region=region, format=li.constants.TILE_FORMAT_NUMPY, **output, **self._frame_kw()
            )
        except Exception as exc:  # large_image / openslide / tifffile errors
            raise SlideError(
                f"{Path(self.path).name}: cannot read region {x},{y},{w},{h} "
                f"(file truncated or corrupt?): {_first_line(exc)}"
            ) from exc
        arr = np.asarray(arr)
        arr = arr[:, :, None] if arr.ndim == 2 else arr
        if own_resize and (arr.shape[0], arr.shape[1]) != (out_h, out_w):
            arr = _resize_area(arr, out_w, out_h)
        return arr

    def _level_factor(self, shrink: float) -> int:
        """Base pixels per pixel of the level large_image reads a region
        from when shrinking it by ``shrink`` (2 or more): the power of two
        at most ``shrink``, or that of the finer level large_image reads
        where that one is not stored (or of the coarsest level it has)."""
        k = int(math.floor(math.log2(shrink) + 1e-4))
        levels = int(getattr(self.source, "levels", 0) or 0)
        if levels < 1:
            return 1 << k
        k = min(k, levels - 1)
        try:
            level = int(self.source.getPreferredLevel(levels - 1 - k))
        except Exception:
            return 1 << k
        return 1 << max(0, min(k, levels - 1 - level))

    def _samples_not_uint8(self) -> bool:
        """Whether the slide's samples are of a type other than uint8 (as
        large_image's source says; False where it cannot say)."""
        try:
            dtype = np.dtype(self.source.dtype)
        except Exception:
            return False
        return dtype != np.uint8

    def _thumbnail_size(self, max_size: int) -> tuple[int, int]:
        scale = min(1.0, max_size / max(self.width, self.height))
        return max(1, int(round(self.width * scale))), max(1, int(round(self.height * scale)))

    def overview_level(self, max_size: int = 2048) -> int | None:
        """The stored level (large_image's numbering, the base is
        ``levels - 1``) :meth:`thumbnail` reads tile by tile where the slide
        has no stored level near the thumbnail's scale; None where it has one
        (or the base is shrunk by less than :data:`LEVEL_READ_SHRINK`).

        large_image makes a missing level from the next stored one, a few
        levels at a time, resampling every tile with PIL: a 2048-px
        thumbnail of a 30000 x 30000 px single-level TIFF took 64 s
        (2 cores), while the same base tiles read and shrunk with OpenCV's
        INTER_AREA, a row of tiles at a time, took ~20 s."""
        out_w, out_h = self._thumbnail_size(max_size)
        shrink = _shrink(self.width, self.height, out_w, out_h)
        levels = int(getattr(self.source, "levels", 0) or 0)
        if shrink < LEVEL_READ_SHRINK or levels < 2:
            return None
        nonempty = getattr(self.source, "_nonemptyLevelsList", None)
        try:
            stored = [v is not None for v in nonempty()] if callable(nonempty) else []
        except Exception:
            stored = []
        if len(stored) != levels:
            return None  # (a source that cannot say: large_image's own way)
        want = max(0, levels - 1 - int(math.floor(math.log2(shrink) + 1e-9)))
        finer = [z for z in range(want, levels) if stored[z]]
        # (one level finer: large_image composites 4 stored tiles a tile, quickly)
        return finer[0] if finer and finer[0] - want >= 2 else None

    def thumbnail(
        self, max_size: int = 2048, *, progress: Callable[[float], None] | None = None
    ) -> tuple[np.ndarray, float]:
        """Return ``(image, scale)`` with ``scale`` = thumbnail pixels per base pixel.

        Where the slide has no stored level near the thumbnail's scale
        (:meth:`overview_level`), the level it has is read a row of tiles at
        a time, ``progress`` told the fraction read after each row. Integer
        samples wider than 8 bits set :attr:`white` from the overview
        (:func:`white_level`) unless it is set."""
        out_w, out_h = self._thumbnail_size(max_size)
        level = self.overview_level(max_size)
        if level is None:
            raw = self._raw_region(0, 0, self.width, self.height, out_w, out_h)
        else:
            raw = self._overview_from_level(level, out_w, out_h, progress)
        if self.white is None and _needs_white(raw):
            self.white = white_level(raw)
            if _wide_integers(raw) and self.white < np.iinfo(raw.dtype).max:
                self.white = white_level(raw, base_peak=self._base_peak(raw))
            if raw.shape[-1] in (2, 4) and _wide_integers(raw):
                self.alpha_white = alpha_level(raw)
        rgb = to_rgb_uint8(raw, white=self.white, alpha_white=self.alpha_white)
        img = _fit(rgb, out_w, out_h)
        if progress is not None:
            progress(1.0)
        return img, out_w / self.width

    def _base_peak(self, overview: np.ndarray) -> float:
        """The brightest colour sample of the base pixels under the
        :data:`BASE_PEAK_PIXELS` brightest pixels of ``overview`` (the
        slide's, in its own type), transparent ones left out.

        The overview averages a nucleus smaller than its pixel with the
        ground around it: sparse bright nuclei on a black ground (a 16-bit
        fluorescence composite) peaked at a quarter of their value or less,
        the white level was set from that and every nucleus read clipped at
        255. The base pixels say how bright the brightest ones are."""
        brightest = np.where(_opaque(overview), _brightest(overview), 0).ravel()
        k = min(BASE_PEAK_PIXELS, brightest.size)
        picks = np.argpartition(brightest, brightest.size - k)[brightest.size - k :]
        oh, ow = overview.shape[:2]
        sx, sy = self.width / ow, self.height / oh
        peak = 0.0
        for i in picks[brightest[picks] > 0]:
            r, c = divmod(int(i), ow)
            # (a base pixel's margin: large_image's overview floors edges)
            x0, y0 = max(0, int(c * sx) - 1), max(0, int(r * sy) - 1)
            x1 = min(self.width, int(math.ceil((c + 1) * sx)) + 1)
            y1 = min(self.height, int(math.ceil((r + 1) * sy)) + 1)
            base = self._raw_region(x0, y0, x1 - x0, y1 - y0, x1 - x0, y1 - y0)
            peak = max(peak, float(_brightest(base)[_opaque(base)].max(initial=0)))
        return peak

    def level_size(self, level: int) -> tuple[int, int]:
        """The width and height in pixels of stored level ``level``
        (large_image's numbering, the base is ``levels - 1``): its own
        where the source says it (libtiff's directory: a level may be
        rounded down, a 1025 px base's quarter 256 px), else the base's
        rounded up."""
        f = 2 ** (int(self.source.levels) - 1 - level)
        lw, lh = -(-self.width // f), -(-self.height // f)
        with contextlib.suppress(Exception):
            stored = self.source._nonemptyLevelsList()[level]
            lw = int(getattr(stored, "imageWidth", 0) or 0) or lw
            lh = int(getattr(stored, "imageHeight", 0) or 0) or lh
        return lw, lh

    def _overview_from_level(
        self, level: int, out_w: int, out_h: int, progress: Callable[[float], None] | None
    ) -> np.ndarray:
        """Stored level ``level`` shrunk to ``out_w x out_h`` with INTER_AREA,
        a row of its tiles at a time (read by a thread each core), in the
        slide's own type and bands."""

        from .runner import available_cores

        lw, lh = self.level_size(level)
        tw, th = int(self.source.tileWidth), int(self.source.tileHeight)
        nx, ny = -(-lw // tw), -(-lh // th)

        def tile(tx: int, ty: int) -> np.ndarray:
            try:
                t = np.asarray(
                    self.source.getTile(tx, ty, level, numpyAllowed="always", **self._frame_kw())
                )
            except Exception as exc:  # large_image / tifffile errors
                raise SlideError(
                    f"{Path(self.path).name}: cannot read tile {tx},{ty} of level {level} "
                    f"(file truncated or corrupt?): {_first_line(exc)}"
                ) from exc
            return t[:, :, None] if t.ndim == 2 else t

        out: np.ndarray | None = None
        with ThreadPoolExecutor(max_workers=available_cores()) as pool:
            for ty in range(ny):
                row = np.concatenate(list(pool.map(tile, range(nx), [ty] * nx)), axis=1)
                y0, y1 = ty * th, min((ty + 1) * th, lh)
                row = row[: y1 - y0, :lw]
                if out is None:
                    out = np.zeros((out_h, out_w, row.shape[2]), row.dtype)
                r0, r1 = round(y0 * out_h / lh), round(y1 * out_h / lh)
                if r1 > r0:
                    out[r0:r1] = _resize_area(row, out_w, r1 - r0)
                if progress is not None:
                    progress((ty + 1) / ny)
        assert out is not None
        return out


#: the sample types OpenCV's INTER_AREA resize takes
_CV_RESIZE_TYPES = tuple(
    np.dtype(t) for t in (np.uint8, np.uint16, np.int16, np.float32, np.float64)
)


def _fit(img: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """uint8 ``img`` at ``out_w x out_h``: as it is where it has that size,
    else shrunk by area or grown bilinearly."""
    import cv2

    if img.shape[0] == out_h and img.shape[1] == out_w:
        return img
    interp = cv2.INTER_AREA if img.shape[1] > out_w else cv2.INTER_LINEAR
    img = cv2.resize(img, (out_w, out_h), interpolation=interp)
    return img[:, :, None] if img.ndim == 2 else img


def _resize_area(arr: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """``arr`` (H x W x C) shrunk to ``out_w x out_h`` with OpenCV's
    INTER_AREA, in its own sample type (integers rounded; types OpenCV
    refuses, e.g. int32, resized as float64)."""
    import cv2

    src = arr if arr.dtype in _CV_RESIZE_TYPES else arr.astype(np.float64)
    small = cv2.resize(src, (out_w, out_h), interpolation=cv2.INTER_AREA)
    small = small.reshape(out_h, out_w, -1)
    if small.dtype != arr.dtype:
        small = np.rint(small).astype(arr.dtype)
    return small


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _wide_integers(arr: np.ndarray) -> bool:
    """Integer samples wider than 8 bits (a 12- or 16-bit scan)."""
    return np.issubdtype(arr.dtype, np.integer) and arr.dtype.itemsize > 1


def _needs_white(arr: np.ndarray) -> bool:
    """Samples whose scale the slide's overview sets (:func:`white_level`):
    integers wider than 8 bits, and floats (in [0, 1] or in [0, 255])."""
    return _wide_integers(arr) or np.issubdtype(arr.dtype, np.floating)


def _brightest(arr: np.ndarray) -> np.ndarray:
    """Each pixel's brightest colour sample (of RGB, or the grey band;
    alpha left out)."""
    bands = arr.shape[-1]
    colour = arr[..., :3] if bands >= 3 else arr[..., :1]
    colour = np.nan_to_num(colour, nan=0.0) if colour.dtype.kind == "f" else colour
    return colour.max(axis=-1)


def _opaque(arr: np.ndarray) -> np.ndarray:
    """Which pixels are not transparent (alpha, the last of 2 or 4 bands, above 0)."""
    if arr.shape[-1] in (2, 4):  # grey + alpha, RGBA: as :func:`to_rgb_uint8` reads them
        return np.asarray(arr[..., -1] > 0)
    return np.ones(arr.shape[:-1], bool)


def white_level(overview: np.ndarray, *, base_peak: float | None = None) -> float:
    """The sample value to read as 255 for a slide of integer samples wider
    than 8 bits, or of floats (1.0 where the overview lies in [0, 1], 255.0
    in [0, 255]; else as integers): ``2**bits - 1`` for the fewest bits that hold the
    overview's brightest colour sample, rounded up to a camera's bit depth
    (8, 10, 12, 14, 16, ...: an even number), and at most the samples' own.
    A 12-bit camera's scan saved as a 16-bit TIFF (0-4095) was divided by
    257 like 16-bit data: the model saw it at most 16 of 255, nearly black,
    and found no tissue.

    The overview averages pixels, so a tile can be brighter than the
    overview's brightest sample: rounding up to an even number of bits
    leaves 2-4x of room (a dim 12-bit image whose overview peaks at 2000 is
    read as 12-bit, not clipped at 2047). On a dark ground (most of the
    overview under a quarter of its peak: fluorescence), small bright
    nuclei average down the most, so two more bits are left (a sparse 12-bit
    image whose overview peaks at 1000 is still read as 12-bit), never
    darker than the samples' full range (16-bit data / 257, as before;
    int16's is 32767). Transparent pixels (alpha 0, shown black) are left
    out: a brightfield slide's unscanned, transparent margin was taken for
    a dark ground and its tissue read 4x too dark; so is black (0) from a
    colour (RGB: brightfield) overview's ground, for an unscanned margin
    filled with 0. A grey (one-band: fluorescence) overview's 0 is ground:
    a background-subtracted channel's.

    ``base_peak``, the brightest sample of the base pixels under the
    overview's brightest (:meth:`Slide.thumbnail` reads them), raises the
    level to the bit depth that holds it: small nuclei average down in
    the overview however its ground looks (on an RGB composite's black
    ground, left out above, by 4x or more), and a base sample is never
    brighter than its camera's depth.

    >>> white_level(np.array([[[4000, 2000, 100, 65535]]], np.uint16))  # (alpha left out)
    4095.0
    >>> white_level(np.array([[[2000, 10, 10]]], np.uint16)), white_level(np.array([[[5000]]], np.uint16))
    (4095.0, 16383.0)
    >>> white_level(np.array([[[60000, 10, 10]]], np.uint16)), white_level(np.full((1, 1, 3), 200, np.uint16))
    (65535.0, 255.0)
    >>> dark = np.full((4, 4, 1), 50, np.uint16); dark[0, 0] = 1000  # (fluorescence)
    >>> white_level(dark), white_level(np.where(dark > 50, 20000, dark).astype(np.uint16))
    (4095.0, 65535.0)
    >>> white_level(np.full((1, 1, 3), 0.6, np.float32)), white_level(np.full((1, 1, 3), 153.0))
    (1.0, 255.0)
    >>> filled = np.zeros((4, 4, 3), np.uint16); filled[0] = 3800  # (brightfield, 3/4 black fill)
    >>> white_level(filled), white_level(np.where(dark > 50, 1000, 0).astype(np.uint16))
    (4095.0, 4095.0)
    >>> sparse = np.zeros((4, 4, 3), np.uint16); sparse[0, 0] = 9000  # (nuclei averaged down)
    >>> white_level(sparse), white_level(sparse, base_peak=40000), white_level(filled, base_peak=4095)
    (16383.0, 65535.0, 4095.0)
    """
    # (transparent: no ground, shown black)
    brightest = _brightest(overview)[_opaque(overview)]
    peak = float(brightest.max(initial=0))
    if overview.dtype.kind == "f" and peak <= 255.0:
        return 1.0 if peak <= 1.0 else 255.0
    top = max(int(peak), 1)
    bits = _bits_holding(top)
    # (RGB's black: an unscanned margin's fill; a grey channel's 0: its ground)
    ground = brightest[brightest > 0] if overview.shape[-1] >= 3 else brightest
    if ground.size and float(np.median(ground)) < top / 4:
        bits += 2  # (a dark ground: small bright objects average down in the overview)
    if base_peak is not None and overview.dtype.kind in "iu":
        bits = max(bits, _bits_holding(base_peak))
    return _camera_level(bits, overview.dtype)


def _bits_holding(value: float) -> int:
    """The fewest bits, at least 8, that hold ``value``."""
    return max(8, int(math.ceil(math.log2(max(int(value), 1) + 1))))


def _camera_level(bits: int, dtype: np.dtype[Any]) -> float:
    """``2**bits - 1`` for ``bits`` rounded up to an even number (a camera's
    depth: 8, 10, 12, ...), at most ``dtype``'s own bits (a signed type's
    leave its sign out: int16 holds at most 32767)."""
    own = 8 * dtype.itemsize - int(np.issubdtype(dtype, np.signedinteger))
    return float(2 ** min(bits + bits % 2, own) - 1)


def alpha_level(arr: np.ndarray) -> float:
    """The alpha value that is opaque in ``arr`` (its last band: grey +
    alpha, RGBA): 255 for uint8, 1.0 for floats; for integers wider than
    8 bits ``2**bits - 1`` for the fewest bits, rounded up to an even
    number (8, 10, 12, ...: a camera's depth), that hold its largest alpha,
    at most the samples' own.

    A 12-bit scan's alpha is stored 0-4095 as its colour is; taken over
    16 bits (65535 opaque) every opaque pixel was multiplied by 1/16. The
    colour's white level is no scale for it: it is two bits more on a dark
    fluorescence ground (a 12-bit alpha 4x short of opaque), and a 12-bit
    colour's alpha may be written at its container's full 65535 or at
    255. Its own largest value alone is none either: an image whose alpha
    is half throughout would read opaque.

    >>> a = np.zeros((1, 3, 4), np.uint16); a[0, :, 3] = 4095, 2048, 0
    >>> alpha_level(a), alpha_level(a[..., [0, 3]] * 16), alpha_level(a // 16)
    (4095.0, 65535.0, 255.0)
    >>> alpha_level(np.full((1, 1, 4), 1500, np.uint16)), alpha_level(a.astype(np.uint8))
    (4095.0, 255.0)
    """
    if not _wide_integers(arr):  # (uint8: 255)
        return float(np.iinfo(arr.dtype).max) if np.issubdtype(arr.dtype, np.integer) else 1.0
    return _camera_level(_bits_holding(arr[..., -1].max(initial=0)), arr.dtype)


def to_rgb_uint8(
    arr: np.ndarray,
    *,
    stretch: bool = False,
    white: float | None = None,
    alpha_white: float | None = None,
) -> np.ndarray:
    """Composite alpha over black, keep at most three channels, and scale to uint8 RGB.

    Transparent pixels (alpha 0) come out black, as large_image's own
    level reads make them (and :func:`~nucleus_models.wsi.tissue.tissue_mask`
    counts black as no tissue): the colour kept under them was analysed as
    tissue where a tile was read from the base layer. Alpha is scaled so
    that ``alpha_white`` (the slide's :attr:`Slide.alpha_white`) is opaque;
    without it by :func:`alpha_level` of ``arr``. Integer data wider
    than 8 bits, and floats, are scaled so that ``white`` (the slide's
    :attr:`Slide.white`) is 255; without it by a fixed rule (floats in [0, 1] x 255, 16-bit /
    257), so tiles of one slide stay comparable.  ``stretch=True`` (whole
    in-memory images such as 12-bit fluorescence in a 16-bit container)
    maps the image's 0.5th-99.9th percentiles to 0-255 instead.

    >>> px = np.array([[[200, 100, 150, 255], [200, 100, 150, 0]]], np.uint8)
    >>> to_rgb_uint8(px).tolist()
    [[[200, 100, 150], [0, 0, 0]]]
    >>> to_rgb_uint8(np.array([[[4095, 2048, 0]]], np.uint16), white=4095).tolist()
    [[[255, 128, 0]]]
    """
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] in (2, 4):  # grey + alpha, RGBA
        arr = _over_black(arr, alpha_white)
    if stretch and arr.dtype != np.uint8:
        x = arr.astype(np.float32)
        lo, hi = float(np.percentile(x, 0.5)), float(np.percentile(x, 99.9))
        arr = np.clip((x - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    if arr.shape[2] > 3:
        arr = arr[:, :, :3]
    if arr.dtype != np.uint8:
        wide = _needs_white(arr)
        arr = arr.astype(np.float64)
        if wide and white:
            arr = arr * (255.0 / white)
        elif np.issubdtype(arr.dtype, np.floating) and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        elif arr.max(initial=0) > 255:
            arr = arr / 257.0  # 16-bit
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr)


def _over_black(arr: np.ndarray, alpha_white: float | None = None) -> np.ndarray:
    """Colour (or grey) bands times alpha, the last band, over its full
    scale (255 for uint8, 1 for floats; for wider integers ``alpha_white``,
    else :func:`alpha_level` of ``arr``); alpha dropped. An image that is
    opaque throughout is returned as it is, less alpha."""
    colour, alpha = arr[:, :, :-1], arr[:, :, -1:]
    full = alpha_white if alpha_white and _wide_integers(arr) else alpha_level(arr)
    if alpha.size == 0 or alpha.min() >= full:
        return colour
    out = colour.astype(np.float32) * (np.minimum(alpha, full).astype(np.float32) / full)
    if np.issubdtype(arr.dtype, np.integer):
        return np.rint(out).astype(arr.dtype)
    return out.astype(arr.dtype)


def _slide_mpp(
    path: Path, meta: dict[str, Any], width: int, height: int
) -> tuple[float | None, str]:
    """The slide's own resolution and where from: large_image's (``mm_x``),
    else an OME-TIFF's OME-XML ``PhysicalSizeX`` (which the tiff and
    tifffile sources do not read), else the magnification's guess."""
    mpp, src = _mpp_from_metadata(meta)
    if src == "metadata":
        return mpp, src
    if (ome := _mpp_from_ome(path, width, height)) is not None:
        return ome, "ome-xml"
    return mpp, src


def _mpp_from_metadata(meta: dict[str, Any]) -> tuple[float | None, str]:
    mm_x = meta.get("mm_x")
    if mm_x:
        return float(mm_x) * 1000.0, "metadata"
    mag = meta.get("magnification")
    if mag:
        # The usual scanner convention: 40x ~ 0.25 um/px.
        return 10.0 / float(mag), "magnification"
    return None, "unknown"


#: micrometres per unit of an OME-XML length (its ``UnitsLength`` symbols;
#: the micro sign as U+00B5 or U+03BC, the angstrom as U+00C5 or U+212B)
_OME_UM_PER_UNIT = {
    "m": 1e6, "dm": 1e5, "cm": 1e4, "mm": 1e3, "\u00b5m": 1.0, "\u03bcm": 1.0, "um": 1.0,
    "nm": 1e-3, "pm": 1e-6, "\u00c5": 1e-4, "\u212b": 1e-4, "in": 25400.0, "thou": 25.4,
}  # fmt: skip


def _xml_tag(element: Any) -> str:
    return str(element.tag).rsplit("}", 1)[-1]


def _ome_pixels(path: Path, width: int | None = None, height: int | None = None) -> Any:
    """The OME-XML ``Pixels`` element of an OME-TIFF (that of the image of
    ``width`` x ``height`` px where several are described, else the first),
    or None for any other file."""
    import xml.etree.ElementTree as ET

    if (xml := _ome_xml(path)) is None:
        return None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    pixels = [e for e in root.iter() if _xml_tag(e) == "Pixels"]
    sized = [e for e in pixels if e.get("SizeX") == str(width) and e.get("SizeY") == str(height)]
    return next(iter(sized or pixels), None)


def _ome_xml(path: Path) -> str | None:
    """An OME-TIFF's OME-XML (None for any other file), read once per file version."""
    try:
        st = path.stat()
        return _read_ome_xml(str(path), st.st_mtime_ns, st.st_size)
    except OSError:
        return None


@lru_cache(maxsize=16)
def _read_ome_xml(path: str, mtime_ns: int, size: int) -> str | None:
    try:
        with open(path, "rb") as f:
            if f.read(4) not in _TIFF_MAGIC:
                return None
        import tifffile

        with tifffile.TiffFile(path) as tif:
            return tif.ome_metadata or None
    except Exception:  # (a TIFF tifffile cannot read: large_image says so)
        return None


def _mpp_from_ome(path: Path, width: int, height: int) -> float | None:
    """Microns per pixel from an OME-TIFF's ``PhysicalSizeX`` (else
    ``PhysicalSizeY``) in its unit (``PhysicalSizeXUnit``, µm by default),
    or None where there is none (or 0, or not a number, or in no unit of
    length: ``pixel``). A nonsense value is returned as it is, to be refused
    as any other slide's (:func:`~nucleus_models.detection.mpp_problem`)."""
    pixels = _ome_pixels(path, width, height)
    if pixels is None:
        return None
    for axis in "XY":
        raw = pixels.get(f"PhysicalSize{axis}")
        if raw is None:
            continue
        unit = (pixels.get(f"PhysicalSize{axis}Unit") or "\u00b5m").strip()
        try:
            value = float(raw)
        except ValueError:
            log.warning("%s: OME-XML PhysicalSize%s %r is not a number", path.name, axis, raw)
            return None
        if (factor := _OME_UM_PER_UNIT.get(unit)) is None:
            log.warning(
                "%s: OME-XML PhysicalSize%s is in %r, not a unit of length", path.name, axis, unit
            )
            return None
        return value * factor if value else None
    return None


#: channel names of a nuclear counterstain (DAPI, Hoechst 33342, DRAQ5,
#: imaging mass cytometry's DNA1): the frame read where none is given
NUCLEAR_CHANNEL = re.compile(r"dapi|hoechst|draq\s*[57]|(?<![a-z])dna\d*(?![a-z])", re.IGNORECASE)
#: the frames an error or warning lists at most
_LISTED_FRAMES = 24
#: a ``frame`` that is a frame's index, not a channel's name
FRAME_INDEX = re.compile(r"\+?\d+")


@dataclass(frozen=True)
class FrameChoice:
    """The frame of a slide a run reads (:func:`choose_frame`)."""

    #: large_image's frame index (0 for a plain slide)
    index: int
    #: its channel's name, where the slide names its channels
    channel: str | None
    #: the frames the slide has
    frames: int
    #: how it was chosen: ``"given"`` (by index or channel name), ``"nuclear
    #: channel"`` (the slide's one DAPI/Hoechst-like channel), ``"first"``
    #: (frame 0 of a multi-frame slide, nothing better known) or ``"only"``
    how: str
    #: a line for the log saying what a multi-frame slide's run reads
    note: str | None = None
    #: what the user should know (frame 0 taken for want of a better one)
    warning: str | None = None

    @property
    def read_frame(self) -> int | None:
        """The frame to read (:attr:`Slide.frame`): None for a plain slide,
        large_image's default read as before."""
        return self.index if self.frames > 1 else None

    def record(self) -> dict[str, Any]:
        """The provenance entry: ``index``, ``channel``, ``frames``, ``chosen``."""
        return {
            "index": self.index,
            "channel": self.channel,
            "frames": self.frames,
            "chosen": self.how,
        }

    def describe(self) -> str:
        """``frame 1 (DAPI)``, or ``frame 2`` where channels have no names
        (a multi-frame slide's)."""
        return f"frame {frame_label(self.record())}"


def frame_label(record: Any) -> str:
    """A provenance's ``slide.frame`` (:meth:`FrameChoice.record`) as ``1
    (DAPI)``, or ``2`` where channels have no names; "" for a plain slide's
    or where none is recorded.

    >>> frame_label({"index": 1, "channel": "DAPI", "frames": 3}), frame_label(
    ...     {"index": 2, "channel": None, "frames": 3})
    ('1 (DAPI)', '2')
    >>> frame_label({"index": 0, "channel": None, "frames": 1}), frame_label(None)
    ('', '')
    """
    if not isinstance(record, dict) or not isinstance(record.get("frames"), int):
        return ""
    if record["frames"] <= 1:
        return ""
    return f"{record.get('index')}" + (f" ({record['channel']})" if record.get("channel") else "")


def frame_channels(slide: Slide) -> list[str | None]:
    """The channel name of each of the slide's frames (None where unknown):
    from large_image's metadata (``channels`` and each frame's ``IndexC``,
    or a frame's ``Channel``), else from an OME-TIFF's OME-XML (its
    ``Channel`` names, which the tiff and tifffile sources do not read),
    placed by the frames' ``IndexC`` or the XML's ``DimensionOrder``."""
    frames = slide.metadata.get("frames") or [{}]  # (large_image lists a plain slide's none)
    n = len(frames)
    names = slide.metadata.get("channels")
    out: list[str | None] = [None] * n
    if isinstance(names, list) and names:
        for i, f in enumerate(frames):
            c = f.get("IndexC", i if len(names) == n else None)
            if isinstance(c, int) and 0 <= c < len(names):
                out[i] = str(names[c])
    for i, f in enumerate(frames):
        if out[i] is None and f.get("Channel"):
            out[i] = str(f["Channel"])
    if not any(out):
        out = _ome_channels(Path(slide.path), frames, slide.width, slide.height) or out
    return out


def _ome_channels(
    path: Path, frames: list[dict[str, Any]], width: int | None = None, height: int | None = None
) -> list[str | None] | None:
    """Each frame's channel name from an OME-TIFF's OME-XML (that of the
    image of ``width`` x ``height`` px where it describes several), or None."""
    pixels = _ome_pixels(path, width, height)
    if pixels is None:
        return None
    names = [c.get("Name") for c in pixels if c.tag.rsplit("}", 1)[-1] == "Channel"]
    try:
        sizes = {d: int(pixels.get(f"Size{d}", "1")) for d in "CZT"}
    except ValueError:
        return None
    if not any(names) or len(names) != sizes["C"]:
        return None
    order = (pixels.get("DimensionOrder") or "XYCZT").upper()[2:]
    stride = 1
    for d in order[: max(order.find("C"), 0)]:  # (the dimensions that vary faster than C)
        stride *= sizes.get(d, 1)
    out: list[str | None] = []
    for i, frame in enumerate(frames):
        c = frame.get("IndexC")
        if not isinstance(c, int):
            if len(frames) != sizes["C"] * sizes["Z"] * sizes["T"]:
                return None
            c = (i // stride) % sizes["C"]
        out.append(names[c] if 0 <= c < len(names) and names[c] else None)
    return out


def _frame_listing(names: list[str | None]) -> str:
    """``3 frames: 0 CD3, 1 DAPI, 2 CK`` (at most :data:`_LISTED_FRAMES`),
    or ``5 frames (0-4; no channel names)``."""
    n = len(names)
    if n == 1:
        return "1 frame (0)"
    if not any(names):
        return f"{n} frames (0-{n - 1}; no channel names)"
    shown = ", ".join(f"{i} {nm or '(unnamed)'}" for i, nm in enumerate(names[:_LISTED_FRAMES]))
    return f"{n} frames: {shown}" + (
        f", ... ({n - _LISTED_FRAMES} more)" if n > _LISTED_FRAMES else ""
    )


def choose_frame(slide: Slide, frame: str | int | None = "") -> FrameChoice:
    """The frame of ``slide`` to analyse: ``frame`` an index (``"2"``) or a
    channel name (``"dapi"``, any case; the first frame of that channel);
    empty (or ``-1``) for the slide's only frame or, on a multi-frame slide
    (multiplex fluorescence, a z-stack), its one channel named as a nuclear
    stain (:data:`NUCLEAR_CHANNEL`: DAPI, Hoechst, ...), else frame 0 with a
    warning that lists the frames and names the parameter.

    Raises
    ------
    ParameterError
        An index out of range or a name no channel has (one line, listing
        the slide's frames).
    """
    from ..errors import ParameterError

    text = "" if frame is None else str(frame).strip()
    n = slide.frame_count
    # (a single-frame slide's channel name only where one is asked for: a
    # single-channel DAPI OME-TIFF has the channel "DAPI")
    asked = bool(text) and text != "-1" and not FRAME_INDEX.fullmatch(text)
    names: list[str | None] = frame_channels(slide) if n > 1 or asked else [None]
    file = Path(slide.path).name
    if text and text != "-1":
        if FRAME_INDEX.fullmatch(text):
            index = int(text)
            if index >= n:
                raise ParameterError(
                    f"frame {text} is out of range: {file} has {_frame_listing(names)}"
                )
        else:
            hits = [i for i, nm in enumerate(names) if nm and nm.casefold() == text.casefold()]
            if not hits:
                raise ParameterError(
                    f"frame {text!r}: {file} has no channel of that name; it has "
                    f"{_frame_listing(names)} (give a channel's name or a frame's index)"
                )
            index = hits[0]
        how = "given"
    elif n == 1:
        return FrameChoice(0, None, 1, "only")
    else:
        nuclear = [i for i, nm in enumerate(names) if nm and NUCLEAR_CHANNEL.search(nm)]
        one = len({str(names[i]).casefold() for i in nuclear}) == 1
        index, how = (nuclear[0], "nuclear channel") if one else (0, "first")
    choice = FrameChoice(index, names[index], n, how)
    if n == 1:
        return choice
    note = f"analysing {choice.describe()} of {n} frames"
    if how == "nuclear channel":
        note += (
            ", the slide's nuclear-stain channel (--frame, 'Frame' in HistomicsUI, picks another)"
        )
    warning = None
    if how == "first":
        why = (
            f"several are nuclear stains ({', '.join(str(names[i]) for i in nuclear)})"
            if nuclear
            else "none is named as a nuclear stain (DAPI, Hoechst)"
        )
        warning = (
            f"{file} has {_frame_listing(names)}; {why}: analysing {choice.describe()}; choose"
            " the nuclei's frame with --frame, an index or a channel name ('Frame' in HistomicsUI)"
        )
    return dataclasses.replace(choice, note=note, warning=warning)


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _ifd_chain_end(path: Path, size: int, max_ifds: int = 10000) -> int | None:
    """Walk the TIFF directory chain; return the first offset past the end of file, if any."""
    import struct

    with open(path, "rb") as f:
        head = f.read(16)
        endian = "<" if head[:2] == b"II" else ">"
        big = struct.unpack(endian + "H", head[2:4])[0] == 43
        off = (
            struct.unpack(endian + "Q", head[8:16])[0]
            if big
            else struct.unpack(endian + "I", head[4:8])[0]
        )
        count_fmt, count_len, entry_len, next_fmt, next_len = (
            ("Q", 8, 20, "Q", 8) if big else ("H", 2, 12, "I", 4)
        )
        seen: set[int] = set()
        while off and len(seen) < max_ifds:
            if off in seen:
                return None  # a loop: leave it to the reader
            seen.add(off)
            if off + count_len > size:
                return off
            f.seek(off)
            n = struct.unpack(endian + count_fmt, f.read(count_len))[0]
            nxt = off + count_len + n * entry_len
            if nxt + next_len > size:
                return nxt
            f.seek(nxt)
            off = struct.unpack(endian + next_fmt, f.read(next_len))[0]
    return None


def check_tiff_integrity(path: Path) -> None:
    """Raise ``SlideError`` if a TIFF-family file (SVS, NDPI, TIFF) is truncated.

    Readers often open a truncated slide happily and return blank tiles for
    the missing bytes; here every strip/tile of every page must lie inside
    the file.
    """
    with open(path, "rb") as f:
        if f.read(4) not in _TIFF_MAGIC:
            return
    import tifffile

    logging.getLogger("tifffile").setLevel(logging.CRITICAL)
    size = path.stat().st_size
    end = _ifd_chain_end(path, size)
    if end is not None:
        raise SlideError(
            f"{path.name}: file is truncated (a directory lies at byte {end}, the file has {size} bytes)"
        )
    try:
        with tifffile.TiffFile(str(path)) as tif:
            for page in tif.pages:
                offsets = np.asarray(page.dataoffsets, dtype=np.int64)  # type: ignore[union-attr]
                counts = np.asarray(page.databytecounts, dtype=np.int64)  # type: ignore[union-attr]
                if len(offsets) and int((offsets + counts).max()) > size:
                    raise SlideError(
                        f"{path.name}: file is truncated (image data extends to byte "
                        f"{int((offsets + counts).max())}, the file has {size} bytes)"
                    )
    except SlideError:
        raise
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SlideError(f"{path.name}: damaged TIFF structure: {msg}") from exc


def _plain_image_problem(path: Path, li: Any) -> str | None:
    """Why large_image would not open a plain (untiled, non-TIFF) image such
    as a PNG or JPEG larger than the size its PIL source reads whole
    (``max_small_image_size``, 4096 px): too large, or, when its data is cut
    short or damaged, corrupt (only the header was read, so a truncated
    upload was called too large, and converting it fails too); None for any
    other file. A PNG's chunks are checked against their checksums (not
    decompressed); a baseline JPEG is decoded at 1/8 scale (its DCT's cheap
    draft, a row of blocks at a time); a progressive one only checked to end
    as a JPEG does: libjpeg holds all of a progressive image's coefficients
    however small the draft (~3 bytes a pixel: 342 MB, 1.5 s for 10000 x
    10000 px; ~11 GB for 60000 x 60000, killed or 'Insufficient memory'
    called corrupt, where it is a sound image that is too large)."""
    from PIL import Image

    limit = int(li.config.getConfig("max_small_image_size", 4096))
    bomb = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # the header, then the data at most at 1/8 scale
    try:
        with Image.open(path) as im:
            fmt, (w, h) = im.format, im.size
            if fmt == "TIFF" or max(w, h) <= limit:
                return None
            try:
                if fmt == "PNG":
                    im.verify()
                elif fmt == "JPEG" and im.info.get("progressive"):
                    _check_jpeg_end(path)
                elif fmt == "JPEG":
                    im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
                    im.load()
            except Exception as exc:
                msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                return (
                    f"{path.name}: cannot open as a slide or image (corrupt: a {fmt} image of"
                    f" {w}x{h} px whose data is cut short or damaged): {msg}"
                )
    except Exception:
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = bomb
    return (
        f"{path.name}: a plain {fmt} image of {w}x{h} px is larger than the {limit} px "
        "large_image reads whole; save it as a tiled, pyramidal TIFF (e.g. with vips "
        "tiffsave --tile --pyramid) and run on that"
    )


def _check_jpeg_end(path: Path) -> None:
    """Raise OSError where a JPEG file does not end with its end-of-image
    marker (FF D9; a padding of zeros or a newline after it allowed): cut
    short."""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 64))
        tail = f.read().rstrip(b"\0\r\n")
    if not tail.endswith(b"\xff\xd9"):
        raise OSError("no end-of-image marker: the file is cut short")


def open_slide(path: str | os.PathLike[str], *, input_mpp: float | None = None) -> Slide:
    """Open a slide (SVS, NDPI, pyramidal or plain TIFF, PNG, JPEG).

    Parameters
    ----------
    path : path-like
        The image file.
    input_mpp : float, optional
        Microns per base pixel; overrides the metadata (needed for images
        that carry no resolution, like plain TIFF/PNG). ``None`` or ``<= 0``
        means "use the metadata".

    Raises
    ------
    SlideError
        Missing, unreadable or corrupt file.
    """
    if not str(path).strip():  # (Path("") is ".", a folder: "not a file: .")
        raise SlideError("the input image's path is empty: name the slide or image to analyse")
    p = Path(path)
    if not p.exists():
        raise SlideError(f"slide not found: {p}")
    if not p.is_file():
        raise SlideError(f"not a file: {p}")
    if p.stat().st_size == 0:
        raise SlideError(f"{p.name}: empty file")
    check_tiff_integrity(p)
    li = _large_image()
    try:
        source = li.open(str(p))
        meta = source.getMetadata()
    except Exception as exc:
        if problem := _plain_image_problem(p, li):
            raise SlideError(problem) from exc
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SlideError(
            f"{p.name}: cannot open as a slide or image (unsupported or corrupt): {msg}"
        ) from exc
    width, height = int(meta.get("sizeX") or 0), int(meta.get("sizeY") or 0)
    if width <= 0 or height <= 0:
        raise SlideError(f"{p.name}: image has no pixels")
    mpp: float | None
    if input_mpp is not None and input_mpp > 0:
        mpp, src = float(input_mpp), "override"
    else:
        mpp, src = _slide_mpp(p, meta, width, height)
    log.info("opened %s: %dx%d, mpp=%s (%s)", p.name, width, height, mpp, src)
    return Slide(
        path=str(p),
        width=width,
        height=height,
        mpp=mpp,
        mpp_source=src,
        source=source,
        metadata=meta,
    )
