"""Slides: reading (large_image), tissue masks, tiling and the tile runner.

This package is the only importer of ``large_image`` in the project.
"""

from .runner import TileJob, available_cores, resolve_workers, run_tiles
from .slide import Slide, open_slide, to_rgb_uint8
from .tiling import Region, Tile, clip_region, in_core, parse_roi, tile_grid
from .tissue import tile_tissue_fraction, tissue_mask

__all__ = [
    "Region",
    "Slide",
    "Tile",
    "TileJob",
    "clip_region",
    "in_core",
    "open_slide",
    "parse_roi",
    "resolve_workers",
    "available_cores",
    "run_tiles",
    "tile_grid",
    "tile_tissue_fraction",
    "tissue_mask",
    "to_rgb_uint8",
]
