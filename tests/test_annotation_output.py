"""Annotation documents validate against large_image's own schema; GeoJSON and CSV."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from annotation_schema import validate_annotation

from nucleus_models.io import annotation_document, geojson_document, write_annotation, write_csv
from nucleus_models.io.atomic import atomic_write
from nucleus_models.types import Nuclei


def _nuclei() -> Nuclei:
    polys = [
        np.array([[10, 10], [20, 10], [20, 18], [10, 18]]),
        np.array([[40, 5], [48, 9], [44, 15]]),
    ]
    return Nuclei.from_polygons(
        polys, scores=[0.9, 0.4], labels=[0, 1], measurements={"area_um2": np.array([20.0, 8.5])}
    )


@pytest.mark.parametrize("form", ["polygon", "point", "box", "boundary", "bbox"])
def test_every_form_validates(form: str) -> None:
    doc = annotation_document(
        _nuclei(),
        name="Nuclei (test)",
        form=form,
        class_names=("negative", "positive"),
        class_colors=("rgb(0,0,255)", "rgb(255,0,0)"),
        attributes={"model": {"name": "x", "sha256": "none"}, "version": "0"},
    )
    validate_annotation(doc)
    assert len(doc["elements"]) == 2
    assert [e["lineColor"] for e in doc["elements"]] == ["rgb(0,0,255)", "rgb(255,0,0)"]
    assert [e["group"] for e in doc["elements"]] == ["negative", "positive"]
    assert doc["elements"][1]["user"] == {"score": 0.4, "area_um2": 8.5}
    if form in ("polygon", "boundary"):  # each nucleus gets its own vertices, z = 0
        assert doc["elements"][1]["points"] == [[40, 5, 0], [48, 9, 0], [44, 15, 0]]
        assert len(doc["elements"][0]["points"]) == 4


def test_schema_check_can_fail() -> None:
    doc = annotation_document(_nuclei(), name="x", class_names=("a", "b"))
    doc["elements"][0]["points"] = [[1, 2]]  # too few coordinates per vertex
    with pytest.raises(jsonschema.ValidationError):
        validate_annotation(doc)
    with pytest.raises(jsonschema.ValidationError):
        validate_annotation({"name": "x", "elements": [{"type": "blob", "center": [0, 0, 0]}]})
    doc = annotation_document(
        _nuclei(), name="x", class_names=("a", "b"), class_colors=("red!", "blue")
    )
    with pytest.raises(jsonschema.ValidationError):
        validate_annotation(doc)  # colours must be CSS-like rgb()/#hex


def test_labels_must_name_a_class() -> None:
    with pytest.raises(ValueError, match="class"):
        annotation_document(_nuclei(), name="x", class_names=("only",))


def test_empty_annotation_is_valid() -> None:
    validate_annotation(annotation_document(Nuclei.empty(), name="none"))


def test_geojson_qupath_shape() -> None:
    gj = geojson_document(
        _nuclei(), class_names=("a", "b"), class_colors=("rgb(1,2,3)", "rgb(4,5,6)")
    )
    f = gj["features"][1]
    ring = f["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and len(ring) == 4
    assert f["properties"]["objectType"] == "detection"
    assert f["properties"]["classification"] == {"name": "b", "color": [4, 5, 6]}
    import shapely.geometry

    assert shapely.geometry.shape(f["geometry"]).is_valid


def test_csv_and_atomic_write(tmp_path: Path) -> None:
    out = tmp_path / "n.csv"
    write_csv(str(out), _nuclei(), class_names=("a", "b"), mpp=0.5)
    rows = list(csv.DictReader(out.open()))
    assert (
        len(rows) == 2
        and rows[1]["class"] == "b"
        and float(rows[0]["x_um"]) == pytest.approx(7.5, abs=0.01)
    )
    # a failure while writing leaves nothing behind
    target = tmp_path / "a.anot"
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write("{partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == [out]
    write_annotation(str(target), annotation_document(_nuclei(), name="y", class_names=("a", "b")))
    assert json.loads(target.read_text())["name"] == "y"
