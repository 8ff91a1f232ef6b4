"""nucleus_models: nucleus detection and segmentation for the Digital Slide Archive.

The library behind the Slicer CLIs in ``cli/`` and the benchmark harness in
``benchmark/``.  Heavy dependencies (torch, large_image) are imported lazily,
so that ``--xml`` and ``--list_cli`` answer quickly.
"""

from __future__ import annotations

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("nucleus-models")
except _metadata.PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
