"""Dataset loaders turning each dataset's own format into one :class:`Sample` type.

Registered names: ``monuseg``, ``bbbc038``, ``bbbc039``, ``kromp2020``,
``pt_fixation``, ``ccagt``, ``deepliif``, and ``folder`` (your own images
with label masks). Use :func:`get_dataset` to construct
one from its root folder, e.g. ``get_dataset("monuseg", "../shared/data/monuseg2018")``.
"""

from .base import (
    Dataset,
    DatasetError,
    Sample,
    fingerprint,
    get_dataset,
    list_datasets,
    register_dataset,
)
from .bbbc038 import BBBC038
from .bbbc039 import BBBC039
from .ccagt import CCAgT
from .deepliif import DeepLIIF
from .folder import LabelledFolder
from .kromp2020 import Kromp2020
from .monuseg import MoNuSeg
from .pt_fixation import PTFixation

__all__ = [
    "BBBC038",
    "BBBC039",
    "CCAgT",
    "Dataset",
    "DatasetError",
    "DeepLIIF",
    "Kromp2020",
    "LabelledFolder",
    "MoNuSeg",
    "PTFixation",
    "Sample",
    "fingerprint",
    "get_dataset",
    "list_datasets",
    "register_dataset",
]
