"""Outputs: DSA annotation documents, GeoJSON (QuPath), CSV, overlay PNG."""

from .annotation import (
    FORMS,
    annotation_batches,
    annotation_document,
    write_annotation,
    write_annotation_document,
)
from .atomic import atomic_write
from .overlay import render_overlay, write_overlay
from .tables import geojson_document, write_csv, write_geojson, write_geojson_document

__all__ = [
    "FORMS",
    "annotation_batches",
    "annotation_document",
    "atomic_write",
    "geojson_document",
    "render_overlay",
    "write_annotation",
    "write_annotation_document",
    "write_csv",
    "write_geojson",
    "write_geojson_document",
    "write_overlay",
]
