"""The model contract: a spec that travels with the model, and its stages.

A model turns a batch of RGB tiles (at its own resolution, ``spec.mpp``) into
one instance label map per tile.  Stages are separate, visible functions:
``preprocess`` -> ``forward`` -> ``postprocess``; ``predict_batch`` chains them.
``prepare`` sees the whole slide once (e.g. a thumbnail for global stain
statistics) so that tiles are processed identically wherever they lie.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ModelSpec", "TileInstances", "NucleusModel", "sha256_of_file"]


@dataclass(frozen=True)
class ModelSpec:
    """What a model needs and promises: its I/O contract and provenance.

    Attributes
    ----------
    name : str
        Registry name ``<arch>-<data>``.
    mpp : float
        Resolution (microns per pixel) the model works at.
    modality : str
        ``"brightfield"`` or ``"fluorescence"`` (chooses the tissue mask).
    classes : tuple of str
        Class names; nucleus labels index into them.
    class_colors : tuple of str
        ``rgb(r,g,b)`` colour per class for annotations.
    tile_size, tile_overlap : int
        Default tile core size and per-side context, in model pixels.
    max_nucleus_diameter_um : float
        Largest nucleus the model reports; the overlap must exceed it.
    weights : str or None
        Weights file (relative to the package's weights folder).
    sha256 : str
        sha256 of the weights, or ``"none"`` for a weight-free model.
    thresholds : dict
        Tuned post-processing thresholds.
    description, license : str
        Human-readable text and the license inherited from training data.
    """

    name: str
    mpp: float
    modality: str = "brightfield"
    classes: tuple[str, ...] = ("nucleus",)
    class_colors: tuple[str, ...] = ("rgb(0,200,255)",)
    tile_size: int = 1024
    tile_overlap: int = 48
    max_nucleus_diameter_um: float = 20.0
    batch_size: int = 1
    weights: str | None = None
    sha256: str = "none"
    thresholds: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    license: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (for provenance records)."""
        d = asdict(self)
        d["classes"] = list(self.classes)
        d["class_colors"] = list(self.class_colors)
        return d


@dataclass
class TileInstances:
    """Instances found in one tile.

    ``labels`` is an ``(H, W)`` int32 map (0 = background); ``scores`` and
    ``classes`` are indexed by label id (length ``labels.max() + 1``; entry 0
    unused).
    """

    labels: np.ndarray
    scores: np.ndarray
    classes: np.ndarray


class NucleusModel(ABC):
    """Base class of every registered model."""

    spec: ModelSpec

    # what ``prepare`` is given on a slide: its thumbnail, or ("analysis")
    # windows of its tissue read at the analysis resolution, for statistics
    # that depend on the resolution (the spread of colours shrinks as a
    # thumbnail averages nuclei and stroma together)
    prepare_from: str = "thumbnail"

    #: why the model runs in other arithmetic than ``auto`` picked first
    #: (e.g. an int8 network that could not be built); None when it does not
    precision_note: str | None = None

    def prepare(self, thumbnail: np.ndarray, tissue: np.ndarray) -> dict[str, Any]:
        """Whole-slide statistics from a thumbnail and its tissue mask.

        The returned dict is passed to every ``predict_batch`` call (it must
        be picklable, for dask workers).  Default: nothing.
        """
        return {}

    @abstractmethod
    def preprocess(self, tiles: list[np.ndarray], context: dict[str, Any]) -> Any:
        """RGB uint8 tiles -> model input."""

    @abstractmethod
    def forward(self, batch: Any) -> Any:
        """Model input -> raw output (maps, logits...)."""

    @abstractmethod
    def postprocess(
        self, raw: Any, tiles: list[np.ndarray], context: dict[str, Any]
    ) -> list[TileInstances]:
        """Raw output -> one ``TileInstances`` per tile."""

    def postprocessor(self) -> Callable[[Any, list[tuple[int, ...]]], list[TileInstances]] | None:
        """``postprocess`` detached from the model, for other processes: a
        picklable callable ``(raw, tile shapes) -> one TileInstances per
        tile`` that needs neither the network nor the tiles' pixels, or None
        where the model's post-processing needs them (the default). With one,
        a run on a GPU post-processes in a pool of processes while the
        network goes on (:func:`nucleus_models.wsi.runner.run_tiles`)."""
        return None

    def predict_batch(
        self, tiles: list[np.ndarray], context: dict[str, Any] | None = None
    ) -> list[TileInstances]:
        """Run the three stages on a batch of tiles."""
        context = context or {}
        return self.postprocess(self.forward(self.preprocess(tiles, context)), tiles, context)


def sha256_of_file(path: str | Path, *, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
