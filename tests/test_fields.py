"""Labelled fields from a slide and its DSA annotation (``nucleus-bench fields``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from skimage.draw import ellipse

from benchmark.__main__ import main
from benchmark.datasets import get_dataset
from benchmark.fields import FieldError, annotation_elements, export_fields
from nucleus_models.instances import nuclei_from_labels
from nucleus_models.io.annotation import annotation_document
from nucleus_models.wsi.slide import open_slide

REPO = Path(__file__).resolve().parents[1]
SLIDE = REPO / "samples" / "CMU-1-Small-Region-crop.tif"  # 1024 px, 0.499 um/px
X, Y, W, H = 300, 420, 400, 300


def _labels(seed: int = 0) -> np.ndarray:
    """Separate ellipses of nucleus size, some cut by the field's edge."""
    rng = np.random.default_rng(seed)
    lab = np.zeros((H, W), np.int32)
    for r, c in [(2, 150), (H - 3, 40), (150, 0), (150, W - 1)] + [
        tuple(rng.integers(15, (H - 15, W - 15))) for _ in range(40)
    ]:
        if lab[max(r - 13, 0) : r + 13, max(c - 13, 0) : c + 13].any():
            continue
        rr, cc = ellipse(
            r, c, rng.uniform(4, 9), rng.uniform(4, 9), shape=lab.shape, rotation=rng.uniform(0, 3)
        )
        lab[rr, cc] = lab.max() + 1
    return lab


def _document(lab: np.ndarray, *, simplify: float = 0.0, rectangle: bool = True) -> dict:
    """NucleusDetection's annotation document for ``lab`` placed at (X, Y), plus
    the field rectangle a pathologist would draw."""
    nuclei = nuclei_from_labels(lab, simplify=simplify)
    nuclei.polygon_vertices[:] += [X, Y]
    doc = annotation_document(nuclei, name="corrected")
    if rectangle:
        doc["elements"].append(
            {
                "type": "rectangle",
                "center": [X + W / 2, Y + H / 2, 0],
                "width": W,
                "height": H,
                "rotation": 0,
                "group": "checked",
            }
        )
    return doc


def test_cli_annotation_gives_back_its_label_map(tmp_path: Path) -> None:
    lab = _labels()
    ann = tmp_path / "ann.json"
    # as Girder's GET annotation/{id} returns it
    ann.write_text(json.dumps({"_id": "abc", "annotation": _document(lab)}))
    out = tmp_path / "mine"
    records = export_fields(SLIDE, [ann], out)
    assert [r["nuclei"] for r in records] == [int(lab.max())]
    ds = get_dataset("folder", out)
    (sample,) = list(ds)
    assert sample.mpp == pytest.approx(0.499)
    got = np.asarray(sample.labels)
    # the same pixels and the same partition into nuclei (ids renumbered 1..N)
    assert np.array_equal(got > 0, lab > 0)
    pairs = {(int(a), int(b)) for a, b in zip(got[lab > 0], lab[lab > 0], strict=True)}
    assert len(pairs) == int(lab.max()) == int(got.max())
    # the field's pixels are the slide's own
    slide_px = open_slide(SLIDE).read_region(X, Y, W, H)
    assert np.array_equal(np.asarray(sample.image)[..., :3], slide_px[..., :3])
    index = json.loads((out / "fields.json").read_text())["fields"]
    entry = index[f"{SLIDE.stem}_{X}_{Y}_{W}x{H}"]
    assert entry["region"] == [X, Y, W, H] and entry["version"]
    assert len(entry["annotation_sha256"][0]) == 64

    # the CLI's default outlines (simplified by 0.5 px) give nearly the same
    ann.write_text(json.dumps([_document(lab, simplify=0.5)]))
    export_fields(SLIDE, [ann], out)  # replaces the field
    got = np.asarray(list(get_dataset("folder", out))[0].labels)
    assert ((got > 0) == (lab > 0)).mean() > 0.995
    assert int(got.max()) == int(lab.max())


def test_regions_groups_shapes_and_overlap(tmp_path: Path, caplog) -> None:
    doc = {
        "name": "hand-drawn",
        "elements": [
            {"type": "circle", "center": [110.0, 110.0, 0], "radius": 8.0},
            {"type": "circle", "center": [120.0, 110.0, 0], "radius": 8.0},  # overlaps the first
            {"type": "ellipse", "center": [150.0, 160.0, 0], "width": 20, "height": 10},
            {"type": "point", "center": [170.0, 120.0, 0]},  # not an outline: ignored
            {"type": "polyline", "closed": False, "points": [[90, 90, 0], [95, 95, 0]]},
            {"type": "rectangle", "center": [128, 128, 0], "width": 96, "height": 96},
            {
                "type": "rectangle",
                "center": [140, 140, 0],
                "width": 120,
                "height": 120,
                "group": "field",
            },
        ],
    }
    ann = tmp_path / "hand.json"
    ann.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING):
        records = export_fields(SLIDE, [ann], tmp_path / "a", field_group="field")
    assert [r["region"] for r in records] == [[80, 80, 120, 120]]
    assert records[0]["nuclei"] == 3 and records[0]["overlap_px"] > 0
    assert records[0]["drawn_over"] == 1 and "1 nuclei drawn over another" in caplog.text
    (sample,) = list(get_dataset("folder", tmp_path / "a"))
    lab = np.asarray(sample.labels)
    areas = np.bincount(lab.ravel())[1:]
    # later-drawn circle whole (pi r^2 ~ 201 px), the first loses the overlap
    assert abs(areas[1] - np.pi * 64) < 12 and areas[0] < areas[1]
    assert abs(areas[2] - np.pi * 10 * 5) < 12
    # a rotated ellipse is HistomicsUI's: its outline turned by +rotation in x, y
    # (y down), as the polygon of its points is drawn
    theta = np.linspace(0, 2 * np.pi, 720, endpoint=False)
    ex, ey = 15 * np.cos(theta), 6 * np.sin(theta)
    rot = 0.6
    px, py = ex * np.cos(rot) - ey * np.sin(rot) + 140, ex * np.sin(rot) + ey * np.cos(rot) + 140
    both = [
        {
            "type": "ellipse",
            "center": [140.0, 140.0, 0],
            "width": 30,
            "height": 12,
            "rotation": rot,
        },
        {"type": "polyline", "closed": True, "points": np.c_[px, py, 0 * px].tolist()},
    ]
    masks = []
    for el in both:
        ann.write_text(json.dumps({"elements": [el]}))
        export_fields(SLIDE, [ann], tmp_path / "e", regions=[(100, 100, 80, 80)])
        masks.append(np.asarray(list(get_dataset("folder", tmp_path / "e"))[0].labels) > 0)
    assert (masks[0] & masks[1]).sum() / (masks[0] | masks[1]).sum() > 0.97
    ann.write_text(json.dumps(doc))
    # without a group both rectangles are fields; --region replaces them
    assert len(export_fields(SLIDE, [ann], tmp_path / "b")) == 2
    records = export_fields(SLIDE, [ann], tmp_path / "c", regions=[(0, 0, 64, 64)])
    assert records[0]["nuclei"] == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["elements"].pop(), "no field"),
        (lambda d: d["elements"][-1].update(rotation=0.3), "rotated"),
        (lambda d: d["elements"][-1].update(center=[1000, 1000, 0]), "outside"),
        (lambda d: d.update(elements=d["elements"][-1:]), "no nucleus outlines"),
        (lambda d: d.pop("elements"), "not a DSA annotation"),
    ],
)
def test_bad_annotations_are_one_line_errors_and_write_nothing(
    tmp_path: Path, change, message: str
) -> None:
    doc = _document(_labels())
    change(doc)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(doc))
    out = tmp_path / "mine"
    with pytest.raises(FieldError, match=message):
        export_fields(SLIDE, [ann], out)
    assert not out.exists()


def test_cli_and_folder_resolution_check(tmp_path: Path, capsys) -> None:
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(_document(_labels())))
    out = tmp_path / "mine"
    rc = main(["fields", "--slide", str(SLIDE), "--annotation", str(ann), "--out", str(out)])
    assert rc == 0
    assert "1 field(s)" in capsys.readouterr().out
    # a second slide at another resolution cannot join the folder
    rc = main(
        [
            "fields",
            "--slide",
            str(SLIDE),
            "--annotation",
            str(ann),
            "--out",
            str(out),
            "--input_mpp",
            "0.25",
            "--region",
            "0,0,100,100",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "one resolution" in err and len(err.strip().splitlines()) == 1
    assert len(list((out / "images").iterdir())) == 1
    (tmp_path / "broken.json").write_text("{")
    rc = main(
        ["fields", "--slide", str(SLIDE), "--annotation", str(tmp_path / "broken.json")]
        + ["--out", str(out)]
    )
    assert rc == 2 and "not a JSON annotation" in capsys.readouterr().err
    rc = main(
        ["fields", "--slide", str(SLIDE), "--annotation", str(ann), "--out", str(out)]
        + ["--region", "1,2,3"]
    )
    assert rc == 2 and "x,y,width,height" in capsys.readouterr().err
    assert annotation_elements([ann])[0]


def test_touching_neighbours_are_no_warning(tmp_path: Path, caplog) -> None:
    """Outlines that share a few edge pixels (neighbours, the CLI's simplified
    ones) are recorded, not warned about; one drawn over another is."""
    touching = [
        {"type": "circle", "center": [110.0, 110.0, 0], "radius": 8.0},
        {"type": "circle", "center": [125.0, 110.0, 0], "radius": 8.0},  # 15 px apart
    ]
    ann = tmp_path / "touching.json"
    ann.write_text(json.dumps({"name": "t", "elements": touching}))
    with caplog.at_level(logging.INFO, logger="benchmark.fields"):
        (rec,) = export_fields(SLIDE, [ann], tmp_path / "a", regions=[(80, 80, 80, 80)])
    assert 0 < rec["overlap_px"] < 10 and rec["drawn_over"] == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "neighbouring outlines share" in caplog.text


def test_what_would_spoil_a_fields_folder_is_refused_or_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An --out (or its masks/) that is a file, a damaged fields.json, a slide
    of the same name from elsewhere, an impossible --input_mpp or --region:
    one error, nothing written; the same region twice is one field,
    overlapping fields are warned about; mpp.txt keeps the folder's first
    resolution (slides within the tolerance of it join, and cannot drift)."""
    import shutil

    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(_document(_labels())))
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(FieldError, match="is a file, not a folder"):
        export_fields(SLIDE, [ann], afile, regions=[(0, 0, 100, 100)])
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "masks").write_text("")
    with pytest.raises(FieldError, match="is a file, not a folder"):
        export_fields(SLIDE, [ann], tmp_path / "z", regions=[(0, 0, 100, 100)])
    assert sorted(p.name for p in (tmp_path / "z").iterdir()) == ["masks"]
    for bad in (float("inf"), float("nan"), 0.0, -0.3):
        with pytest.raises(FieldError, match="--input_mpp"):
            export_fields(SLIDE, [ann], tmp_path / "m", input_mpp=bad)
    rc = main(["fields", "--slide", str(SLIDE), "--annotation", str(ann), "--out"]
              + [str(tmp_path / "m"), "--region", "inf,0,10,10"])  # fmt: skip
    assert rc == 2 and not (tmp_path / "m").exists()

    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="benchmark.fields"):
        twice = export_fields(SLIDE, [ann], out, regions=[(250, 250, 100, 100)] * 2)
        export_fields(SLIDE, [ann], out, regions=[(250, 250, 200, 200), (300, 300, 200, 200)])
    assert len(twice) == 1
    assert any("overlap by 150 x 150 px" in r.getMessage() for r in caplog.records)
    # the same file name from another folder would replace these fields silently
    other = tmp_path / "elsewhere" / SLIDE.name
    other.parent.mkdir()
    shutil.copy(SLIDE, other)
    with pytest.raises(FieldError, match="from another slide"):
        export_fields(other, [ann], out, regions=[(250, 250, 100, 100)])
    # mpp.txt stays the first slide's: 0.4998 joins, but does not move it
    export_fields(SLIDE, [ann], out, regions=[(0, 0, 64, 64)], input_mpp=0.4998)
    assert (out / "mpp.txt").read_text().strip() == "0.499"
    (out / "fields.json").write_text('{"fields": ')
    with pytest.raises(FieldError, match="fields.json: not readable"):
        export_fields(SLIDE, [ann], out, regions=[(0, 0, 64, 64)])
