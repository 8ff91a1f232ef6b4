"""Columnar per-nucleus data in slide coordinates.

`Nuclei` holds one row per nucleus as parallel NumPy arrays, so that a million
nuclei cost a few hundred megabytes and concatenation is a handful of
``np.concatenate`` calls.  Polygons are ragged: all vertices live in one
``(M, 2)`` float32 array and ``polygon_offsets`` (length ``N + 1``) gives each
nucleus's slice of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Nuclei"]


def _empty_measurements() -> dict[str, np.ndarray]:
    return {}


@dataclass
class Nuclei:
    """Per-nucleus data, in base-pixel slide coordinates.

    Attributes
    ----------
    centroids : (N, 2) float64
        Centroid ``x, y``.
    boxes : (N, 4) float64
        Bounding box ``x0, y0, x1, y1`` (x1, y1 exclusive).
    polygon_vertices : (M, 2) float32
        All polygon vertices ``x, y``, nucleus after nucleus.
    polygon_offsets : (N + 1,) int64
        Nucleus ``i`` owns ``polygon_vertices[offsets[i]:offsets[i + 1]]``.
    scores : (N,) float32
        Detection confidence in [0, 1].
    labels : (N,) int32
        Class index into the producing model's class list.
    measurements : dict of str to (N,) arrays
        Per-nucleus measurements (area in um^2, mean optical density, ...).
    """

    centroids: np.ndarray
    boxes: np.ndarray
    polygon_vertices: np.ndarray
    polygon_offsets: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    measurements: dict[str, np.ndarray] = field(default_factory=_empty_measurements)

    def __post_init__(self) -> None:
        self.centroids = np.asarray(self.centroids, dtype=np.float64).reshape(-1, 2)
        n = len(self.centroids)
        self.boxes = np.asarray(self.boxes, dtype=np.float64).reshape(n, 4)
        self.polygon_vertices = np.asarray(self.polygon_vertices, dtype=np.float32).reshape(-1, 2)
        self.polygon_offsets = np.asarray(self.polygon_offsets, dtype=np.int64)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(n)
        self.labels = np.asarray(self.labels, dtype=np.int32).reshape(n)
        if self.polygon_offsets.shape != (n + 1,):
            raise ValueError(
                f"polygon_offsets must have {n + 1} entries, got {self.polygon_offsets.shape}"
            )
        if self.polygon_offsets[-1] != len(self.polygon_vertices):
            raise ValueError("polygon_offsets[-1] must equal the number of polygon vertices")
        for key, values in self.measurements.items():
            values = np.asarray(values)
            if values.shape[:1] != (n,):
                raise ValueError(f"measurement {key!r} has {values.shape[:1]} rows, expected {n}")
            self.measurements[key] = values

    # ------------------------------------------------------------------ build
    @classmethod
    def empty(cls, measurement_keys: Iterable[str] = ()) -> Nuclei:
        """Return a container with no nuclei (and the given measurement columns)."""
        return cls(
            centroids=np.zeros((0, 2)),
            boxes=np.zeros((0, 4)),
            polygon_vertices=np.zeros((0, 2), np.float32),
            polygon_offsets=np.zeros(1, np.int64),
            scores=np.zeros(0, np.float32),
            labels=np.zeros(0, np.int32),
            measurements={k: np.zeros(0) for k in measurement_keys},
        )

    @classmethod
    def from_polygons(
        cls,
        polygons: Sequence[np.ndarray],
        *,
        scores: Sequence[float] | np.ndarray | None = None,
        labels: Sequence[int] | np.ndarray | None = None,
        centroids: np.ndarray | None = None,
        measurements: dict[str, np.ndarray] | None = None,
    ) -> Nuclei:
        """Build from a list of ``(K_i, 2)`` x, y vertex arrays.

        Centroids default to the polygon's vertex mean; boxes are the vertex
        extents, ``(min x, min y, max x, max y)``: the outlines this package
        writes run along the pixels' edges (pixel ``i`` spans ``[i, i + 1]``,
        :func:`~nucleus_models.instances.nuclei_from_labels`), so the
        extents of a nucleus's outline are its pixel box (``max + 1``, the
        box of an outline through pixel centres, was a pixel too large to
        the right and below for them).

        >>> from nucleus_models.instances import nuclei_from_labels
        >>> lab = np.zeros((6, 6), np.int32); lab[1:3, 1:4] = 1
        >>> n = nuclei_from_labels(lab)
        >>> n.boxes.tolist(), Nuclei.from_polygons(n.polygons()).boxes.tolist()
        ([[1.0, 1.0, 4.0, 3.0]], [[1.0, 1.0, 4.0, 3.0]])
        """
        n = len(polygons)
        if n == 0:
            return cls.empty(measurements.keys() if measurements else ())
        lengths = np.array([len(p) for p in polygons], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        verts = np.concatenate([np.asarray(p, np.float32).reshape(-1, 2) for p in polygons])
        starts = offsets[:-1]
        mins = np.minimum.reduceat(verts, starts, axis=0)
        maxs = np.maximum.reduceat(verts, starts, axis=0)
        if centroids is None:
            centroids = np.add.reduceat(verts.astype(np.float64), starts, axis=0) / lengths[:, None]
        return cls(
            centroids=centroids,
            boxes=np.hstack([mins, maxs]).astype(np.float64),
            polygon_vertices=verts,
            polygon_offsets=offsets,
            scores=np.ones(n, np.float32) if scores is None else np.asarray(scores),
            labels=np.zeros(n, np.int32) if labels is None else np.asarray(labels),
            measurements=dict(measurements or {}),
        )

    @classmethod
    def concat(cls, parts: Sequence[Nuclei]) -> Nuclei:
        """Concatenate several containers (measurement columns must agree)."""
        parts = [p for p in parts if p is not None]
        if not parts:
            return cls.empty()
        keys = set(parts[0].measurements)
        for p in parts[1:]:
            if len(p) and set(p.measurements) != keys:
                if len(parts[0]) == 0:
                    keys = set(p.measurements)
                else:
                    raise ValueError("cannot concatenate Nuclei with different measurement columns")
        parts = [p for p in parts if len(p)] or parts[:1]
        shifts = np.cumsum([0] + [len(p.polygon_vertices) for p in parts[:-1]])
        offsets = np.concatenate(
            [[0]] + [p.polygon_offsets[1:] + s for p, s in zip(parts, shifts, strict=True)]
        )
        return cls(
            centroids=np.concatenate([p.centroids for p in parts]),
            boxes=np.concatenate([p.boxes for p in parts]),
            polygon_vertices=np.concatenate([p.polygon_vertices for p in parts]),
            polygon_offsets=offsets,
            scores=np.concatenate([p.scores for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            measurements={
                k: np.concatenate([p.measurements[k] for p in parts if k in p.measurements])
                for k in sorted(keys)
            },
        )

    # ---------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self.centroids)

    def polygon(self, i: int) -> np.ndarray:
        """Vertices ``(K, 2)`` of nucleus ``i``."""
        return self.polygon_vertices[self.polygon_offsets[i] : self.polygon_offsets[i + 1]]

    def polygons(self) -> list[np.ndarray]:
        """All polygons as a list of ``(K, 2)`` views (empty for no nuclei)."""
        if not len(self):  # (np.split would give one empty array)
            return []
        return np.split(self.polygon_vertices, self.polygon_offsets[1:-1])

    def chunks(self, size: int) -> Iterator[tuple[int, Nuclei]]:
        """``(first index, nuclei)`` for consecutive runs of up to ``size``
        nuclei (at least 1), e.g. to encode a whole slide's outputs a part at
        a time.

        >>> sq = np.array([[0, 0], [2, 0], [2, 2], [0, 2]], float)
        >>> n = Nuclei.from_polygons([sq + i for i in range(5)])
        >>> [(a, len(part)) for a, part in n.chunks(2)], len(list(n.chunks(0)))
        ([(0, 2), (2, 2), (4, 1)], 5)
        """
        size = max(1, int(size))
        for a in range(0, len(self), size):
            yield a, self.select(np.arange(a, min(len(self), a + size)))

    def select(self, keep: np.ndarray) -> Nuclei:
        """Rows where boolean ``keep`` is true (or the given integer indices)."""
        idx = np.flatnonzero(keep) if np.asarray(keep).dtype == bool else np.asarray(keep, np.int64)
        lengths = np.diff(self.polygon_offsets)[idx]
        if len(idx):
            starts = self.polygon_offsets[idx]
            vidx = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
            vidx = vidx + np.arange(lengths.sum())
            verts = self.polygon_vertices[vidx]
        else:
            verts = np.zeros((0, 2), np.float32)
        return Nuclei(
            centroids=self.centroids[idx],
            boxes=self.boxes[idx],
            polygon_vertices=verts,
            polygon_offsets=np.concatenate([[0], np.cumsum(lengths)]),
            scores=self.scores[idx],
            labels=self.labels[idx],
            measurements={k: v[idx] for k, v in self.measurements.items()},
        )

    def transformed(
        self,
        *,
        scale: float | tuple[float, float] = 1.0,
        offset: tuple[float, float] = (0.0, 0.0),
    ) -> Nuclei:
        """Return coordinates mapped by ``xy * scale + offset`` (``scale`` one
        number or one per axis; measurements unchanged)."""
        off = np.asarray(offset, np.float64)
        box_off = np.concatenate([off, off])
        sxy = np.broadcast_to(np.asarray(scale, np.float64), (2,))
        return Nuclei(
            centroids=self.centroids * sxy + off,
            boxes=self.boxes * np.concatenate([sxy, sxy]) + box_off,
            polygon_vertices=(self.polygon_vertices.astype(np.float64) * sxy + off).astype(
                np.float32
            ),
            polygon_offsets=self.polygon_offsets.copy(),
            scores=self.scores,
            labels=self.labels,
            measurements=dict(self.measurements),
        )

    def to_table(self, class_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Flat columns (no polygons) for CSV or a pandas DataFrame."""
        table: dict[str, np.ndarray] = {
            "x": self.centroids[:, 0],
            "y": self.centroids[:, 1],
            "x0": self.boxes[:, 0],
            "y0": self.boxes[:, 1],
            "x1": self.boxes[:, 2],
            "y1": self.boxes[:, 3],
            "score": self.scores,
            "label": self.labels,
        }
        if class_names is not None:
            names = np.asarray(list(class_names), dtype=object)
            table["class"] = names[self.labels] if len(self) else np.zeros(0, object)
        table.update(self.measurements)
        return table
