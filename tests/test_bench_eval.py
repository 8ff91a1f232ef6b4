"""End-to-end tests of ``nucleus-bench`` (datasets, eval, report) and of point evaluation.

The MoNuSeg run reads real data from ``../shared/data`` (or
``$NUCLEUS_SHARED_DATA``); missing data fails the tests, it never skips them.
Point evaluation is tested on a tiny synthetic dataset, since the shared
prostate point set has no images.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import tifffile

from benchmark.__main__ import main
from benchmark.datasets import (
    Dataset,
    DatasetError,
    Sample,
    fingerprint,
    get_dataset,
    list_datasets,
)
from benchmark.evaluate import ERROR_BAND_UM, evaluate

REPO = Path(__file__).resolve().parents[1]


def _shared_root() -> Path:
    env = os.environ.get("NUCLEUS_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="module")
def monuseg_root() -> Path:
    root = _shared_root() / "monuseg2018" / "train"
    if not (root / "images").is_dir():
        pytest.fail(f"shared data not found at {root} (set NUCLEUS_SHARED_DATA)", pytrace=False)
    return root


@pytest.fixture(scope="module")
def monuseg_eval(monuseg_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "monuseg-classical"
    argv = ["eval", "--dataset", "monuseg", "--root", str(monuseg_root)]
    argv += ["--model", "classical-he", "--limit", "2", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    return out


def test_eval_metrics_json(monuseg_eval: Path, monuseg_root: Path) -> None:
    m = json.loads((monuseg_eval / "metrics.json").read_text())
    assert m["kind"] == "instances"
    assert len(m["rows"]) == 2
    for row in m["rows"]:
        for key in ("id", "groups", "n_true", "n_pred", "seconds", "det_f1", "aji", "pq"):
            assert key in row, key
        assert row["n_true"] > 100 and row["n_pred"] > 0
        assert row["groups"]["organ"]
    for key in ("det_f1", "f1_iou50", "aji", "dice", "pq", "precision", "recall"):
        assert 0.0 <= m["mean"][key] <= 1.0, key
    assert m["mean"]["det_f1"] > 0.3  # classical-he finds most MoNuSeg nuclei
    assert m["pooled"]["n_true"] == sum(r["n_true"] for r in m["rows"])
    assert m["pooled"]["tp"] + m["pooled"]["fn"] == m["pooled"]["n_true"]
    assert "organ" in m["groups"]
    assert sum(v["n"] for v in m["groups"]["organ"].values()) == 2
    prov = m["provenance"]
    assert set(prov) >= {"package_version", "model", "dataset", "params", "created", "command"}
    assert set(prov["model"]) >= {"name", "sha256", "mpp"}
    assert {"numpy", "skimage", "histomicstk"} <= set(prov["libraries"])
    assert prov["model"]["name"] == "classical-he"
    # a model without a network: no device choice, no arithmetic to record
    assert prov["runtime"] == {"device": "cpu", "precision": "not applicable"}
    assert set(prov["dataset"]) >= {"name", "root", "fingerprint", "n_samples"}
    assert prov["dataset"]["n_samples"] == 2
    assert prov["dataset"]["fingerprint"] == fingerprint(get_dataset("monuseg", monuseg_root))
    assert prov["params"]["limit"] == 2 and prov["params"]["model"] == "classical-he"
    curve = m["pr_curve"]
    assert len(curve["precision"]) == len(curve["recall"]) > 10


def test_eval_predictions(monuseg_eval: Path, monuseg_root: Path) -> None:
    m = json.loads((monuseg_eval / "metrics.json").read_text())
    for row in m["rows"]:
        pred = tifffile.imread(monuseg_eval / "predictions" / f"{row['id']}.tif")
        image = tifffile.imread(monuseg_root / "images" / f"{row['id']}.tif")
        assert pred.dtype == np.uint32
        assert pred.shape == image.shape[:2]
        assert np.count_nonzero(np.unique(pred)) == row["n_pred"]


def test_eval_error_profile(monuseg_eval: Path, monuseg_root: Path) -> None:
    """Each sample's error counts are those of the metrics on its own
    prediction, and the pooled profile is their sum, in words in the report."""
    from benchmark.datasets import get_dataset
    from benchmark.metrics import kromp_object_categories, pixel_error_breakdown

    m = json.loads((monuseg_eval / "metrics.json").read_text())
    ds = get_dataset("monuseg", monuseg_root)
    for row in m["rows"]:
        e = row["errors"]
        truth = ds.load(row["id"]).labels
        pred = tifffile.imread(monuseg_eval / "predictions" / f"{row['id']}.tif")
        cats = kromp_object_categories(truth, pred)
        assert (e["split"], e["merged"], e["fn"], e["fp_objects"]) == (
            cats["split"],
            cats["merged"],
            cats["fn"],
            cats["fp"],
        )
        assert e["n_true"] == row["n_true"] and e["n_pred"] == row["n_pred"]
        # the band is ERROR_BAND_UM at the sample's resolution (~3 px at MoNuSeg's 0.25 um/px)
        assert 0.24 < row["mpp"] < 0.26
        band = ERROR_BAND_UM / row["mpp"]
        assert {k: e[k] for k in ("fp_px", "fn_px", "fp_band_px", "fn_band_px")} == {
            k: v
            for k, v in pixel_error_breakdown(truth, pred, band_px=band).items()
            if k in ("fp_px", "fn_px", "fp_band_px", "fn_band_px")
        }
        assert 0 < e["fp_band_px"] <= e["fp_px"] and 0 < e["fn_band_px"] <= e["fn_px"]
    pooled = m["pooled"]["errors"]
    for key in ("n_true", "split", "merged", "fn", "fp_px", "fn_band_px"):
        assert pooled[key] == sum(r["errors"][key] for r in m["rows"]), key
    assert pooled["merge_rate"] == pooled["merged"] / pooled["n_true"]
    assert 0 < pooled["fn_band_share"] <= 1
    md = (monuseg_eval / "report.md").read_text()
    assert "## Where the errors are" in md
    assert f"{100 * pooled['merge_rate']:.1f} % merged" in md


def test_eval_report(monuseg_eval: Path) -> None:
    md = (monuseg_eval / "report.md").read_text()
    figs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert figs, "report.md shows no figures"
    for rel in figs:
        assert (monuseg_eval / unquote(rel)).is_file(), rel
    names = {Path(unquote(f)).name for f in figs}
    assert {"per_sample_det_f1.png", "counts_scatter.png", "pr_curve.png"} <= names
    assert sum(n.startswith("overlay_") for n in names) == 2
    assert "data:image/png;base64" in (monuseg_eval / "report.html").read_text()
    # a model without a network has no arithmetic to name
    assert "run on cpu\n" in md and "not applicable" not in md
    # the report subcommand rebuilds it from metrics.json alone
    (monuseg_eval / "report.md").unlink()
    assert main(["report", str(monuseg_eval), "--overlays", "1"]) == 0
    assert (monuseg_eval / "report.md").is_file()


def test_a_report_says_what_its_metrics_are(monuseg_eval: Path) -> None:
    """A reader without the code learns which AJI (Kumar et al.'s, not AJI+),
    that det_f1 matches by centroid in mask rather than within a radius, and
    which values are per-image scores that have no pooled form."""
    md = (monuseg_eval / "report.md").read_text()
    html_text = html.unescape((monuseg_eval / "report.html").read_text())
    for text in (md, html_text):
        assert "Kumar et al. 2017" in text and "not AJI+" in text
        assert "centroid lies inside a true nucleus" in text
        assert "IoU > 0.5" in text and "Data Science Bowl 2018" in text
        assert "per-image scores, shown as their mean" in text


def test_a_reports_group_tables_say_they_are_means_of_images(
    monuseg_eval: Path, tmp_path: Path
) -> None:
    """The per-group tables (means over each group's images) stood under the
    pooled error profile's heading, as if part of it, and said neither; the
    density table (counts summed over images) now says it is pooled."""
    md = (monuseg_eval / "report.md").read_text()
    errors = md.partition("## Where the errors are")[2].partition("### By organ")[0]
    assert "## By group" in errors
    assert "Means over the images of each group (n: images)" in errors
    out = tmp_path / "points"
    evaluate(_FakePoints(tmp_path), model="classical-he", out_dir=out, progress=False)
    density = (out / "report.md").read_text().partition("## Detection by local density")[2]
    assert "summed over all images" in density.partition("|")[0]


def _one_error(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_report_redrawn_damaged_or_asked_wrongly(
    monuseg_eval: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The report subcommand on a folder it did not write whole: one line, exit 2,
    or the report without what is missing; an earlier report's overlays go."""
    out = tmp_path / "copy"
    shutil.copytree(monuseg_eval, out)
    assert main(["report", str(out), "--overlays", "-1"]) == 2
    assert "0 or more" in _one_error(capsys)
    assert main(["report", str(out), "--overlays", "2"]) == 0
    assert len(list((out / "figures").glob("overlay_*.png"))) == 2
    assert main(["report", str(out), "--overlays", "1"]) == 0
    assert len(list((out / "figures").glob("overlay_*.png"))) == 1  # not 2: one is shown
    shutil.rmtree(out / "predictions")
    assert main(["report", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "overlay_" not in md and "per_sample_det_f1.png" in md
    metrics = json.loads((out / "metrics.json").read_text())
    (out / "metrics.json").write_text(json.dumps({"mean": metrics["mean"]}))
    assert main(["report", str(out)]) == 2
    assert "not written by nucleus-bench eval (no rows" in _one_error(capsys)


def test_an_eval_without_a_report_takes_the_earlier_report_away(
    monuseg_eval: Path, monuseg_root: Path, tmp_path: Path
) -> None:
    """--no_report into the folder of a run with a report: no report.md is
    left to describe the earlier run's samples."""
    out = tmp_path / "copy"
    shutil.copytree(monuseg_eval, out)
    argv = ["eval", "--dataset", "monuseg", "--root", str(monuseg_root), "--model"]
    argv += ["classical-he", "--limit", "1", "--out", str(out), "--quiet", "--no_report"]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "predictions"]


def test_markdown_figure_links_survive_spaces_and_brackets() -> None:
    """A QuPath tile's name as a sample id: the link is one URL a Markdown
    viewer resolves, not text broken at the space."""
    from benchmark.report import _markdown

    rel = "figures/overlay_slide 1 [d=1,x=0,y=0].png"
    md = _markdown([("img", rel, "overlay")])
    (link,) = re.findall(r"!\[overlay\]\((\S+)\)", md)
    assert unquote(link) == rel


def test_datasets_lists_all(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    for name in list_datasets():
        assert re.search(rf"^{name}\b", out, re.M), name
    assert out.count("layout:") == len(list_datasets())


def test_unknown_model_exit_2(monuseg_root: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "benchmark", "eval", "--dataset", "monuseg"]
    cmd += ["--root", str(monuseg_root), "--model", "no-such-model", "--out", str(tmp_path)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "no-such-model" in lines[0]


@pytest.mark.parametrize(
    "argv",
    [
        ["--dataset", "nope", "--root", "."],
        ["--dataset", "monuseg", "--root", "/no/such/folder"],
        ["--dataset", "bbbc038", "--root", "."],  # wrong layout
    ],
)
def test_bad_input_exit_2(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["eval", *argv, "--model", "classical-he", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error:")


# -- point datasets: a synthetic two-image dataset ----------------------------------------
def _disk_image(seed: int, size: int = 200, radius: float = 7.0) -> tuple[np.ndarray, np.ndarray]:
    """Hematoxylin-coloured disks on pale eosin and their centres (pixel centres at integers)."""
    rng = np.random.default_rng(seed)
    g = np.arange(20, size - 19, 32, dtype=float)
    centres = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2) + rng.uniform(-4, 4, (g.size**2, 2))
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.empty((size, size, 3), np.uint8)
    img[:] = (232, 190, 215)
    for cx, cy in centres:
        img[(xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2] = (70, 45, 130)
    return img, centres


class _FakePoints(Dataset):
    name = "fake_points"
    description = "two synthetic images with nucleus points"
    layout = "none"
    kind = "points"

    def ids(self, split: str | None = None) -> list[str]:
        return ["a", "b"]

    def load(self, sample_id: str) -> Sample:
        img, pts = _disk_image(0 if sample_id == "a" else 1)
        # first disk unannotated (1 FP), one point on empty background (1 FN)
        pts = np.vstack([pts[1:], [[100.0, 100.0]]])
        return Sample(
            id=sample_id,
            image=img,
            points=pts,
            groups={"fixation": "formalin" if sample_id == "a" else "frozen"},
            mpp=0.5 if sample_id == "a" else None,  # None: falls back to the model's mpp
        )


def test_point_evaluate(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ds = _FakePoints(tmp_path)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="benchmark.evaluate"):
        res = evaluate(ds, model="classical-he", out_dir=out, progress=False)
    # image b has no resolution: read at the model's, and both the log and the report say so
    (warned,) = [r.getMessage() for r in caplog.records if "no resolution" in r.getMessage()]
    assert "1 of the 2 images" in warned and "--mpp" in warned
    assert res["kind"] == "points" and res["main_metric"] == "f1"
    assert set(res["mean"]) >= {"f1", "precision", "recall"}
    assert res["mean"]["f1"] > 0.8, res["mean"]
    assert res["pooled"]["fp"] >= 2 and res["pooled"]["fn"] >= 2
    assert [r["mpp_source"] for r in res["rows"]] == ["sample", "model"]
    assert res["rows"][0]["radius_px"] == pytest.approx(12.0)  # 6 um at 0.5 um/px
    assert set(res["groups"]["fixation"]) == {"formalin", "frozen"}
    bins = res["density"]["bins"]
    assert sum(b["n_true"] for b in bins) == res["pooled"]["n_true"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["density"]["match_radius_um"] == 6.0
    for sid in ("a", "b"):
        lines = (out / "predictions" / f"{sid}.csv").read_text().splitlines()
        assert lines[0] == "x,y,score" and len(lines) > 1
    assert (out / "figures" / "overlay_a.png").is_file()
    report = (out / "report.md").read_text()
    assert "0.5 um/px (the images' own) for 1" in report
    assert "um/px (none recorded: the model's) for 1" in report


@pytest.mark.parametrize("radius_um", [float("nan"), float("inf")])
def test_a_point_radius_that_is_not_a_number_of_microns_is_refused(
    tmp_path: Path, radius_um: float
) -> None:
    """nan matched no point and inf every one, each reported as a real F1."""
    with pytest.raises(DatasetError, match="positive number of microns"):
        evaluate(
            _FakePoints(tmp_path),
            model="classical-he",
            out_dir=tmp_path / "out",
            radius_um=radius_um,
            progress=False,
        )


def test_a_report_names_the_model_options_it_ran_with(tmp_path: Path) -> None:
    """Two reports of one model at other thresholds, written from Python (a
    sweep), differed only in their numbers: the header names the options."""
    for threshold in (80, 100):
        out = tmp_path / f"fg{threshold}"
        evaluate(
            _FakePoints(tmp_path),
            model="classical-he",
            out_dir=out,
            model_options={"foreground_threshold": threshold},
            command="python sweep.py",
            progress=False,
        )
        header = (out / "report.md").read_text().partition("## ")[0]
        assert f"model options: foreground_threshold={threshold}\n" in header
    evaluate(_FakePoints(tmp_path), model="classical-he", out_dir=tmp_path / "d", progress=False)
    assert "model options" not in (tmp_path / "d" / "report.md").read_text()


def test_the_scale_a_size_normalised_model_picked_is_recorded(tmp_path: Path) -> None:
    """unet-bbbc038 picks each image's scale from its nuclei; metrics.json
    recorded only the nominal resolution, so the scale each image was
    segmented at was lost; the rows and the report's header now say it."""
    root = _shared_root() / "dsb2018_bbbc038"
    if not root.is_dir():
        pytest.fail(f"shared data not found at {root} (set NUCLEUS_SHARED_DATA)", pytrace=False)
    out = tmp_path / "out"
    res = evaluate(
        get_dataset("bbbc038", root), model="unet-bbbc038", out_dir=out, limit=3, progress=False
    )
    picked = [r["analysis_mpp"] for r in res["rows"]]
    assert all(r["mpp"] == 0.5 for r in res["rows"])  # no resolution: the nominal one
    assert len(set(picked)) > 1 and min(picked) < 0.4, picked
    header = (out / "report.md").read_text().partition("## ")[0]
    assert f"model run at {min(picked):g}-{max(picked):g} um/px" in header


class _PointsWithoutImageB(_FakePoints):
    def load(self, sample_id: str) -> Sample:
        if sample_id == "b":  # its image moved away since the eval
            raise DatasetError(f"fake_points: image {sample_id}.tif not found")
        return super().load(sample_id)


def test_a_point_report_says_its_matching_radius(tmp_path: Path) -> None:
    """The point scores mean nothing without the radius they were matched
    within: the report names it."""
    out = tmp_path / "out"
    evaluate(_FakePoints(tmp_path), model="classical-he", out_dir=out, radius_um=4, progress=False)
    assert "within 4 um" in (out / "report.md").read_text()
    assert "within 4 um" in (out / "report.html").read_text()


class _PointsWithoutAnnotationB(_FakePoints):
    def load(self, sample_id: str) -> Sample:
        sample = super().load(sample_id)
        if sample_id == "b":  # an image nobody has annotated yet
            sample.points = None
        return sample


def test_a_report_names_the_samples_it_did_not_score(tmp_path: Path) -> None:
    """A sample without an annotation is in no mean or count: the report said
    nothing of it, so two runs over different shares of a dataset read alike."""
    out = tmp_path / "out"
    res = evaluate(_PointsWithoutAnnotationB(tmp_path), model="classical-he", out_dir=out)
    assert [r["id"] for r in res["rows"]] == ["a"]
    for name in ("report.md", "report.html"):
        text = (out / name).read_text()
        assert "Not scored: 1 of the samples (1 no annotation): b." in text, name


def test_the_html_report_shows_code_as_code(monuseg_eval: Path) -> None:
    """The command line stood in the HTML between literal Markdown backticks."""
    text = (monuseg_eval / "report.html").read_text()
    assert "<code>" in text and "`" not in text.partition("<body>")[2].partition("<img")[0]
    assert re.search(r"command: <code>[^<]*eval --dataset monuseg", text)


class _FakeOutlined(_FakePoints):
    name = "fake_outlined"
    kind = "instances"

    def load(self, sample_id: str) -> Sample:
        img, centres = _disk_image(0 if sample_id == "a" else 1)
        yy, xx = np.mgrid[0 : img.shape[0], 0 : img.shape[1]]
        labels = np.zeros(img.shape[:2], np.int32)
        for i, (cx, cy) in enumerate(centres, 1):
            labels[(xx - cx) ** 2 + (yy - cy) ** 2 <= 49] = i
        return Sample(id=sample_id, image=img, labels=labels, mpp=0.5)


def test_a_matching_radius_for_outlined_nuclei_is_said_to_be_unused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--radius_um scores point datasets only: given for outlined nuclei it
    was silently ignored, as if it had changed the detection scores."""
    ds = _FakeOutlined(tmp_path)
    with caplog.at_level(logging.WARNING, logger="benchmark.evaluate"):
        evaluate(ds, model="classical-he", out_dir=tmp_path / "a", radius_um=3, progress=False)
        evaluate(ds, model="classical-he", out_dir=tmp_path / "b", progress=False)
    warned = [r.getMessage() for r in caplog.records if "radius_um" in r.getMessage()]
    assert len(warned) == 1 and "radius_um 3 is not used: fake_outlined" in warned[0], warned
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in "ab")
    a["mean"].pop("seconds"), b["mean"].pop("seconds")
    assert a["mean"] == b["mean"]


def test_a_report_redrawn_without_one_samples_image_leaves_its_overlay_out(
    tmp_path: Path,
) -> None:
    """Redrawing a report when a sample's image has gone since the eval: its
    overlay is left out with a warning, instead of an error after the
    earlier overlays were removed (the old report.md then linked to them)."""
    from benchmark.report import write_report

    out = tmp_path / "out"
    evaluate(_FakePoints(tmp_path), model="classical-he", out_dir=out, progress=False)
    write_report(out, dataset=_PointsWithoutImageB(tmp_path))
    md = (out / "report.md").read_text()
    assert "overlay_a.png" in md and "overlay_b.png" not in md
    assert sorted(p.name for p in (out / "figures").glob("overlay_*")) == ["overlay_a.png"]


def test_models_lists_every_registered_model_with_its_card(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`nucleus-bench models`: every registered name, the card's CV and the file's sha256."""
    import hashlib

    from nucleus_models.models import list_models
    from nucleus_models.models.weights import WEIGHTS_DIR

    assert main(["models", "--json"]) == 0
    records = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert sorted(records) == list_models()
    shipped = sorted(p.stem for p in WEIGHTS_DIR.glob("*.json"))
    assert shipped and set(shipped) <= set(records)
    for name in shipped:
        rec = records[name]
        weights = WEIGHTS_DIR / rec["spec"]["weights"]
        assert hashlib.sha256(weights.read_bytes()).hexdigest() == rec["spec"]["sha256"]
        assert rec["card"] == str(WEIGHTS_DIR / f"{name}.md") and rec["cv"]["aji"] > 0
    card = json.loads((WEIGHTS_DIR / "unet-bbbc038.json").read_text())["cv"]
    fluo = card["by_group"]["modality=fluorescence"]  # the model's own modality, not all images
    assert records["unet-bbbc038"]["cv"]["f1_iou50"] == fluo["f1_iou50"]
    assert records["unet-bbbc038"]["cv_images"].startswith(f"{fluo['n']} held-out fluorescence")
    assert records["classical-he"]["cv"] is None and records["classical-he"]["card"] is None
    assert [n for n, r in records.items() if r["cli_default"]] == ["unet-monuseg"]

    assert main(["models"]) == 0
    table = capsys.readouterr().out
    card = json.loads((WEIGHTS_DIR / "unet-monuseg.json").read_text())
    row = next(line for line in table.splitlines() if line.startswith("unet-monuseg* "))
    assert f"{card['cv']['metrics_at_best']['aji']:.3f}" in row
    assert card["spec"]["sha256"][:12] in row


def test_the_recorded_command_can_be_run_again(monuseg_root: Path, tmp_path: Path) -> None:
    """`python -m benchmark` records itself as `nucleus-bench`, quoted for a
    shell (not as the path of __main__.py, words split at the spaces)."""
    import shlex

    out = tmp_path / "my run"
    args = ["eval", "--dataset", "monuseg", "--root", str(monuseg_root)]
    args += ["--model", "classical-he", "--limit", "1", "--out", str(out)]
    res = subprocess.run(
        [sys.executable, "-m", "benchmark", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    command = json.loads((out / "metrics.json").read_text())["provenance"]["command"]
    assert shlex.split(command) == ["nucleus-bench", *args]


class _FakeMixed(Dataset):
    name = "fake_mixed"
    description = "an H&E-like image and its inverse, a fluorescence-like one"
    layout = "none"
    kind = "instances"

    def ids(self, split: str | None = None) -> list[str]:
        return ["he", "fluo"]

    def load(self, sample_id: str) -> Sample:
        from skimage.measure import label

        img, _ = _disk_image(0)
        labels = label(img[..., 0] < 150).astype(np.int32)
        fluo = sample_id == "fluo"
        return Sample(
            id=sample_id,
            image=255 - img if fluo else img,
            labels=labels,
            mpp=0.5,
            modality="fluorescence" if fluo else "brightfield",
        )


def test_images_of_another_kind_than_the_model_are_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An H&E model on a fluorescence image scores ~0 there: the log and the
    report say why, and name the models for that kind."""
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="benchmark.evaluate"):
        res = evaluate(_FakeMixed(tmp_path), model="classical-he", out_dir=out, progress=False)
    (warned,) = [r.getMessage() for r in caplog.records if "likely wrong" in r.getMessage()]
    assert "1 fluorescence of the 2 images" in warned and "unet-bbbc038" in warned
    assert res["provenance"]["model"]["modality"] == "brightfield"
    md = (out / "report.md").read_text()
    assert "images of another kind than the model (brightfield): 1 fluorescence of 2" in md


def test_an_mpp_the_images_do_not_need_is_said_to_be_unused(
    monuseg_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ds = get_dataset("monuseg", monuseg_root)
    with caplog.at_level(logging.WARNING, logger="benchmark.evaluate"):
        res = evaluate(
            ds,
            model="classical-he",
            out_dir=tmp_path,
            limit=1,
            mpp=0.5,
            progress=False,
            report=False,
        )
    assert [r["mpp_source"] for r in res["rows"]] == ["sample"]  # the images' own (0.2527)
    assert any("--mpp 0.5 not used" in r.getMessage() for r in caplog.records)


def test_models_table_keeps_a_fine_tuned_models_inherited_license(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The license column of a fine-tuned model names the starting weights'
    license too (a non-commercial one was cut off after the user's own)."""
    import benchmark.__main__ as bench

    license_ = (
        "CC BY 4.0; from the starting weights (unet-monuseg): CC BY-NC-SA 4.0 "
        "(inherited from the MoNuSeg training data): non-commercial use only"
    )
    spec = {"modality": "brightfield", "mpp": 0.4, "weights": "x.pt", "sha256": "ab" * 32}
    record = {"name": "site", "cli_default": False, "cv": None, "weights_present": True}
    record["spec"] = {**spec, "license": license_}
    monkeypatch.setattr(bench, "model_records", lambda: [record])
    assert main(["models"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("site "))
    assert row.endswith("CC BY 4.0 + CC BY-NC-SA 4.0")


def test_models_says_which_models_lack_their_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model whose .pt was deleted (its card left) was listed as if it
    could run; using it is then an error. The table says so."""
    import nucleus_models.models.weights as weights

    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path)  # (no weights file at all)
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("unet-bbbc038 "))
    assert "no weights!" in row
    assert "unet-bbbc038: its weights file unet-bbbc038.pt is missing: it cannot run" in out
    assert "classical-he: its weights" not in out  # (weight-free)
    monkeypatch.undo()
    assert main(["models"]) == 0
    assert "no weights!" not in capsys.readouterr().out


class _PointsOneSeenInTraining(_FakePoints):
    """Image "a" named as one of unet-monuseg-fast's training images."""

    seen = "TCGA-21-5784-01Z-00-DX1"

    def ids(self, split: str | None = None) -> list[str]:
        return [self.seen, "b"]

    def load(self, sample_id: str) -> Sample:
        sample = super().load("a" if sample_id == self.seen else sample_id)
        sample.id = sample_id
        return sample


def test_scores_on_the_models_own_training_images_are_said_to_be_in_sample(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`eval --dataset monuseg --model unet-monuseg` scored the model on the
    images it was trained on (its card lists them) and said nothing: the
    numbers read as held-out ones. The rows, provenance, log and report say so."""
    from benchmark.evaluate import training_image_ids
    from nucleus_models.models import get_spec

    spec = get_spec("unet-monuseg-fast")
    assert _PointsOneSeenInTraining.seen in (training_image_ids(spec) or set())
    assert training_image_ids(get_spec("classical-he")) is None  # no card, no training images
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="benchmark.evaluate"):
        res = evaluate(
            _PointsOneSeenInTraining(tmp_path),
            model="unet-monuseg-fast",
            out_dir=out,
            progress=False,
            model_options={"precision": "float32"},
        )
    assert [r["training_image"] for r in res["rows"]] == [True, False]
    assert res["provenance"]["dataset"]["training_images"] == 1
    assert set(res["groups"]["training_image"]) == {"yes", "no"}
    (warned,) = [r.getMessage() for r in caplog.records if "in-sample" in r.getMessage()]
    assert "1 of the 2 images were among unet-monuseg-fast's training images" in warned
    header = (out / "report.md").read_text().partition("## ")[0]
    assert "images the model was trained on: 1 of 2 (their scores are in-sample" in header
    # a model without training images says nothing of them
    res = evaluate(_FakePoints(tmp_path), model="classical-he", out_dir=tmp_path / "c")
    assert "training_image" not in res["rows"][0] and "training_image" not in res["groups"]
    assert res["provenance"]["dataset"]["training_images"] is None


def test_an_annotation_corrected_in_place_changes_the_recorded_provenance(
    tmp_path: Path,
) -> None:
    """The dataset fingerprint hashes file names and sizes: a mask corrected
    in place (one nucleus painted out of an uncompressed TIFF) left it, and
    every other provenance field, as it was, so two runs on different ground
    truth read as runs on the same data. The content hash of the scored
    samples tells them apart."""
    from skimage.measure import label

    root = tmp_path / "mine"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    img, _ = _disk_image(0)
    labels = label(img[..., 0] < 128).astype(np.uint16)
    tifffile.imwrite(root / "images" / "f1.tif", img)
    tifffile.imwrite(root / "masks" / "f1.tif", labels)
    (root / "mpp.txt").write_text("0.5\n")
    kw = {"model": "classical-he", "progress": False, "report": False}
    first = evaluate(get_dataset("folder", root), out_dir=tmp_path / "a", **kw)
    size = (root / "masks" / "f1.tif").stat().st_size
    labels[labels == 1] = 0  # the first nucleus was not one
    tifffile.imwrite(root / "masks" / "f1.tif", labels)
    assert (root / "masks" / "f1.tif").stat().st_size == size
    second = evaluate(get_dataset("folder", root), out_dir=tmp_path / "b", **kw)
    assert first["rows"][0]["n_true"] == second["rows"][0]["n_true"] + 1
    d1, d2 = first["provenance"]["dataset"], second["provenance"]["dataset"]
    assert d1["fingerprint"] == d2["fingerprint"]  # (names and sizes only)
    assert len(d1["content_sha256"]) == 64 and d1["content_sha256"] != d2["content_sha256"]
    # the same data gives the same hash
    again = evaluate(get_dataset("folder", root), out_dir=tmp_path / "c", **kw)
    assert again["provenance"]["dataset"]["content_sha256"] == d2["content_sha256"]


def test_a_report_of_the_first_samples_says_they_are_not_all_of_them(tmp_path: Path) -> None:
    """`eval --limit 1` wrote "fake_points at ... (1 samples, ...)": its means
    read as the dataset's, with nothing but the command line to say that
    only the first of two images was scored."""
    out = tmp_path / "out"
    res = evaluate(_FakePoints(tmp_path), model="classical-he", out_dir=out, limit=1)
    ds = res["provenance"]["dataset"]
    assert (ds["n_samples"], ds["n_selected"], ds["n_available"]) == (1, 1, 2)
    header = (out / "report.md").read_text().partition("## ")[0]
    assert "(the first 1 of its 2 samples;" in header
    evaluate(_FakePoints(tmp_path), model="classical-he", out_dir=out)
    assert "(2 samples;" in (out / "report.md").read_text()


def test_training_images_come_only_from_a_card_of_the_registered_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A card beside other weights than those registered (weights replaced,
    the card left from before) lists another training's images: none are
    taken from it, so no image is called in-sample on its word."""
    import dataclasses

    from benchmark.evaluate import training_image_ids
    from nucleus_models.models import get_spec, weights

    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path)
    card = {"spec": {"sha256": "ab" * 32}, "training": {"images": ["x", "y"]}}
    (tmp_path / "mine.json").write_text(json.dumps(card))
    spec = dataclasses.replace(get_spec("unet-monuseg-fast"), name="mine", sha256="ab" * 32)
    assert training_image_ids(spec) == {"x", "y"}
    assert training_image_ids(dataclasses.replace(spec, sha256="cd" * 32)) is None


def test_a_samples_content_hash_covers_its_image_and_id_too() -> None:
    """An image replaced in place (same name and size: the fingerprint
    unchanged) is other data scored: the sample's content hash differs, as
    for a corrected annotation; so does the same content under another id."""
    from benchmark.evaluate import sample_digest

    image = np.zeros((4, 4, 3), np.uint8)
    truth = np.zeros((4, 4), np.int32)
    other = image.copy()
    other[1, 2, 0] = 9
    digest = sample_digest("a", image, truth)
    assert digest == sample_digest("a", image.copy(), truth.copy())
    assert digest != sample_digest("a", other, truth)
    assert digest != sample_digest("b", image, truth)


def test_a_report_of_the_first_samples_says_how_many_were_scored() -> None:
    """Of the first 3 of 30 samples, one without an annotation (skipped):
    the header says 2 were scored, not only "the first 3 of its 30"."""
    from benchmark.report import _dataset_text

    ds = {"name": "d", "root": "/d", "fingerprint": "ab" * 32, "n_selected": 3, "n_available": 30}
    assert "(the first 3 of its 30 samples, 2 scored;" in _dataset_text({**ds, "n_samples": 2})
    assert "(the first 3 of its 30 samples;" in _dataset_text({**ds, "n_samples": 3})
