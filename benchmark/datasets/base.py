"""Common sample type, dataset base class, registry and helpers.

Every loader in :mod:`benchmark.datasets` turns its dataset's own on-disk format
into :class:`Sample` objects, so that the benchmark harness never needs to know
how MoNuSeg XML, DSB2018 mask folders or ImageJ Cell Counter files look.
"""

from __future__ import annotations

import hashlib
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "Dataset",
    "DatasetError",
    "Sample",
    "fingerprint",
    "first_existing",
    "get_dataset",
    "list_datasets",
    "natural_key",
    "read_image",
    "register_dataset",
    "to_rgb_uint8",
]


class DatasetError(RuntimeError):
    """A dataset folder does not have the expected layout, or a sample cannot be loaded."""


@dataclass
class Sample:
    """One image of a dataset with its annotations, in a dataset-independent form.

    Attributes
    ----------
    id : str
        Sample identifier, unique within its dataset (usually the image file stem).
    image : numpy.ndarray
        ``HxWx3`` uint8 RGB for brightfield; ``HxW`` or ``HxWxC`` in the original dtype
        (e.g. uint16) for fluorescence. A zero-size array when only points were requested.
    labels : numpy.ndarray or None
        ``HxW`` int32 instance label map, 0 = background, or None when not annotated.
    points : numpy.ndarray or None
        ``(N, 2)`` float64 ``x, y`` pixel coordinates, or None.
    point_classes : numpy.ndarray or None
        ``(N,)`` integer class per point, or None.
    groups : dict of str to str
        Grouping variables for stratified evaluation (organ, fixation, patient, ...).
    mpp : float or None
        Microns per pixel if known.
    modality : str
        ``"brightfield"`` or ``"fluorescence"``.
    extra : dict
        Dataset-specific data (e.g. NOR instance map, positive/negative class map).
    """

    id: str
    image: np.ndarray
    labels: np.ndarray | None = None
    points: np.ndarray | None = None
    point_classes: np.ndarray | None = None
    groups: dict[str, str] = field(default_factory=dict)
    mpp: float | None = None
    modality: str = "brightfield"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_instances(self) -> int:
        """Number of distinct non-zero labels (0 when there is no label map)."""
        if self.labels is None:
            return 0
        return int(np.count_nonzero(np.unique(self.labels)))

    @property
    def n_points(self) -> int:
        """Number of annotated points (0 when there are none)."""
        return 0 if self.points is None else int(len(self.points))


class Dataset(ABC):
    """Base class of all dataset loaders.

    Subclasses set the class attributes and implement :meth:`ids` and :meth:`load`.
    Constructors take the dataset ``root`` folder and raise :class:`DatasetError`
    when the layout described in :attr:`layout` is not found.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    layout: ClassVar[str] = ""
    kind: ClassVar[str] = "instances"  # "instances" or "points"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            why = "is a file, not a folder" if self.root.exists() else "folder does not exist"
            raise self.error(self.root, why)

    # -- interface -------------------------------------------------------------
    @abstractmethod
    def ids(self, split: str | None = None) -> list[str]:
        """Return the sample ids, optionally restricted to one split."""

    @abstractmethod
    def load(self, sample_id: str) -> Sample:
        """Load one sample by id."""

    def splits(self) -> list[str]:
        """Return the names of the splits this dataset defines (may be empty)."""
        return []

    def files(self) -> list[Path]:
        """Return the files this dataset reads, used by :func:`fingerprint`."""
        return [
            p
            for p in self.root.rglob("*")
            if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(self.root).parts)
        ]

    # -- conveniences ----------------------------------------------------------
    def __iter__(self) -> Iterator[Sample]:
        for sample_id in self.ids():
            yield self.load(sample_id)

    def __len__(self) -> int:
        return len(self.ids())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r})"

    def error(self, path: Path | str, what: str) -> DatasetError:
        """Build a one-line :class:`DatasetError` naming the dataset, the path and the problem."""
        msg = f"{self.name or type(self).__name__}: {path}: {what}"
        return DatasetError(" ".join(msg.split()))

    def _check_split(self, split: str | None, aliases: dict[str, str] | None = None) -> str | None:
        if split is None:
            return None
        key = (aliases or {}).get(split.lower(), split.lower())
        if key not in self.splits():
            raise self.error(
                self.root, f"unknown split {split!r}; known: {self.splits() or 'none'}"
            )
        return key

    def _unknown(self, sample_id: str) -> DatasetError:
        return self.error(self.root, f"no sample with id {sample_id!r}")


# -- registry --------------------------------------------------------------------
_REGISTRY: dict[str, type[Dataset]] = {}
D = TypeVar("D", bound=type[Dataset])


def register_dataset(cls: D | None = None, *, name: str | None = None) -> Any:
    """Register a :class:`Dataset` subclass under ``name`` (default ``cls.name``).

    Usable as ``@register_dataset`` or ``register_dataset(MyDataset, name="x")``.

    Parameters
    ----------
    cls : type of Dataset, optional
        The class to register; omitted when used as ``@register_dataset(name=...)``.
    name : str, optional
        Registry key; defaults to the class's ``name`` attribute.

    Returns
    -------
    type of Dataset or callable
        The class itself (or a decorator when ``cls`` is omitted).
    """

    def _register(c: D) -> D:
        key = (name or c.name).lower()
        if not key:
            raise ValueError(f"{c.__name__} has no name to register under")
        if key in _REGISTRY and _REGISTRY[key] is not c:
            raise ValueError(
                f"dataset name {key!r} already registered by {_REGISTRY[key].__name__}"
            )
        _REGISTRY[key] = c
        return c

    if cls is None:
        return _register
    return _register(cls)


def list_datasets() -> list[str]:
    """Return the sorted names of all registered datasets."""
    return sorted(_REGISTRY)


def get_dataset(name: str, root: str | Path, **kwargs: Any) -> Dataset:
    """Construct a registered dataset.

    Parameters
    ----------
    name : str
        Registry name (see :func:`list_datasets`).
    root : str or Path
        Dataset root folder.
    **kwargs
        Loader-specific options.

    Returns
    -------
    Dataset
        The constructed loader.

    Raises
    ------
    KeyError
        If ``name`` is not registered.
    DatasetError
        If the folder layout is wrong.
    """
    try:
        cls = _REGISTRY[name.lower()]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(list_datasets())}") from None
    return cls(root, **kwargs)


def fingerprint(dataset: Dataset) -> str:
    """Cheap provenance hash of a dataset: sha256 over sorted relative paths and sizes.

    File contents are not read, so this is fast even for large datasets; it
    detects added, removed, renamed and resized files.

    Parameters
    ----------
    dataset : Dataset
        The dataset whose :meth:`Dataset.files` are hashed.

    Returns
    -------
    str
        Hex sha256 digest.
    """
    root = dataset.root
    entries = sorted((p.relative_to(root).as_posix(), p.stat().st_size) for p in dataset.files())
    h = hashlib.sha256()
    for rel, size in entries:
        h.update(f"{rel}\t{size}\n".encode())
    return h.hexdigest()


# -- helpers ---------------------------------------------------------------------
def natural_key(text: str) -> list[Any]:
    """Sort key that orders embedded integers numerically (``a_2`` before ``a_10``)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def read_image(path: Path) -> np.ndarray:
    """Read an image file keeping its dtype (TIFF via tifffile, others via Pillow).

    Raises
    ------
    DatasetError
        One line naming the file when it cannot be read or holds no pixels
        (truncated or corrupt: tifffile returns an empty array for a TIFF
        cut short, Pillow raises).
    """
    try:
        image = _read_pixels(path)
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except MemoryError:
        raise
    except Exception as exc:  # the readers' many error types, for one message
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DatasetError(
            f"{path}: cannot read the image (truncated or corrupt?): {why}"
        ) from None
    if image.ndim < 2 or image.size == 0:
        raise DatasetError(f"{path}: cannot read the image (truncated or corrupt?): no pixels")
    return image


def _read_pixels(path: Path) -> np.ndarray:
    if path.suffix.lower() in {".tif", ".tiff"}:
        import tifffile

        return np.asarray(tifffile.imread(path))
    from PIL import Image

    with Image.open(path) as im:
        if im.mode == "P":
            return np.asarray(im.convert("RGBA" if "transparency" in im.info else "RGB"))
        return np.asarray(im)


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Return ``image`` as ``HxWx3`` uint8 (alpha dropped, grey replicated)."""
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[..., :3]
    elif image.ndim == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.integer) and image.max(initial=0) <= 255:
            image = image.astype(np.uint8)
        else:
            raise ValueError(f"cannot convert {image.dtype} image to uint8 without rescaling")
    return np.ascontiguousarray(image)


def first_existing(
    base: Path, candidates: list[str], predicate: Callable[[Path], bool]
) -> Path | None:
    """Return ``base / c`` for the first candidate ``c`` satisfying ``predicate``."""
    for c in candidates:
        p = base / c if c else base
        if predicate(p):
            return p
    return None
