"""Slicer CLI contract (XML <-> parameters, --list_cli, --xml), end-to-end runs
on shared data, and bad input: one line on stderr, non-zero exit, no output."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from annotation_schema import validate_annotation

REPO = Path(__file__).resolve().parents[1]


CLI_LIST = json.loads((REPO / "slicer_cli_list.json").read_text())


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _xml_params(name: str) -> dict[str, object]:
    from ctk_cli import CLIModule
    from slicer_cli_web import CLIArgumentParser  # noqa: F401  (applies slicer_cli_web's ctk_cli adjustments)

    module = CLIModule(str(REPO / "cli" / name / f"{name}.xml"))
    return {p.name: p for p in module.parameters()}


def _script(name: str):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(f"cli_{name}", REPO / "cli" / name / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", sorted(CLI_LIST))
def test_xml_parses_and_matches_the_parameter_object(name: str) -> None:
    params = _xml_params(name)
    fields = {f.name for f in dataclasses.fields(_script(name).Params)}
    assert set(params) == fields
    for p in params.values():
        assert p.description, f"{p.name} has no description"
        if p.typ == "file" and p.channel == "output" and p.name.endswith("AnnotationFile"):
            assert p.reference == "inputImageFile" and p.fileExtensions == [".anot"]


def _slicer_cli_web_warnings(xml: str) -> list[str]:
    """What slicer_cli_web says while it registers a CLI from ``xml`` (its
    ctk_cli parser logs, and otherwise ignores, an unknown attribute, an
    unparsable default, a missing one, a parameter that cannot be passed)."""
    import logging

    from slicer_cli_web.cli_utils import as_model, get_cli_parameters

    class _Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    keep = _Keep()
    logger = logging.getLogger("ctk_cli")
    logger.addHandler(keep)
    try:
        get_cli_parameters(as_model(xml))  # raises on a type it cannot run
    finally:
        logger.removeHandler(keep)
    return keep.messages


@pytest.mark.parametrize("name", sorted(CLI_LIST))
def test_slicer_cli_web_registers_the_xml_without_a_warning(name: str) -> None:
    xml = (REPO / "cli" / name / f"{name}.xml").read_text()
    assert _slicer_cli_web_warnings(xml) == []
    # the check hears what slicer_cli_web only logs: here, a menu left
    # without its default
    broken = xml.replace("<default>polygon</default>", "", 1)
    assert broken != xml
    assert _slicer_cli_web_warnings(broken) == [
        "No <default> provided for element of type <string-enumeration> (nuclei_annotation_format)"
    ]


def test_slicer_cli_web_hands_the_slide_over_as_a_file() -> None:
    """slicer_cli_web gives the CLI a local path for an input it sees as on
    Girder, and tags the outputs with that input's item, by which HistomicsUI
    attaches the .anot to the slide. A ``reference="_girder_id_"`` image is
    passed as its bare file id instead (``slide not found: <id>``) and the
    annotation is attached nowhere. The folder job's folder is the opposite:
    it is read through girder-client, so its id is what the CLI needs."""
    from slicer_cli_web.cli_utils import SLICER_TYPE_TO_GIRDER_MODEL_MAP, is_on_girder

    params = _xml_params("NucleusDetection")
    primary = min(
        (p for p in params.values() if p.index is not None and p.channel == "input"),
        key=lambda p: int(p.index),
    )
    assert primary.name == "inputImageFile" and is_on_girder(primary)
    assert SLICER_TYPE_TO_GIRDER_MODEL_MAP[primary.typ] == "file"  # the slide's item and file
    folder = _xml_params("NucleusFolderJob")["inputFolder"]
    assert folder.typ == "directory" and not is_on_girder(folder)


def test_list_cli_lists_every_cli_folder() -> None:
    res = run_cli("--list_cli")
    assert res.returncode == 0, res.stderr
    listed = json.loads(res.stdout)
    folders = {p.parent.name for p in (REPO / "cli").glob("*/*.xml")}
    assert set(listed) == folders == set(CLI_LIST)


@pytest.mark.parametrize("name", sorted(CLI_LIST))
def test_xml_flag_prints_the_xml(name: str) -> None:
    res = run_cli(name, "--xml")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == (REPO / "cli" / name / f"{name}.xml").read_text().strip()


def _into_a_closed_pipe(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` with stdout a pipe nobody reads any more (``... | head``
    after head has exited)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            cmd, cwd=REPO, stdout=write, stderr=subprocess.PIPE, text=True, timeout=120
        )
    finally:
        os.close(write)


@pytest.mark.parametrize("name", sorted(CLI_LIST))
@pytest.mark.parametrize("flag", ["--xml", "--help", "--version"])
def test_xml_into_a_closed_pipe_is_quiet(name: str, flag: str) -> None:
    """``python -m cli NucleusDetection --xml | head`` printed a BrokenPipeError
    traceback once head had its lines; now it stops quietly, as cat does.
    ``--help`` and ``--version`` exited 0 there (argparse swallowed the
    failed write); they stop as ``--xml`` does, 141 (SIGPIPE's status)."""
    res = _into_a_closed_pipe([sys.executable, "-m", "cli", name, flag])
    assert res.stderr == "" and res.returncode == 141


@pytest.mark.parametrize("name", sorted(CLI_LIST))
def test_help_shows_a_percent_sign_in_a_description(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ctk_cli hands each XML description to argparse as help, which
    argparse formats with ``%``: a site's fine-tuned model whose description
    says "40 % of our cohort", added to the menus by sync_cli_models, made
    ``--help`` of both CLIs end in a traceback."""
    from nucleus_models.cli_support import build_parser

    spec = importlib.util.spec_from_file_location(
        "sync_cli_models", REPO / "scripts" / "sync_cli_models.py"
    )
    assert spec is not None and spec.loader is not None
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    models = {**sync.registered(), "unet-mysite": "H&E, fine-tuned on 40 % of our cohort."}
    xml = tmp_path / f"{name}.xml"
    xml.write_text(sync.sync_xml((REPO / "cli" / name / f"{name}.xml").read_text(), models)[0])
    with pytest.raises(SystemExit) as exit_:
        build_parser(str(xml)).parse_args(["--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    assert "unet-mysite: H&E, fine-tuned on 40 % of our cohort." in out
    assert "(default: unet-monuseg)" in out


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(ln for ln in f if not ln.startswith("#")))


def _hit_rates(csv_path: Path, labels: np.ndarray) -> tuple[float, float]:
    """(share of true nuclei holding a detected centroid, share of centroids inside a nucleus)."""
    rows = _csv_rows(csv_path)
    xy = np.array([[float(r["x"]), float(r["y"])] for r in rows]).astype(int)
    h, w = labels.shape
    hit = labels[np.clip(xy[:, 1], 0, h - 1), np.clip(xy[:, 0], 0, w - 1)]
    recall = len(np.unique(hit[hit > 0])) / len(np.unique(labels[labels > 0]))
    return recall, float(np.mean(hit > 0))


def _check_outputs(out: Path, min_nuclei: int) -> dict:
    doc = json.loads((out / "n.anot").read_text())
    validate_annotation(doc)
    attrs = doc["attributes"]
    assert attrs["model"]["name"] == "classical-he" and attrs["model"]["sha256"]
    assert attrs["version"] and attrs["params"]["inputImageFile"]
    assert attrs["nuclei_count"] == len(doc["elements"]) >= min_nuclei
    rows = _csv_rows(out / "n.csv")
    assert len(rows) == len(doc["elements"])
    head = json.loads((out / "n.csv").open().readline()[2:])
    assert head["model"]["name"] == "classical-he" and head["version"]
    from PIL import Image

    assert json.loads(Image.open(out / "n.png").text["nucleus-models"])["nuclei_count"] == len(rows)
    gj = json.loads((out / "n.geojson").read_text())
    assert len(gj["features"]) == len(rows)
    assert (out / "n.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return doc


def _outputs(out: Path) -> list[str]:
    return [
        str(out / "n.anot"),
        "--nuclei_csv",
        str(out / "n.csv"),
        "--nuclei_geojson",
        str(out / "n.geojson"),
        "--overlay_image",
        str(out / "n.png"),
    ]


def test_end_to_end_on_cmu_small_region(shared_data: Path, tmp_path: Path) -> None:
    slide = shared_data / "wsi" / "CMU-1-Small-Region.svs"
    res = run_cli(
        "NucleusDetection",
        str(slide),
        *_outputs(tmp_path),
        "--model",
        "classical-he",
        "--analysis_roi",
        "500,600,1024,1024",
    )
    assert res.returncode == 0, res.stderr
    # the tiles fill 0.95 of the bar, writing the outputs the rest (it sat at
    # 1.0 while a whole slide's outputs were written)
    lines = res.stdout.splitlines()
    bar = [ln for ln in lines if ln.startswith("<filter-progress>")]
    assert bar[-2:] == [
        "<filter-progress>0.9500</filter-progress>",
        "<filter-progress>1.0000</filter-progress>",
    ]
    assert " nuclei (classical-he on cpu) in a 1024 x 1024 px region" in lines[-2]
    doc = _check_outputs(tmp_path, min_nuclei=200)
    # the region keeps the nuclei whose centroid (the CSV's x, y) lies in it
    xy = np.array([[float(r["x"]), float(r["y"])] for r in _csv_rows(tmp_path / "n.csv")])
    assert xy[:, 0].min() >= 500 and xy[:, 0].max() < 1524
    assert xy[:, 1].min() >= 600 and xy[:, 1].max() < 1624
    # and their outlines sit around those centroids (the mean of a simplified
    # outline's vertices is not the centroid, but near it)
    pts = np.array([np.mean(np.array(e["points"])[:, :2], axis=0) for e in doc["elements"]])
    off = np.hypot(*(pts - xy).T)
    assert np.median(off) < 1.0 and off.max() < 10
    assert doc["attributes"]["slide"]["mpp"] == pytest.approx(0.499, abs=1e-3)
    # the CSV's microns are its pixels at the slide's resolution
    um = np.array([[float(r["x_um"]), float(r["y_um"])] for r in _csv_rows(tmp_path / "n.csv")])
    np.testing.assert_allclose(um, xy * doc["attributes"]["slide"]["mpp"], atol=0.006)
    assert doc["attributes"]["warnings"] == [] and "WARNING" not in res.stderr
    # the versions of the libraries the run imported (the image's are not CI's)
    import histomicstk
    import large_image

    libraries = doc["attributes"]["libraries"]
    assert libraries["histomicstk"] == histomicstk.__version__
    assert libraries["large_image"] == large_image.__version__ and "numpy" in libraries


def test_end_to_end_on_monuseg_image_finds_the_annotated_nuclei(
    shared_data: Path, tmp_path: Path
) -> None:
    """A 40x MoNuSeg image without resolution metadata, with --input_mpp; most
    annotated nuclei get a detection inside them (hit-in-mask recall)."""
    from benchmark.datasets import get_dataset

    ds = get_dataset("monuseg", shared_data / "monuseg2018" / "train")
    sample = ds.load(ds.ids()[0])
    image = next((shared_data / "monuseg2018" / "train" / "images").glob(f"{sample.id}.tif"))
    res = run_cli(
        "NucleusDetection",
        str(image),
        *_outputs(tmp_path),
        "--model",
        "classical-he",
        "--input_mpp",
        "0.25",
    )
    assert res.returncode == 0, res.stderr
    doc = _check_outputs(tmp_path, min_nuclei=150)
    recall, precision = _hit_rates(tmp_path / "n.csv", sample.labels)
    assert recall > 0.5 and precision > 0.6, (recall, precision)
    assert doc["attributes"]["slide"]["mpp_source"] == "override"


def test_point_and_box_forms(tmp_path: Path) -> None:
    sample = REPO / "samples" / "CMU-1-Small-Region-crop.tif"
    for form, etype in (("point", "point"), ("box", "rectangle")):
        out = tmp_path / f"{form}.anot"
        res = run_cli(
            "NucleusDetection",
            str(sample),
            str(out),
            "--model",
            "classical-he",
            "--nuclei_annotation_format",
            form,
            "--analysis_roi",
            "0,0,400,400",
            "--scheduler",
            "multithreading",
            "--num_workers",
            "2",
        )
        assert res.returncode == 0, res.stderr
        doc = json.loads(out.read_text())
        validate_annotation(doc)
        assert doc["elements"] and {e["type"] for e in doc["elements"]} == {etype}


def test_whole_slide_region_as_a_separate_argument(tmp_path: Path) -> None:
    """``--analysis_roi -1,-1,-1,-1`` (a cron line, a shell) is the whole
    slide, as ``--analysis_roi=-1,-1,-1,-1`` and slicer_cli_web's
    ``-1, -1, -1, -1`` are; argparse alone took it for an option."""
    from nucleus_models.cli_support import join_negative_values

    assert join_negative_values(["in.svs", "--analysis_roi", "-1,-1,-1,-1", "--force"]) == [
        "in.svs",
        "--analysis_roi=-1,-1,-1,-1",
        "--force",
    ]
    assert join_negative_values(["--a", "-1.5,2e-3"]) == ["--a=-1.5,2e-3"]
    # one number, an option and a value after "--" stay as they are
    for argv in (["--x", "-1"], ["--x", "--y"], ["--", "--x", "-1,-1"], ["-1,-1"]):
        assert join_negative_values(argv) == argv
    sample = REPO / "samples" / "CMU-1-Small-Region-crop.tif"
    out = tmp_path / "o.anot"
    res = run_cli(
        "NucleusDetection", str(sample), str(out), "--model", "classical-he",
        "--analysis_roi", "-1,-1,-1,-1",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    doc = json.loads(out.read_text())
    assert doc["attributes"]["params"]["analysis_roi"] == [-1, -1, -1, -1]
    assert len(doc["elements"]) > 100


# ----------------------------------------------------------------- bad input
def _white(path: Path, *, mpp: float | None) -> Path:
    from conftest import write_pyramidal_tiff

    return write_pyramidal_tiff(path, np.full((300, 300, 3), 250, np.uint8), mpp=mpp)


def _bad_cases(tmp: Path, shared: Path) -> dict[str, tuple[list[str], str]]:
    sample = str(REPO / "samples" / "CMU-1-Small-Region-crop.tif")
    corrupt = tmp / "corrupt.svs"
    corrupt.write_bytes(np.random.default_rng(1).bytes(20000))
    truncated = tmp / "truncated.svs"
    truncated.write_bytes((shared / "wsi" / "CMU-1-Small-Region.svs").read_bytes()[:1_500_000])
    nompp = tmp / "nompp.png"
    from PIL import Image

    Image.fromarray(np.full((200, 200, 3), 120, np.uint8)).save(nompp)
    white = _white(tmp / "white.tif", mpp=0.5)
    return {
        "missing": ([str(tmp / "nope.svs")], "not found"),
        "empty input path": ([""], "the input image's path is empty"),
        "corrupt": ([str(corrupt)], "cannot open"),
        "truncated": ([str(truncated)], "truncated"),
        "no resolution": ([str(nompp)], "--input_mpp"),
        "roi outside": ([sample, "--analysis_roi", "5000,5000,100,100"], "outside the slide"),
        "empty tissue": ([str(white)], "no tissue"),
        "tile <= overlap": (
            [sample, "--analysis_tile_size", "32", "--analysis_tile_overlap", "40"],
            "overlap",
        ),
        "unknown model": ([sample, "--model", "resnet-imaginary"], "invalid choice"),
        "unknown parameter": ([sample, "--no_such_flag", "1"], "unrecognized arguments"),
        "bad roi": ([sample, "--analysis_roi", "1,2,3"], "analysis_roi"),
        "bad scheduler": ([sample, "--scheduler", "carrier-pigeon"], "scheduler"),
        # dask's own parsing failed in a traceback once the tiles were about to run
        "bad scheduler address": (
            [sample, "--scheduler", "localhost:abc"],
            "not a dask scheduler's address",
        ),
        "inproc address": ([sample, "--scheduler", "inproc://x"], "cannot reach dask scheduler"),
        "bad precision": ([sample, "--precision", "float16"], "invalid choice"),
        # resolutions no microscope has: a 256 px image once grew 200x and hung
        "mpp too coarse": ([sample, "--input_mpp", "100"], "250x finer than the image"),
        "mpp too fine": ([sample, "--input_mpp", "0.0001"], "input_mpp must be"),
        "mpp not a number": ([sample, "--input_mpp", "nan"], "input_mpp must be"),
        "roi infinite": ([sample, "--analysis_roi", "0,0,inf,10"], "finite"),
        "roi flat polygon": ([sample, "--analysis_roi", "0,0,10,10,20,20,30,30"], "no area"),
        "tile fraction": ([sample, "--min_fgnd_frac", "5"], "min_fgnd_frac"),
        "tile size 0": ([sample, "--analysis_tile_size", "0"], "analysis_tile_size must be"),
        # (below the model's own overlap: a modality warning came before the error)
        "tile under the overlap": (
            [sample, "--model", "unet-bbbc038", "--analysis_tile_size", "37"],
            "tile size (37) must be larger than the tile overlap (64, the model's default)",
        ),
        "batch size": ([sample, "--batch_size", "-9"], "batch_size must be"),
        # the classical models' thresholds: HistomicsTK's detector divides by
        # min_radius (a traceback), crossed radii kept no nucleus, a negative
        # value other than -1 was taken for -1, an intensity past 255 for all
        "radius 0": (
            [sample, "--model", "histomicstk-kofahi", "--max_radius", "0"],
            "max_radius must be above 0 pixels, got 0",
        ),
        "kofahi min radius 0": (
            [sample, "--model", "histomicstk-kofahi", "--min_radius", "0"],
            "min_radius must be above 0 pixels for model histomicstk-kofahi, got 0",
        ),
        "radii crossed": (
            [sample, "--model", "classical-he", "--min_radius", "10", "--max_radius", "2"],
            "min_radius 10 is larger than max_radius 2",
        ),
        "threshold -5": ([sample, "--model", "classical-he", "--min_radius", "-5"], "-1 (the"),
        "intensity 300": ([sample, "--foreground_threshold", "300"], "0-255"),
        "radius above the model's": (
            [sample, "--model", "classical-he", "--min_radius", "15"],
            "max_radius 12 (max_radius: model classical-he's own)",
        ),
        # what the value should be, not argparse's "invalid parseValue value"
        "roi not numbers": ([sample, "--analysis_roi", "1,2,x,4"], "'1,2,x,4': expected numbers"),
        "not a whole number": ([sample, "--batch_size", "abc"], "(Batch size): 'abc': expected a"),
        "not a boolean": ([sample, "--test_time_flips", "maybe"], "expected true or false"),
    }


def test_bad_input_one_line_nonzero_exit_no_output(shared_data: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    for case, (args, expected) in _bad_cases(inputs, shared_data).items():
        out = tmp_path / "out" / case.replace(" ", "_")
        out.mkdir(parents=True)
        res = run_cli(
            "NucleusDetection",
            args[0],
            str(out / "n.anot"),
            *args[1:],
            "--nuclei_csv",
            str(out / "n.csv"),
        )
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.returncode != 0, case
        assert len(lines) == 1, (case, res.stderr)
        assert lines[0].startswith("error: ") and expected in lines[0], (case, lines[0])
        assert list(out.iterdir()) == [], (case, list(out.iterdir()))
    shutil.rmtree(tmp_path / "out")


def test_bad_output_paths_fail_before_the_analysis(tmp_path: Path) -> None:
    """Output paths that cannot be written are refused up front in one line:
    the input is never overwritten and no output of the set is written."""
    sample = tmp_path / "in.tif"
    shutil.copy(REPO / "samples" / "CMU-1-Small-Region-crop.tif", sample)
    before = sample.read_bytes()
    anot = str(tmp_path / "o" / "n.anot")
    (tmp_path / "folder.anot").mkdir()
    os.mkfifo(tmp_path / "pipe.csv")  # (as /dev/null: written over by the rename, as root)
    cases = {
        "a pipe": ([anot, "--nuclei_csv", str(tmp_path / "pipe.csv")], "not a regular file"),
        "input as output": ([str(sample)], "is the input image"),
        "input as csv": ([anot, "--nuclei_csv", str(sample)], "is the input image"),
        "under a file": ([anot, "--nuclei_csv", f"{sample}/n.csv"], "is a file, not a folder"),
        "a folder": ([str(tmp_path / "folder.anot")], "is a folder"),
        # analysed, wrote nothing, exit 0
        "empty path": ([""], "path is empty"),
        "one file twice": ([anot, "--nuclei_csv", anot], "are the same file"),
        "overlay not png": ([anot, "--overlay_image", str(tmp_path / "o.jpg")], "name it .png"),
    }
    for case, (outputs, expected) in cases.items():
        res = run_cli(
            "NucleusDetection", str(sample), *outputs, "--model", "classical-he",
            "--analysis_roi", "0,0,300,300",
        )  # fmt: skip
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.returncode == 2 and len(lines) == 1, (case, res.stderr)
        assert lines[0].startswith("error: ") and expected in lines[0], (case, lines[0])
        assert "filter-progress" not in res.stdout, case  # refused before any tile
        assert sample.read_bytes() == before, case
        assert not (tmp_path / "o").exists() and not (tmp_path / "o.jpg").exists(), case
    assert list((tmp_path / "folder.anot").iterdir()) == []
    assert stat.S_ISFIFO(os.stat(tmp_path / "pipe.csv").st_mode)


def test_a_cancelled_run_writes_nothing(shared_data: Path, tmp_path: Path) -> None:
    """SIGTERM mid-run (a job cancelled in HistomicsUI stops its container):
    one error line, exit 143, no output and no temporary file left."""
    import signal

    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "cli", "NucleusDetection"]
    cmd += [str(shared_data / "wsi" / "CMU-1-Small-Region.svs"), str(out / "n.anot")]
    # two worker threads: the queued batches are dropped, not run before exiting
    cmd += ["--model", "classical-he", "--nuclei_csv", str(out / "n.csv"), "--num_workers", "2"]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the analysis has started
            if line.startswith("<filter-progress>"):
                break
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)
        waited = time.monotonic() - t0
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert waited < 8, waited  # docker's SIGKILL comes 10 s after SIGTERM
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: terminated"), err
    assert list(out.iterdir()) == []


def test_a_dask_run_stops_at_once_on_a_cancel_or_ctrl_c(shared_data: Path, tmp_path: Path) -> None:
    """The local dask cluster (``--scheduler multiprocessing``): a cancel
    (SIGTERM to this process, as ``docker stop`` sends) no longer waits for
    the workers' tiles in progress (2.5-3.4 s here, ~5 s reported, of
    docker's 10 s), and a Ctrl-C (SIGINT to the whole process group, as a
    terminal sends) is one line and exit 130, without each worker's
    traceback."""
    import signal

    cmd = [sys.executable, "-m", "cli", "NucleusDetection"]
    cmd += [str(shared_data / "wsi" / "CMU-1-Small-Region.svs"), str(tmp_path / "n.anot")]
    cmd += ["--model", "classical-he", "--scheduler", "multiprocessing", "--num_workers", "2"]
    cmd += ["--analysis_tile_size", "1536"]  # ~2 s a tile here: the old close waited for them
    from conftest import ctrl_c_heard

    for sig, code, message in (
        (signal.SIGTERM, 143, "terminated"),
        (signal.SIGINT, 130, "interrupted"),
    ):
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a process group of its own, as a terminal's job is
            preexec_fn=ctrl_c_heard,
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:  # a tile done: the cluster is up, its workers busy
                if line.startswith("<filter-progress>") and float(line[17:23]) > 0:
                    break
            if sig == signal.SIGINT:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
            t0 = time.monotonic()
            _, err = proc.communicate(timeout=30)
            waited = time.monotonic() - t0
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert proc.returncode == code, (sig, err)
        assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), (sig, err)
        assert waited < 1.5, (sig, waited)
        assert not (tmp_path / "n.anot").exists()


def test_the_dask_start_puts_both_signal_handlers_back_whatever_lands_between(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While the local cluster starts, SIGINT is ignored and SIGTERM noted.
    A signal landing between two of the handler changes (simulated: an
    exception right after each change) left SIGINT ignored for the rest of
    the process (after the first change), or SIGTERM only noted, a cancel
    lost for the rest of the run (a Ctrl-C after SIGINT was put back)."""
    import signal

    from nucleus_models.wsi.runner import _signals_held

    class Landed(BaseException):
        pass

    real = signal.signal
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    for nth in range(1, 5):
        calls: list[int] = []

        def changing(signum: int, handler: Any, nth: int = nth, calls: list[int] = calls) -> Any:
            old = real(signum, handler)
            calls.append(signum)
            if len(calls) == nth:
                raise Landed
            return old

        monkeypatch.setattr(signal, "signal", changing)
        with contextlib.suppress(Landed), _signals_held():
            pass
        monkeypatch.setattr(signal, "signal", real)
        after = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        real(signal.SIGINT, before[0])
        real(signal.SIGTERM, before[1])
        assert after == before, nth


def test_outputs_are_written_all_or_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure (or a cancel) while the outputs are written leaves none of
    them beside the others, no hidden file, and an earlier run's outputs as
    they were; without one, all of them are there."""
    from nucleus_models import io as nio
    from nucleus_models.detection import DetectionParams, detect_nuclei, write_outputs

    anot, table, image = tmp_path / "n.anot", tmp_path / "n.csv", tmp_path / "n.png"
    result = detect_nuclei(
        DetectionParams(
            inputImageFile=str(REPO / "samples" / "CMU-1-Small-Region-crop.tif"),
            outputNucleiAnnotationFile=str(anot),
            outputNucleiCSVFile=str(table),
            outputOverlayImageFile=str(image),
            model="classical-he",
            analysis_roi=[0.0, 0.0, 300.0, 300.0],
        )
    )
    anot.write_text("the earlier run's")

    def cancelled(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(nio, "write_overlay", cancelled)  # the last one written
    with pytest.raises(KeyboardInterrupt):
        write_outputs(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.anot"]
    assert anot.read_text() == "the earlier run's"
    monkeypatch.undo()
    assert write_outputs(result) == [str(anot), str(table), str(image)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.anot", "n.csv", "n.png"]
    assert len(json.loads(anot.read_text())["elements"]) == len(result.nuclei) > 0


def test_histomicstk_baseline_runs_quietly(tmp_path: Path) -> None:
    """HistomicsTK's Kofahi detector through the CLI: nuclei, and a clean job
    log (its scikit-image deprecation warnings are nothing a user can act on)."""
    out = tmp_path / "k.anot"
    res = run_cli(
        "NucleusDetection", str(REPO / "samples" / "CMU-1-Small-Region-crop.tif"), str(out),
        "--model", "histomicstk-kofahi", "--analysis_roi", "0,0,400,400",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    doc = json.loads(out.read_text())
    # at its documented 20x defaults it finds about one nucleus in four (EXPERIMENTS.md)
    assert len(doc["elements"]) > 0 and doc["attributes"]["model"]["name"] == "histomicstk-kofahi"


@pytest.mark.filterwarnings("ignore:`RegionProperties.weighted_centroid`:FutureWarning")
def test_histomicstk_kofahi_finds_what_histomicstk_finds(tmp_path: Path) -> None:
    """The baseline is HistomicsTK's own per-tile detector (``detect_tile_nuclei``,
    which its NucleiDetection CLI runs) given the same slide statistics: one
    tile over the whole 20x sample, the same nuclei at the same centroids.
    A 0.499 um/px slide is read on its own pixels, as HistomicsTK reads it
    at 20x: resampled to 0.5 (blurred), the detector found a fifth fewer."""
    import types

    import large_image
    from histomicstk.segmentation.nuclear import detect_tile_nuclei

    from nucleus_models.stain import REFERENCE_MU_LAB, REFERENCE_STD_LAB, reinhard_stats
    from nucleus_models.wsi.tissue import tissue_mask

    sample = REPO / "samples" / "CMU-1-Small-Region-crop.tif"
    out, table = tmp_path / "k.anot", tmp_path / "k.csv"
    res = run_cli(
        "NucleusDetection", str(sample), str(out), "--model", "histomicstk-kofahi",
        "--analysis_tile_size", "2048", "--nuclei_csv", str(table),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    ours = np.array([[float(r["x"]), float(r["y"])] for r in _csv_rows(table)])
    img = large_image.open(str(sample)).getRegion(format="numpy")[0][:, :, :3]
    assert json.loads(out.read_text())["attributes"]["tiles"]["analysis_mpp"] == 0.499
    stats = reinhard_stats(img, tissue_mask(img, modality="brightfield"))  # the thumbnail's
    stains = {f"stain_{i}": s for i, s in enumerate(("hematoxylin", "eosin", "null"), 1)}
    args = types.SimpleNamespace(
        reference_mu_lab=REFERENCE_MU_LAB, reference_std_lab=REFERENCE_STD_LAB,
        **stains, **{f"{k}_vector": [-1, -1, -1] for k in stains},
        foreground_threshold=60, min_radius=6, max_radius=20, min_nucleus_area=80,
        local_max_search_radius=10, ignore_border_nuclei=False,
        nuclei_annotation_format="bbox", remove_overlapping_nuclei_segmentation=False,
    )  # fmt: skip
    h, w = img.shape[:2]
    tile = {"tile": img, "gx": 0, "gy": 0, "gwidth": w, "gheight": h, "width": w, "height": h}
    tile["tile_overlap"] = {"left": 0, "right": 0, "top": 0, "bottom": 0}
    theirs = detect_tile_nuclei(
        tile,
        args,
        src_mu_lab=np.array(stats["src_mu_lab"]),
        src_sigma_lab=np.array(stats["src_sigma_lab"]),
    )
    # theirs are pixel indices; ours put pixel i's centre at i + 0.5 (nucleus_models.instances)
    theirs_xy = np.array([e["center"][:2] for e in theirs]) + 0.5
    assert len(ours) == len(theirs_xy) > 150
    order = lambda xy: xy[np.lexsort((xy[:, 1], xy[:, 0]))]  # noqa: E731
    np.testing.assert_allclose(order(ours), order(theirs_xy), atol=0.02)


def test_settings_a_model_does_not_use_are_reported(tmp_path: Path) -> None:
    """The classical models' thresholds given to a U-Net, and --device cuda to
    a CPU-only model: the run says so in its warnings (its parameters record
    what was asked, so they must not read as if it was used)."""
    sample = REPO / "samples" / "CMU-1-Small-Region-crop.tif"
    out = tmp_path / "u.anot"
    res = run_cli(
        "NucleusDetection", str(sample), str(out), "--analysis_roi", "0,0,300,300",
        "--foreground_threshold", "200", "--min_radius", "3",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    (warning,) = json.loads(out.read_text())["attributes"]["warnings"]
    assert warning.startswith("foreground_threshold, min_radius: settings of the classical")
    res = run_cli(
        "NucleusDetection", str(sample), str(out), "--analysis_roi", "0,0,300,300",
        "--model", "classical-he", "--device", "cuda", "--min_radius", "3",
        "--num_workers", "500",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    device, workers = json.loads(out.read_text())["attributes"]["warnings"]
    assert device == "model classical-he runs on the cpu only: --device cuda was not used"
    assert workers.startswith("num_workers 500 is more than twice the")


def test_the_thresholds_a_run_used_are_recorded() -> None:
    """A classical model's thresholds set for the run are what its outputs
    record as the model's (they recorded the model's defaults instead:
    min_radius 4 for a run with min_radius 3)."""
    from nucleus_models.detection import DetectionParams, detect_nuclei

    sample = REPO / "samples" / "CMU-1-Small-Region-crop.tif"
    res = detect_nuclei(
        DetectionParams(
            inputImageFile=str(sample),
            model="classical-he",
            analysis_roi=[0, 0, 300, 300],
            min_radius=3,
            foreground_threshold=100,
        )
    )
    assert res.provenance()["model"]["thresholds"] == {
        "foreground_threshold": 100,
        "min_radius": 3,
        "max_radius": 12.0,
        "local_max_search_radius": 4.0,
        "min_nucleus_area": 20,
    }
    assert res.provenance()["params"]["min_radius"] == 3


def test_an_input_mpp_unlike_the_slides_own_is_warned_about() -> None:
    """--input_mpp replaced a slide's recorded resolution without a word
    (0.25 on the 0.499 um/px sample: every nucleus analysed at half its
    size); within 10 % of it (a rounder value), nothing is said."""
    from nucleus_models.detection import DetectionParams, detect_nuclei

    sample = REPO / "samples" / "CMU-1-Small-Region-crop.tif"
    runs = {
        mpp: detect_nuclei(
            DetectionParams(
                inputImageFile=str(sample),
                model="classical-he",
                analysis_roi=[0, 0, 300, 300],
                input_mpp=mpp,
            )
        ).warnings
        for mpp in (0.25, 0.5, -1.0)
    }
    (warned,) = runs[0.25]
    assert warned.startswith("--input_mpp 0.25 overrides the slide's own 0.499 um/px"), warned
    assert "analysed at 0.5x their size" in warned
    assert runs[0.5] == runs[-1.0] == []


def test_a_small_tile_overlap_is_warned_about_in_the_pixels_it_means() -> None:
    """An overlap below the largest nucleus may cut nuclei at seams: said,
    with the grid its pixels are on (the model's, not the slide's)."""
    from nucleus_models.detection import DetectionParams, detect_nuclei

    sample = REPO / "samples" / "CMU-1-Small-Region-crop.tif"
    params = DetectionParams(
        inputImageFile=str(sample), model="unet-monuseg", analysis_roi=[0, 0, 400, 400]
    )
    params.analysis_tile_overlap = 8
    (warned,) = detect_nuclei(params).warnings
    assert warned.startswith("tile overlap 8 px is smaller than the largest nucleus ("), warned
    assert "px; pixels at the analysis resolution, 0.4 um/px): nuclei may be cut" in warned


def test_library_rejects_unknown_model() -> None:
    from nucleus_models.errors import ModelError
    from nucleus_models.models import get_model

    with pytest.raises(ModelError, match="available: classical-he"):
        get_model("no-such-model")


@pytest.mark.parametrize("name", sorted(CLI_LIST))
def test_model_choices_are_the_registered_models(name: str) -> None:
    from nucleus_models.models import list_models

    model = _xml_params(name).get("model")
    if model is None:
        return  # this CLI takes no model
    assert set(model.elements) == set(list_models())
    assert model.default in list_models()


@pytest.mark.parametrize("model", ["unet-monuseg", "unet-monuseg-reinhard", "unet-monuseg-fast"])
def test_learned_model_finds_the_annotated_nuclei(
    shared_data: Path, tmp_path: Path, model: str
) -> None:
    """The shipped H&E U-Net through the CLI on a MoNuSeg image: detections fall in nuclei."""
    from benchmark.datasets import get_dataset

    ds = get_dataset("monuseg", shared_data / "monuseg2018" / "train")
    sample = ds.load(ds.ids()[-1])
    image = next((shared_data / "monuseg2018" / "train" / "images").glob(f"{sample.id}.tif"))
    out = tmp_path / "n.anot"
    res = run_cli(
        "NucleusDetection",
        str(image),
        str(out),
        "--input_mpp",
        "0.25",
        "--model",
        model,
        "--nuclei_csv",
        str(tmp_path / "n.csv"),
        "--device",
        "cpu",
    )
    assert res.returncode == 0, res.stderr
    doc = json.loads(out.read_text())
    validate_annotation(doc)
    # the job log (HistomicsUI shows it) says what was found and written
    (summary,) = [ln for ln in res.stdout.splitlines() if " nuclei (" in ln]
    assert summary.startswith(f"{doc['attributes']['nuclei_count']} nuclei ({model} "), summary
    assert summary.endswith("; wrote n.anot, n.csv"), summary
    assert (
        doc["attributes"]["model"]["name"] == model
        and len(doc["attributes"]["model"]["sha256"]) == 64
    )
    # what "auto" resolved to is recorded (the CPU and the model's spec decide)
    from nucleus_models.models import get_spec
    from nucleus_models.models.unet import pick_precision

    spec = get_spec(model)
    precision = pick_precision(
        "auto",
        "cpu",
        cpu_bfloat16=bool(spec.thresholds.get("cpu_bfloat16", 0)),
        cpu_int8=bool(spec.thresholds.get("cpu_int8", 0)),
    )
    runtime = doc["attributes"]["runtime"]
    assert {k: runtime[k] for k in ("device", "precision")} == {
        "device": "cpu",
        "precision": precision,
    }
    # an int8 network records which calibration it ran with, and only it does
    assert ("int8_calibration" in runtime) == (precision == "int8")
    # and auto ran what it picked (no fall-back from an int8 build that failed)
    assert not [w for w in doc["attributes"]["warnings"] if "cannot run" in w]
    recall, precision = _hit_rates(tmp_path / "n.csv", sample.labels)
    assert recall > 0.75 and precision > 0.75, (recall, precision)


def test_fluorescence_model_on_the_ndpi_slide(shared_data: Path, tmp_path: Path) -> None:
    """The shipped fluorescence U-Net on the DAPI NDPI pyramid finds nuclei in a region."""
    slide = next((shared_data / "wsi").glob("*.ndpi"))
    out = tmp_path / "f.anot"
    res = run_cli(
        "NucleusDetection",
        str(slide),
        str(out),
        "--model",
        "unet-bbbc038",
        "--analysis_roi=1000,1000,1024,1024",
        "--device",
        "cpu",
    )
    assert res.returncode == 0, res.stderr
    doc = json.loads(out.read_text())
    validate_annotation(doc)
    assert len(doc["elements"]) > 20
    assert doc["attributes"]["warnings"] == [] and "looks like" not in res.stderr


def test_a_brightfield_model_on_a_fluorescence_slide_is_warned_about(
    shared_data: Path, tmp_path: Path
) -> None:
    """The default H&E model on the DAPI slide runs, but says the result is likely wrong."""
    slide = next((shared_data / "wsi").glob("*.ndpi"))
    out = tmp_path / "he.anot"
    res = run_cli("NucleusDetection", str(slide), str(out), "--analysis_roi=1000,1000,1024,1024")
    assert res.returncode == 0, res.stderr
    warned = [line for line in res.stderr.splitlines() if "looks like fluorescence" in line]
    assert len(warned) == 1 and "unet-monuseg" in warned[0] and "unet-bbbc038" in warned[0]
    (recorded,) = json.loads(out.read_text())["attributes"]["warnings"]
    assert recorded in warned[0]


def test_the_modality_check_looks_at_the_analysis_region() -> None:
    from nucleus_models.detection import modality_mismatch
    from nucleus_models.models import get_spec

    thumb = np.full((100, 200, 3), 235, np.uint8)
    thumb[:, 100:] = 10  # right half dark, as fluorescence
    he, fl = get_spec("unet-monuseg"), get_spec("unet-bbbc038")
    scale = 0.1  # thumbnail pixels per base pixel: the slide is 2000 x 1000
    cases = [
        (he, [0, 0, 900, 1000], []),  # bright region, brightfield model
        (he, [1100, 0, 900, 1000], ["looks like fluorescence"]),
        (fl, [1100, 0, 900, 1000], []),
        (fl, [0, 0, 2000, 300], []),  # half and half: undecided, no warning
        (fl, [0, 0, 900, 1000], ["looks like brightfield", "unet-monuseg"]),
    ]
    for spec, region, expected in cases:
        msg = modality_mismatch(thumb, scale, region, spec)
        warnings = [msg] if msg else []
        assert len(warnings) == (1 if expected else 0), (spec.name, region, warnings)
        assert all(e in warnings[0] for e in expected)


def test_a_greyscale_slide_is_warned_about_with_a_colour_model(
    shared_data: Path, tmp_path: Path
) -> None:
    """A grey scan of H&E runs with the H&E model, warned that it misses
    nuclei without colour; the colour sample and CCAgT's pale silver stains
    (median chroma 6-14) are not warned about, nor a fluorescence model."""
    import tifffile
    from PIL import Image

    from nucleus_models.detection import colourless
    from nucleus_models.models import get_spec
    from nucleus_models.wsi.tissue import tissue_mask

    colour = tifffile.imread(REPO / "samples" / "CMU-1-Small-Region-crop.tif")[..., :3]
    luma = np.asarray(Image.fromarray(colour).convert("L"))
    grey = np.repeat(luma[..., None], 3, axis=2)
    path = tmp_path / "grey.tif"
    tifffile.imwrite(path, grey, resolution=(1e4 / 0.499, 1e4 / 0.499), resolutionunit="CENTIMETER")
    out = tmp_path / "grey.anot"
    res = run_cli("NucleusDetection", str(path), str(out))
    assert res.returncode == 0, res.stderr
    warned = [line for line in res.stderr.splitlines() if "no colour" in line]
    assert len(warned) == 1 and "unet-monuseg" in warned[0]
    (recorded,) = json.loads(out.read_text())["attributes"]["warnings"]
    assert recorded in warned[0]

    he, fl = get_spec("unet-monuseg"), get_spec("unet-bbbc038")
    whole = [0, 0, colour.shape[1], colour.shape[0]]

    def check(rgb: np.ndarray, scale: float, region: list[int], spec: object) -> str | None:
        return colourless(rgb, tissue_mask(rgb), scale, region, spec)

    assert check(grey, 1.0, whole, he) and check(grey, 1.0, whole, fl) is None
    assert check(colour, 1.0, whole, he) is None
    for jpg in sorted((shared_data / "ccagt_agnor" / "images").glob("*.jpg")):
        silver = np.asarray(Image.open(jpg).convert("RGB"))[::4, ::4]
        assert check(silver, 0.25, [0, 0, 1600, 1200], he) is None, jpg.name


def test_the_greyscale_check_reads_the_tissue_inside_a_polygon_roi(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``colourless`` is given the tissue the analysis reads: inside a
    polygon ROI's outline, not its whole bounding box."""
    from nucleus_models import detection
    from nucleus_models.detection import DetectionParams, detect_nuclei

    seen: list[np.ndarray] = []

    class Seen(Exception):
        pass

    def record(thumb: np.ndarray, tissue: np.ndarray, *args: object) -> None:
        seen.append(tissue.copy())
        raise Seen

    monkeypatch.setattr(detection, "colourless", record)
    # a triangle (a fourth vertex on its long side) over the 1024-px sample's top right
    roi = [0.0, 0.0, 1023.0, 0.0, 1023.0, 1023.0, 512.0, 512.0]
    with pytest.raises(Seen):
        detect_nuclei(
            DetectionParams(
                inputImageFile=str(REPO / "samples" / "CMU-1-Small-Region-crop.tif"),
                outputNucleiAnnotationFile=str(tmp_path / "n.anot"),
                analysis_roi=roi,
            )
        )
    (tissue,) = seen
    h, w = tissue.shape
    assert tissue[: h // 10, -w // 10 :].any()  # inside, near the right angle
    assert not tissue[-h // 10 :, : w // 10].any()  # the box's bottom-left, outside


def test_the_greyscale_check_ignores_black_fill_and_sees_a_small_region() -> None:
    """A colour slide whose unscanned area reads as black (transparent) is
    not called greyscale: the brightfield tissue mask takes the black for
    tissue, and with more black than stain its median chroma was 0. A grey
    region of 12x12 thumbnail pixels, all tissue, is warned about (every
    other pixel of it left 36, fewer than the 64 the check needs)."""
    import tifffile
    from PIL import Image

    from nucleus_models.detection import colourless
    from nucleus_models.models import get_spec
    from nucleus_models.wsi.tissue import tissue_mask

    he = get_spec("unet-monuseg")
    colour = tifffile.imread(REPO / "samples" / "CMU-1-Small-Region-crop.tif")[..., :3]
    h, w = colour.shape[:2]
    slide = np.full((h, 3 * w, 3), 240, np.uint8)  # glass beside the scanned tissue
    slide[:, :w] = colour
    slide[:, 2 * w :] = 0  # the unscanned third
    whole = [0, 0, 3 * w, h]
    assert colourless(slide, tissue_mask(slide), 1.0, whole, he) is None
    grey = np.repeat(np.asarray(Image.fromarray(slide).convert("L"))[..., None], 3, axis=2)
    assert colourless(grey, tissue_mask(grey), 1.0, whole, he)  # (grey tissue is still seen)

    small = np.full((100, 100, 3), 240, np.uint8)
    texture = np.random.default_rng(0).integers(60, 170, (12, 12), dtype=np.uint8)
    small[40:52, 40:52] = texture[..., None]  # 12x12 px of grey tissue
    tissue = tissue_mask(small)
    assert tissue[40:52, 40:52].all()
    assert colourless(small, tissue, 1.0, [40, 40, 12, 12], he)


@pytest.mark.parametrize(
    ("raised", "says"),
    [
        ("ram", "error: out of memory: use a smaller analysis_tile_size or batch_size"),
        ("gpu", "error: GPU out of memory: use a smaller batch_size or analysis_tile_size"),
        ("pool", "error: a post-processing worker process died (killed, e.g. for memory):"),
    ],
)
def test_running_out_of_memory_is_one_line(
    raised: str, says: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Out of memory in the CPU's RAM, on the GPU (torch's OutOfMemoryError,
    a RuntimeError), or a pipeline worker killed (BrokenProcessPool): one
    line and exit 2, not a traceback. Other RuntimeErrors still raise."""
    from concurrent.futures.process import BrokenProcessPool

    import torch

    from nucleus_models.cli_support import run_cli as run_cli_here

    error = {
        "ram": MemoryError(),
        "gpu": torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
        "pool": BrokenProcessPool("A process in the process pool was terminated abruptly"),
    }[raised]

    def main(args: object) -> None:
        raise error

    script = REPO / "cli" / "NucleusDetection" / "NucleusDetection.py"
    monkeypatch.setattr(sys, "argv", ["NucleusDetection", "in.tif", "out.anot"])
    with pytest.raises(SystemExit) as stop:
        run_cli_here(main, str(script))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(says) and "\n" not in err, err

    def other(args: object) -> None:
        raise RuntimeError("something else")

    with pytest.raises(RuntimeError, match="something else"):
        run_cli_here(other, str(script))
