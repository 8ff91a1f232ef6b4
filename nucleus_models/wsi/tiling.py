"""Pure tiling functions: analysis regions, tile grids with overlap, seam rules.

Coordinates here are *analysis pixels* (the model's resolution) unless a
name says ``base``.  A tile has a *core* (the cells of a partition of the
analysis region) and a *read* window (core grown by ``overlap`` on every
side, clipped to the image).  A nucleus is reported by the one tile whose
core holds its centroid; with ``overlap`` larger than the biggest nucleus,
every nucleus lies whole inside the read window of that tile, so none is cut
at a seam. Two tiles see a nucleus on their seam with different context
(and, on a resampled slide, different pixels), so they can outline it
slightly differently, each with its centroid in its own core:
:func:`seam_duplicates` finds such pairs, so it is reported once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ParameterError

__all__ = [
    "Tile",
    "Region",
    "parse_roi",
    "polygon_geometry",
    "tile_grid",
    "in_core",
    "seam_duplicates",
    "polygon_share",
]

#: the share of the smaller of two nuclei from different tiles that the
#: other must cover for them to be one nucleus seen twice (distinct touching
#: nuclei from two tiles overlap by a sliver: at most 0.3 of the smaller on a
#: 6 x 6 MoNuSeg mosaic at 2.5x shrink, where the seam duplicates share 0.65-0.99)
SEAM_DUPLICATE_OVERLAP = 0.5


@dataclass(frozen=True)
class Tile:
    """One tile of the grid (analysis pixels; ``x1``/``y1`` exclusive)."""

    index: int
    core: tuple[int, int, int, int]
    read: tuple[int, int, int, int]

    @property
    def read_size(self) -> tuple[int, int]:
        """``(width, height)`` of the read window."""
        return self.read[2] - self.read[0], self.read[3] - self.read[1]


@dataclass(frozen=True)
class Region:
    """Analysis region in base pixels: a rectangle and optional polygons.

    ``polygons`` are lists of ``(K, 2)`` x, y arrays in base pixels; the
    rectangle is then their bounding box.
    """

    left: int
    top: int
    width: int
    height: int
    polygons: tuple[np.ndarray, ...] = ()

    @property
    def is_whole(self) -> bool:
        """True when no ROI was given (the whole slide)."""
        return self.width < 0

    def as_list(self) -> list[int]:
        """``[left, top, width, height]``."""
        return [self.left, self.top, self.width, self.height]


def polygon_geometry(vertices: np.ndarray) -> Any:
    """A shapely geometry of ``(K, 2)`` vertices; a self-crossing outline
    becomes the valid (Multi)Polygon of its lobes, read even-odd as
    :func:`skimage.draw.polygon` fills it."""
    import shapely

    return shapely.make_valid(shapely.Polygon(vertices))


def roi_geometry(polygons: Sequence[np.ndarray]) -> Any:
    """The area an ROI's polygons cover: the union of their
    :func:`polygon_geometry` (overlaps once); what NucleusDetection keeps
    nuclei in and ``nucleus-bench speed`` counts the megapixels of."""
    import shapely

    return shapely.union_all([polygon_geometry(p) for p in polygons])


#: what HistomicsUI's region widget puts in front of a shape drawn with
#: "Add polygon" / "Add rectangle" while the region is still the whole slide:
#: large_image's ``_mergeRegions`` never recognises ``-1,-1,-1,-1`` (it
#: compares the array by identity), so it merges it as a rectangle at
#: (-1, -1) of size -1 x -1, its four corners, then the ``-1,-1`` separator
UNSET_REGION_MERGED = (-1.0, -1.0, -2.0, -1.0, -2.0, -2.0, -1.0, -2.0, -1.0, -1.0)


def parse_roi(values: Sequence[float] | str | None) -> Region:
    """Parse an ``analysis_roi`` value as HistomicsTK's CLIs accept it.

    ``-1,-1,-1,-1`` (or empty) is the whole slide; four numbers are
    ``left, top, width, height`` in base pixels; six are a rectangle given by
    centre and half-size ``x, y, z, rx, ry, rz``; eight or more (an even
    count) are polygon vertices ``x1, y1, x2, y2, ...``, several polygons
    separated by a ``-1, -1`` pair.

    >>> parse_roi("-1,-1,-1,-1").is_whole
    True
    >>> parse_roi([10, 20, 30, 40]).as_list()
    [10, 20, 30, 40]
    >>> parse_roi("0,0, 100,0, 100,50, 0,50").as_list()
    [0, 0, 101, 51]

    HistomicsUI's "Add polygon" on a region that is still the whole slide
    sends :data:`UNSET_REGION_MERGED` before the drawn shape; that prefix
    is dropped (it had made the region the box from (-2, -2) to the shape):

    >>> parse_roi("-1,-1,-2,-1,-2,-2,-1,-2,-1,-1, 600,600,800,600,800,800,600,800").as_list()
    [600, 600, 201, 201]

    What follows it are vertices, a triangle's six numbers too (not a
    centre and half-size):

    >>> parse_roi("-1,-1,-2,-1,-2,-2,-1,-2,-1,-1, 600,600,800,600,700,800").as_list()
    [600, 600, 201, 201]
    """
    if values is None:
        return Region(-1, -1, -1, -1)
    if isinstance(values, str):
        parts = [v for v in values.replace(" ", "").split(",") if v != ""]
        try:
            vals = [float(v) for v in parts]
        except ValueError:
            raise ParameterError(
                f"analysis_roi must be numbers separated by commas, got {values!r}"
            ) from None
    else:
        vals = [float(v) for v in values]
    if not all(math.isfinite(v) for v in vals):
        raise ParameterError(f"analysis_roi must be finite numbers, got {values!r}")
    n = len(UNSET_REGION_MERGED)
    merged = False  # (what follows the prefix is a drawn shape's vertices: a triangle's are six)
    while len(vals) > n and tuple(vals[:n]) == UNSET_REGION_MERGED:
        vals, merged = vals[n:], True
    if not vals or (len(vals) == 4 and all(v == -1 for v in vals) and not merged):
        return Region(-1, -1, -1, -1)
    if len(vals) == 6 and not merged:
        x, y, _, rx, ry, _ = vals
        vals = [x - rx, y - ry, 2 * rx, 2 * ry]
    if len(vals) == 4 and not merged:
        left, top, width, height = (int(round(v)) for v in vals)
        if width <= 0 or height <= 0:
            raise ParameterError(f"analysis_roi width and height must be positive, got {vals}")
        return Region(left, top, width, height)
    if len(vals) < (6 if merged else 8) or len(vals) % 2:
        raise ParameterError(
            "analysis_roi must be -1,-1,-1,-1 (the whole slide), left,top,width,height, "
            "x,y,z,rx,ry,rz (centre and half-size), or polygon vertices x1,y1,x2,y2,... "
            f"(four vertices or more); got {len(vals)} numbers"
        )
    pts = np.asarray(vals, dtype=np.float64).reshape(-1, 2)
    polys: list[np.ndarray] = []
    current: list[np.ndarray] = []
    for p in [*pts, np.array([-1.0, -1.0])]:
        if p[0] == -1 and p[1] == -1:
            if len(current) > 1 and np.array_equal(current[0], current[-1]):
                current.pop()
            if len(current) >= 3:
                poly = np.array(current)
                # a stroke that crossed itself counts as its lobes (a bow-tie's
                # signed area is 0, yet it encloses two triangles)
                if polygon_geometry(poly).area == 0:
                    raise ParameterError(
                        f"analysis_roi polygon encloses no area (e.g. its vertices lie on a line): {vals}"
                    )
                polys.append(poly)
            current = []
        elif not current or not np.array_equal(p, current[-1]):
            current.append(p)
    if not polys:
        raise ParameterError("analysis_roi polygon needs at least three distinct vertices")
    allp = np.concatenate(polys)
    x0, y0 = np.floor(allp.min(axis=0)).astype(int)
    x1, y1 = np.floor(allp.max(axis=0)).astype(int) + 1
    return Region(int(x0), int(y0), int(x1 - x0), int(y1 - y0), tuple(polys))


def clip_region(region: Region, width: int, height: int) -> Region:
    """Clip a region to a ``width x height`` slide; whole-slide becomes explicit.

    Raises
    ------
    ParameterError
        If the region does not overlap the slide.
    """
    if region.is_whole:
        return Region(0, 0, width, height)
    x0, y0 = max(region.left, 0), max(region.top, 0)
    x1 = min(region.left + region.width, width)
    y1 = min(region.top + region.height, height)
    if x1 <= x0 or y1 <= y0:
        raise ParameterError(
            f"analysis_roi {region.as_list()} lies outside the slide ({width}x{height} base pixels)"
        )
    return Region(x0, y0, x1 - x0, y1 - y0, region.polygons)


def tile_grid(
    bounds: tuple[int, int, int, int],
    *,
    tile_size: int,
    overlap: int,
    image_size: tuple[int, int] | None = None,
) -> list[Tile]:
    """Cover ``bounds`` = ``(x0, y0, x1, y1)`` with tiles.

    Cores are ``tile_size`` squares (smaller at the far edges) that partition
    ``bounds``; each read window is the core grown by ``overlap`` pixels on
    every side and clipped to ``image_size`` (``(width, height)``, default:
    the bounds themselves).

    >>> [t.core for t in tile_grid((0, 0, 10, 4), tile_size=6, overlap=2)]
    [(0, 0, 6, 4), (6, 0, 10, 4)]
    >>> [t.read for t in tile_grid((0, 0, 10, 4), tile_size=6, overlap=2)]
    [(0, 0, 8, 4), (4, 0, 10, 4)]
    """
    if tile_size <= 0:
        raise ParameterError(f"tile size must be positive, got {tile_size}")
    if overlap < 0:
        raise ParameterError(f"tile overlap must be >= 0, got {overlap}")
    if tile_size <= overlap:
        raise ParameterError(
            f"tile size ({tile_size}) must be larger than the tile overlap ({overlap})"
        )
    x0, y0, x1, y1 = bounds
    if x1 <= x0 or y1 <= y0:
        return []
    W, H = image_size if image_size is not None else (x1, y1)
    lo_x, lo_y = (0, 0) if image_size is not None else (x0, y0)
    tiles: list[Tile] = []
    nx = math.ceil((x1 - x0) / tile_size)
    ny = math.ceil((y1 - y0) / tile_size)
    for j in range(ny):
        cy0 = y0 + j * tile_size
        cy1 = min(cy0 + tile_size, y1)
        for i in range(nx):
            cx0 = x0 + i * tile_size
            cx1 = min(cx0 + tile_size, x1)
            read = (
                max(cx0 - overlap, lo_x),
                max(cy0 - overlap, lo_y),
                min(cx1 + overlap, W),
                min(cy1 + overlap, H),
            )
            tiles.append(Tile(len(tiles), (cx0, cy0, cx1, cy1), read))
    return tiles


def in_core(points: np.ndarray, core: tuple[float, float, float, float]) -> np.ndarray:
    """Boolean mask of ``(N, 2)`` x, y points inside the half-open core box.

    Half-open intervals make the cores a partition: a centroid on a shared
    edge belongs to exactly one tile.

    >>> in_core(np.array([[0, 0], [6, 1], [5.9, 3.9]]), (0, 0, 6, 4)).tolist()
    [True, False, True]
    """
    x, y = points[:, 0], points[:, 1]
    return (x >= core[0]) & (x < core[2]) & (y >= core[1]) & (y < core[3])


def polygon_share(
    polygon: Callable[[int], np.ndarray],
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """For :func:`seam_duplicates`: the share of the smaller of nuclei
    ``a[k]`` and ``b[k]`` that the other covers, from their outlines
    (``polygon(i)``: nucleus ``i``'s ``(K, 2)`` vertices)."""
    import shapely

    def share(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        shape = {}
        for i in np.unique(np.concatenate([a, b])):
            xy = np.asarray(polygon(int(i)), np.float64)
            shape[int(i)] = shapely.make_valid(shapely.Polygon(xy if len(xy) >= 3 else None))
        ga = np.array([shape[int(i)] for i in a])
        gb = np.array([shape[int(i)] for i in b])
        smaller = np.minimum(shapely.area(ga), shapely.area(gb))
        return np.asarray(shapely.area(shapely.intersection(ga, gb)) / np.maximum(smaller, 1e-12))

    return share


def seam_duplicates(
    centroids: np.ndarray,
    boxes: np.ndarray,
    cores: Sequence[tuple[int, int, int, int]],
    share: Callable[[np.ndarray, np.ndarray], np.ndarray],
    *,
    min_overlap: float = SEAM_DUPLICATE_OVERLAP,
) -> np.ndarray:
    """Boolean mask of the nuclei to drop as a second sighting of a nucleus
    another tile reports too.

    ``centroids`` ``(N, 2)`` and ``boxes`` ``(N, 4)`` are in the cores' pixels
    (analysis pixels), each nucleus kept by the tile whose core holds its
    centroid; ``share(a, b)`` gives, for index arrays, the share of the
    smaller of nuclei ``a[k]`` and ``b[k]`` that the other covers (from
    their outlines, :func:`polygon_share`, or their pixels). Two nuclei of
    different tiles are one when that is ``min_overlap`` or more (nuclei of
    one tile never overlap). The sightings are taken deepest first (the
    centroid deepest inside its own core: its tile saw the nucleus with
    most context round it; a tie, the earlier one), each kept unless one of
    the same nucleus is kept already. So of three or four sightings at a
    corner the deepest is left, and a sighting dropped drops no other (one
    tile's blob over two touching nuclei that the other tile outlined
    apart: the blob goes, or both of the two do, never one of each).

    Only nuclei whose box comes within ``pad`` of their own core's edge are
    compared, where ``pad`` is the farthest any box reaches out of its own
    core: of two overlapping nuclei at least one reaches out of its core
    (cores are disjoint), by at most ``pad``, into the other's core or
    beside it, so the other's box comes within ``pad`` of its core's edge.

    >>> sq = np.array([[0, 0], [4, 0], [4, 4], [0, 4]], float)
    >>> polys = [sq + (8, 2), sq + (8.2, 2), sq + (12, 2)]  # one nucleus twice, one beside
    >>> cent = np.array([[9.8, 4], [10.1, 4], [14, 4]])  # the second nearer the seam
    >>> boxes = np.array([[8, 2, 12, 6], [8.2, 2, 12.2, 6], [12, 2, 16, 6]])
    >>> cores = [(0, 0, 10, 10), (10, 0, 20, 10)]
    >>> seam_duplicates(cent, boxes, cores, polygon_share(polys.__getitem__)).tolist()
    [False, True, False]
    """
    import shapely

    n = len(centroids)
    drop = np.zeros(n, bool)
    if n < 2 or len(cores) < 2:
        return drop
    c = np.asarray(cores, np.float64)
    xs = np.unique(c[:, [0, 2]])
    ys = np.unique(c[:, [1, 3]])
    # each nucleus's cell of the grid of cores: its own core's edges
    col = np.clip(np.searchsorted(xs, centroids[:, 0], side="right") - 1, 0, len(xs) - 2)
    row = np.clip(np.searchsorted(ys, centroids[:, 1], side="right") - 1, 0, len(ys) - 2)
    x0, x1, y0, y1 = xs[col], xs[col + 1], ys[row], ys[row + 1]

    def inside(left: np.ndarray, top: np.ndarray, right: np.ndarray, bottom: np.ndarray) -> Any:
        """How far a box (or point) lies inside its own core from the
        nearest edge with a neighbour beyond it (< 0: out of the core)."""
        return np.stack(
            [
                np.where(x0 > xs[0], left - x0, np.inf),
                np.where(y0 > ys[0], top - y0, np.inf),
                np.where(x1 < xs[-1], x1 - right, np.inf),
                np.where(y1 < ys[-1], y1 - bottom, np.inf),
            ]
        ).min(axis=0)

    reach = inside(*boxes.T)
    pad = max(0.0, -float(reach.min()))
    if pad == 0:
        return drop
    near = np.flatnonzero(reach <= pad)
    if len(near) < 2:
        return drop
    rects = shapely.box(*boxes[near].T)
    a, b = shapely.STRtree(rects).query(rects, predicate="intersects")
    a, b = near[a], near[b]
    pair = (a < b) & ((col[a] != col[b]) | (row[a] != row[b]))
    a, b = a[pair], b[pair]
    if not len(a):
        return drop
    shared = share(a, b)
    same = shared >= min_overlap
    a, b, shared = a[same], b[same], shared[same]

    deep = inside(*centroids.T, *centroids.T)
    # deepest first (a tie: the earlier one), each kept unless a sighting of
    # the same nucleus is kept already: a sighting dropped does not drop
    # others (one tile's blob of two touching nuclei, the other's two apart,
    # the blob between them in depth: both of the two stay, not one)
    partners: dict[int, list[int]] = {}
    for i, j in zip(a.tolist(), b.tolist(), strict=True):
        partners.setdefault(i, []).append(j)
        partners.setdefault(j, []).append(i)
    kept = np.zeros(n, bool)
    for i in sorted(partners, key=lambda k: (-float(deep[k]), k)):
        if any(kept[p] for p in partners[i]):
            drop[i] = True
        else:
            kept[i] = True
    return drop
