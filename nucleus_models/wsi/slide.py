"""Opening slides with large_image, and their resolution.

This package is the only place in the project that imports ``large_image``.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SlideError

__all__ = ["Slide", "level_multiple", "open_slide", "to_rgb_uint8"]

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
        Where ``mpp`` came from: ``"metadata"``, ``"magnification"`` or ``"override"``.
    """

    path: str
    width: int
    height: int
    mpp: float | None
    mpp_source: str
    source: Any
    metadata: dict[str, Any]

    def require_mpp(self) -> float:
        """Return the resolution or raise a clear error if it is unknown."""
        if self.mpp is None:
            raise SlideError(
                f"{Path(self.path).name}: resolution unknown (no microns-per-pixel or "
                "magnification in its metadata); pass --input_mpp, the microns per base pixel "
                "('Input resolution (um/px)' in HistomicsUI)"
            )
        return self.mpp

    def metadata_mpp(self) -> tuple[float | None, str]:
        """The resolution the slide's own metadata gives and where from
        (``"metadata"``, ``"magnification"`` or ``"unknown"``), even where
        ``input_mpp`` overrides it."""
        return _mpp_from_metadata(self.metadata)

    def read_region(
        self, x: int, y: int, w: int, h: int, *, out_w: int | None = None, out_h: int | None = None
    ) -> np.ndarray:
        """Read base-pixel region ``(x, y, w, h)`` resampled to ``out_w x out_h``.

        Returns an ``(out_h, out_w, C)`` uint8 array (RGB for colour slides,
        one channel repeated to three for single-channel images).
        """
        import cv2

        out_w = w if out_w is None else out_w
        out_h = h if out_h is None else out_h
        li = _large_image()
        region = {"left": x, "top": y, "width": w, "height": h, "units": "base_pixels"}
        # Shrinking by less than 2x, the base layer is the one large_image
        # would read: read it as it is and shrink it with OpenCV's INTER_AREA,
        # as the training and evaluation images are (large_image's Lanczos
        # took ~75 of the ~90 ms a 1792-px 40x tile took to read at 0.4 um/px);
        # from 2x on, large_image reads a coarser layer
        # (level_multiple: which region a level read reads exactly)
        level_read = _shrink(w, h, out_w, out_h) >= LEVEL_READ_SHRINK
        output = {"output": {"maxWidth": out_w, "maxHeight": out_h}} if level_read else {}
        try:
            arr, _ = self.source.getRegion(
                region=region, format=li.constants.TILE_FORMAT_NUMPY, **output
            )
        except Exception as exc:  # large_image / openslide / tifffile errors
            raise SlideError(
                f"{Path(self.path).name}: cannot read region {x},{y},{w},{h} "
                f"(file truncated or corrupt?): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from exc
        arr = to_rgb_uint8(np.asarray(arr))
        if arr.shape[0] != out_h or arr.shape[1] != out_w:
            interp = cv2.INTER_AREA if arr.shape[1] > out_w else cv2.INTER_LINEAR
            arr = cv2.resize(arr, (out_w, out_h), interpolation=interp)
            if arr.ndim == 2:
                arr = arr[:, :, None]
        return arr

    def thumbnail(self, max_size: int = 2048) -> tuple[np.ndarray, float]:
        """Return ``(image, scale)`` with ``scale`` = thumbnail pixels per base pixel."""
        scale = min(1.0, max_size / max(self.width, self.height))
        out_w = max(1, int(round(self.width * scale)))
        out_h = max(1, int(round(self.height * scale)))
        img = self.read_region(0, 0, self.width, self.height, out_w=out_w, out_h=out_h)
        return img, out_w / self.width


def to_rgb_uint8(arr: np.ndarray, *, stretch: bool = False) -> np.ndarray:
    """Drop alpha, keep at most three channels, and scale to uint8 RGB.

    Non-uint8 data is scaled by a fixed rule (floats in [0, 1] x 255, 16-bit
    / 257), so tiles of one slide stay comparable.  ``stretch=True`` (whole
    in-memory images such as 12-bit fluorescence in a 16-bit container)
    maps the image's 0.5th-99.9th percentiles to 0-255 instead.
    """
    if stretch and arr.dtype != np.uint8:
        x = arr.astype(np.float32)
        lo, hi = float(np.percentile(x, 0.5)), float(np.percentile(x, 99.9))
        arr = np.clip((x - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] == 4:
        arr = arr[:, :, :3]
    elif arr.shape[2] == 2:  # grey + alpha
        arr = arr[:, :, :1]
    elif arr.shape[2] > 4:
        arr = arr[:, :, :3]
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        if np.issubdtype(arr.dtype, np.floating) and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        elif arr.max(initial=0) > 255:
            arr = arr / 257.0  # 16-bit
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr)


def _mpp_from_metadata(meta: dict[str, Any]) -> tuple[float | None, str]:
    mm_x = meta.get("mm_x")
    if mm_x:
        return float(mm_x) * 1000.0, "metadata"
    mag = meta.get("magnification")
    if mag:
        # The usual scanner convention: 40x ~ 0.25 um/px.
        return 10.0 / float(mag), "magnification"
    return None, "unknown"


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


def _too_large_plain_image(path: Path, li: Any) -> str | None:
    """Why large_image would not open a plain (untiled, non-TIFF) image such
    as a PNG or JPEG: larger than the size its PIL source reads whole
    (``max_small_image_size``, 4096 px); None for any other file."""
    from PIL import Image

    limit = int(li.config.getConfig("max_small_image_size", 4096))
    bomb = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # only the header is read
    try:
        with Image.open(path) as im:
            fmt, (w, h) = im.format, im.size
    except Exception:
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = bomb
    if fmt == "TIFF" or max(w, h) <= limit:
        return None
    return (
        f"{path.name}: a plain {fmt} image of {w}x{h} px is larger than the {limit} px "
        "large_image reads whole; save it as a tiled, pyramidal TIFF (e.g. with vips "
        "tiffsave --tile --pyramid) and run on that"
    )


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
        if too_large := _too_large_plain_image(p, li):
            raise SlideError(too_large) from exc
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
        mpp, src = _mpp_from_metadata(meta)
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
