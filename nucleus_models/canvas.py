"""Laying many small parts of an image side by side on one canvas.

Work on a few scattered parts of a large image (the nuclei of a tile, the
clumps of a mask still changing) then runs as one call over a small canvas
instead of one call per part or over the whole image.  Boxes lie at least a
pixel apart, so parts on the canvas neither touch nor see each other, even
8-connected.
"""

from __future__ import annotations

import numpy as np

__all__ = ["on_canvas", "pack_boxes", "parts_on_canvas"]


def pack_boxes(sizes: np.ndarray, width: int, gap: int = 1) -> tuple[np.ndarray, tuple[int, int]]:
    """Top-left corners ``(K, 2)`` (row, column) that lay boxes of ``sizes``
    ``(K, 2)`` (height, width) side by side on shelves of a canvas about
    ``width`` wide, at least ``gap`` pixels from each other and from the
    canvas edge, tallest first; and the canvas's ``(height, width)``.

    Work on some of the many small parts of an image (the parts of a mask
    still changing) can then run on one canvas, without the rest of the
    image.

    >>> corners, shape = pack_boxes(np.array([[2, 3], [4, 2], [1, 5]]), width=8)
    >>> corners.tolist(), shape
    ([[1, 4], [1, 1], [6, 1]], (8, 8))
    """
    sizes = np.asarray(sizes, np.int64).reshape(-1, 2)
    corners = np.zeros((len(sizes), 2), np.int64)
    if not len(sizes):
        return corners, (2 * gap, 2 * gap)
    canvas_w = max(int(width), int(sizes[:, 1].max()) + 2 * gap)
    top = right = shelf = 0  # the shelf's top row, its right end, its height
    for i in np.argsort(-sizes[:, 0], kind="stable").tolist():
        h, w = int(sizes[i, 0]), int(sizes[i, 1])
        if right + gap + w + gap > canvas_w:  # a new shelf
            top += gap + shelf
            right = shelf = 0
        corners[i] = (top + gap, right + gap)
        right += gap + w
        shelf = max(shelf, h)
    return corners, (top + gap + shelf + gap, canvas_w)


def parts_on_canvas(
    comp: np.ndarray, boxes: np.ndarray, ids: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Lay the parts ``ids`` of the label map ``comp`` apart on a canvas
    with :func:`pack_boxes`: the flat indices of their pixels in ``comp``,
    the flat indices of the same pixels on the canvas, and the canvas's
    shape. ``boxes[k]`` is part ``k``'s box ``(top, left, bottom, right)``
    (bottom and right exclusive; row 0 unused).

    >>> comp = np.array([[1, 1, 0, 2], [0, 0, 0, 2]])
    >>> boxes = np.array([[0, 0, 0, 0], [0, 0, 1, 2], [0, 3, 2, 4]])
    >>> src, dst, shape = parts_on_canvas(comp, boxes, np.array([2]), 4)
    >>> src.tolist(), dst.tolist(), shape
    ([3, 7], [5, 9], (4, 4))
    """
    ids = np.asarray(ids, np.int64)
    b = boxes[ids]
    corners, shape = pack_boxes(b[:, 2:] - b[:, :2], width)
    chosen = np.zeros(len(boxes), bool)
    chosen[ids] = True
    shift = np.zeros(len(boxes), np.int64)  # canvas index - image index, but for the rows
    shift[ids] = (corners[:, 0] - b[:, 0]) * shape[1] + corners[:, 1] - b[:, 1]
    src = np.flatnonzero(chosen[comp])
    dst = src // comp.shape[1] * (shape[1] - comp.shape[1]) + src + shift[comp.ravel()[src]]
    return src, dst, shape


def on_canvas(
    image: np.ndarray, src: np.ndarray, dst: np.ndarray, shape: tuple[int, int], fill: float = 0
) -> np.ndarray:
    """``image``'s pixels ``src`` at ``dst`` on a new canvas of ``shape``
    (:func:`parts_on_canvas`'s), ``fill`` elsewhere, in ``image``'s dtype.

    >>> on_canvas(np.array([[5, 6], [7, 8]]), np.array([1, 3]), np.array([0, 2]), (2, 2), 9)
    array([[6, 9],
           [8, 9]])
    """
    image = np.asarray(image)
    out = np.full(shape, fill, image.dtype)
    out.reshape(-1)[dst] = image.reshape(-1)[src]
    return out
