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
    assert doc["elements"][1]["user"] == {"nucleus_id": 2, "score": 0.4, "area_um2": 8.5}
    if form in ("polygon", "boundary"):  # each nucleus gets its own vertices, z = 0
        assert doc["elements"][1]["points"] == [[40, 5, 0], [48, 9, 0], [44, 15, 0]]
        assert len(doc["elements"][0]["points"]) == 4


def test_point_and_box_elements_sit_on_each_nucleus() -> None:
    """A point is the centroid (x, y); a rectangle is the box, its centre and
    its width (x) and height (y); the nuclei are neither square nor on the
    diagonal, so a swapped axis shows."""
    nuc = _nuclei()
    points = annotation_document(nuc, name="p", form="point", class_names=("a", "b"))
    boxes = annotation_document(nuc, name="b", form="box", class_names=("a", "b"))
    for i, (x, y) in enumerate(nuc.centroids.tolist()):
        assert points["elements"][i]["center"] == [round(x, 1), round(y, 1), 0]
        x0, y0, x1, y1 = nuc.boxes[i].tolist()
        rect = boxes["elements"][i]
        assert rect["center"] == [(x0 + x1) / 2, (y0 + y1) / 2, 0]
        assert (rect["width"], rect["height"]) == (x1 - x0, y1 - y0)
    assert points["elements"][0]["center"] == [15, 14, 0]
    assert (boxes["elements"][0]["width"], boxes["elements"][0]["height"]) == (10, 8)


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
    assert f["properties"]["measurements"] == {"nucleus_id": 2, "score": 0.4, "area_um2": 8.5}
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
    for row, (x, y) in zip(rows, _nuclei().centroids.tolist(), strict=True):
        assert (float(row["x"]), float(row["y"])) == pytest.approx((x, y), abs=1e-3)
        assert (float(row["x_um"]), float(row["y_um"])) == pytest.approx((x / 2, y / 2), abs=0.01)
    # a failure while writing leaves nothing behind
    target = tmp_path / "a.anot"
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write("{partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == [out]
    write_annotation(str(target), annotation_document(_nuclei(), name="y", class_names=("a", "b")))
    assert json.loads(target.read_text())["name"] == "y"


def _many_nuclei(n: int, seed: int = 0) -> Nuclei:
    rng = np.random.default_rng(seed)
    polys = []
    for c in rng.uniform(0, 50000, (n, 2)):
        k = int(rng.integers(5, 24))
        t = np.sort(rng.uniform(0, 2 * np.pi, k))
        polys.append(c + rng.uniform(4, 12) * np.c_[np.cos(t), np.sin(t)])
    return Nuclei.from_polygons(
        polys,
        scores=rng.uniform(0, 1, n),
        labels=rng.integers(0, 2, n),
        measurements={"area_px": rng.uniform(20, 400, n), "area_um2": rng.uniform(5, 100, n)},
    )


@pytest.mark.parametrize("form", ["polygon", "point", "box"])
def test_annotation_written_in_batches_is_the_documents_bytes(tmp_path: Path, form: str) -> None:
    from nucleus_models.io import write_annotation_document, write_geojson, write_geojson_document

    classes, colors = ("tumour", "other"), ("rgb(255,0,0)", "rgb(0,0,255)")
    nuc = _many_nuclei(257)
    for batch in (1, 7, 100, 10_000):
        for description, attributes in (("", None), ("257 nuclei", {"model": {"name": "m"}})):
            kw = dict(name="Nuclei (m)", form=form, class_names=classes, class_colors=colors)
            kw.update(description=description, attributes=attributes)
            write_annotation(str(tmp_path / "whole.anot"), annotation_document(nuc, **kw))
            write_annotation_document(str(tmp_path / "batches.anot"), nuc, batch=batch, **kw)
            whole = (tmp_path / "whole.anot").read_bytes()
            assert (tmp_path / "batches.anot").read_bytes() == whole
    validate_annotation(json.loads(whole))
    empty = nuc.select(np.zeros(len(nuc), bool))
    write_annotation_document(str(tmp_path / "empty.anot"), empty, name="e", form=form)
    assert json.loads((tmp_path / "empty.anot").read_text()) == {"name": "e", "elements": []}
    if form == "polygon":
        for props in (None, {"model": "m"}):
            gkw = dict(class_names=classes, class_colors=colors, properties=props)
            write_geojson(str(tmp_path / "whole.geojson"), geojson_document(nuc, **gkw))
            write_geojson_document(str(tmp_path / "batches.geojson"), nuc, batch=10, **gkw)
            whole = (tmp_path / "whole.geojson").read_bytes()
            assert (tmp_path / "batches.geojson").read_bytes() == whole


def test_annotation_written_in_batches_holds_one_batch_in_memory(tmp_path: Path) -> None:
    """The Python objects of a whole slide's elements (~3 KB a nucleus) are
    never all alive at once; a NaN still fails the write and leaves no file."""
    import tracemalloc

    from nucleus_models.io import write_annotation_document

    nuc = _many_nuclei(6000)
    nuc.labels[:] = 0

    def peak(write) -> int:  # type: ignore[no-untyped-def]
        tracemalloc.start()
        try:
            write()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    whole = peak(lambda: write_annotation(str(tmp_path / "a"), annotation_document(nuc, name="n")))
    batched = peak(lambda: write_annotation_document(str(tmp_path / "b"), nuc, name="n", batch=200))
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    assert batched < whole / 4, (batched, whole)

    nuc.scores[4321] = np.nan
    with pytest.raises(ValueError, match="JSON compliant"):
        write_annotation_document(str(tmp_path / "c.anot"), nuc, name="n", batch=500)
    assert not list(tmp_path.glob("c.anot*")) and not list(tmp_path.glob(".c.anot*"))


@pytest.mark.parametrize("form", ["polygon", "point", "box"])
def test_elements_join_the_csv_rows_by_nucleus_id(tmp_path: Path, form: str) -> None:
    """Each element's ``user.nucleus_id`` is its nucleus's CSV ``id`` (and
    GeoJSON feature ``id``), numbered on across batches. Girder stores an
    annotation's elements 10000 at a time in parallel threads, so they come
    back in another order than the file's: the id is what joins them (the
    elements are shuffled here as Girder may)."""
    import pandas as pd

    from nucleus_models.io import write_annotation_document, write_geojson_document

    classes, colors = ("tumour", "other"), ("rgb(255,0,0)", "rgb(0,0,255)")
    nuc = _many_nuclei(257, seed=3)
    write_csv(str(tmp_path / "n.csv"), nuc, class_names=classes, mpp=0.5, provenance={"v": 1})
    write_annotation_document(
        str(tmp_path / "n.anot"),
        nuc,
        name="n",
        form=form,
        class_names=classes,
        class_colors=colors,
        batch=7,
    )
    write_geojson_document(
        str(tmp_path / "n.geojson"), nuc, class_names=classes, class_colors=colors, batch=10
    )
    table = pd.read_csv(tmp_path / "n.csv", comment="#").set_index("id")
    elements = json.loads((tmp_path / "n.anot").read_text())["elements"]
    validate_annotation({"name": "n", "elements": elements})
    ids = [el["user"]["nucleus_id"] for el in elements]
    assert sorted(ids) == table.index.tolist() == list(range(1, 258))
    for k in np.random.default_rng(0).permutation(len(elements)):
        el, row = elements[k], table.loc[elements[k]["user"]["nucleus_id"]]
        assert el["group"] == row["class"] and el["user"]["score"] == pytest.approx(
            row["score"], abs=1e-3
        )
        if form == "polygon":
            xy = np.array(el["points"])[:, :2]
            box = [*xy.min(0), *xy.max(0)]  # the outline's extents are the box
            assert box == pytest.approx([row.x0, row.y0, row.x1, row.y1], abs=0.06)
        else:
            assert el["center"][:2] == pytest.approx(
                [row.x, row.y]
                if form == "point"
                else [(row.x0 + row.x1) / 2, (row.y0 + row.y1) / 2],
                abs=0.11,  # the box rounded to 0.1 px, then its centre
            )
    features = json.loads((tmp_path / "n.geojson").read_text())["features"]
    assert [f["id"] for f in features] == table.index.tolist()
    # QuPath drops a feature id that is not a UUID, but keeps the measurements
    assert [f["properties"]["measurements"]["nucleus_id"] for f in features] == [
        f["id"] for f in features
    ]


def test_geojson_rings_have_four_positions_for_qupath() -> None:
    """A one-pixel-wide straight nucleus has a two-vertex outline; closed, its
    ring ``[a, b, a]`` has 3 positions, which QuPath's reader (JTS
    ``createLinearRing``: 0 or >= 4) rejects, failing the whole import. It
    is written as its pixel box; other outlines are written as they are."""
    import shapely.geometry

    from nucleus_models.instances import nuclei_from_labels

    lab = np.zeros((40, 40), np.int32)
    lab[5, 2:30] = 1  # 1 x 28 px
    lab[20:26, 10:17] = 2
    nuc = nuclei_from_labels(lab)
    assert np.diff(nuc.polygon_offsets).tolist()[0] == 2  # (the case in point)
    gj = geojson_document(nuc, class_names=("n",), class_colors=("rgb(1,2,3)",))
    for feature, pixels, outline in zip(gj["features"], (28, 42), nuc.polygons(), strict=True):
        ring = feature["geometry"]["coordinates"][0]
        assert len(ring) >= 4 and ring[0] == ring[-1]
        shape = shapely.geometry.shape(feature["geometry"])
        assert shape.is_valid and shape.area > 0
        if len(outline) >= 3:
            assert ring[:-1] == outline.tolist()
        else:
            assert shape.area == pixels and shape.bounds == (2, 5, 30, 6)
