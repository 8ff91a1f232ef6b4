"""``nucleus-bench eval`` on bad input: one ``error:`` line, a non-zero exit, nothing written.

Also what an output folder holds after a run that replaces an earlier one,
or after an interrupted one. Real MoNuSeg data from ``../shared/data``
(missing data fails the tests); at most one image is segmented.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from benchmark.__main__ import main

# a folder no one may write in, root included (sysfs)
UNWRITABLE = Path("/sys")


@pytest.fixture(scope="module")
def monuseg_root(shared_data: Path) -> Path:
    root = shared_data / "monuseg2018" / "train"
    assert (root / "images").is_dir(), f"missing shared data: {root}"
    return root


def _eval(
    root: Path, out: Path, *extra: str, model: str = "classical-he", limit: str = "1"
) -> list[str]:
    return ["eval", "--dataset", "monuseg", "--root", str(root), "--model", model,
            "--out", str(out), "--limit", limit, "--quiet", "--no_report", *extra]  # fmt: skip


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: "), err
    return err


@pytest.mark.parametrize(
    ("model", "option", "words"),
    [
        ("classical-he", "foreground_threshold=abc", ["foreground_threshold", "a number"]),
        ("classical-he", "min_nucleus_area=20.5", ["min_nucleus_area", "an integer"]),
        ("unet-monuseg", "precision=int4", ["precision", "float32, bfloat16, int8"]),
        # outside what the option can be: the run would find nothing
        ("unet-monuseg-fast", "fg_threshold=7", ["fg_threshold=7", "expected 0-1"]),
        ("classical-he", "foreground_threshold=300", ["expected 0-255"]),
        ("classical-he", "min_radius=-2", ["min_radius=-2", "expected 0-inf"]),
        # radii no detector can use: HistomicsTK's divides by min_radius (a
        # traceback), and a min_radius above max_radius kept nothing
        ("histomicstk-kofahi", "min_radius=0", ["min_radius must be above 0"]),
        ("classical-he", "min_radius=13", ["min_radius 13 is larger than max_radius 12"]),
        # unknown keys: named, with the model's own
        ("classical-he", "bogus=3", ["'bogus'", "foreground_threshold", "min_radius"]),
        ("unet-monuseg", "foreground_threshold=80", ["'foreground_threshold'", "fg_threshold"]),
    ],
)
def test_a_bad_model_option_is_refused_before_anything_is_written(
    monuseg_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    model: str,
    option: str,
    words: list[str],
) -> None:
    out = tmp_path / "out"
    assert main(_eval(monuseg_root, out, "--model_option", option, model=model)) == 2
    err = _one_error_line(capsys)
    assert all(w in err for w in words), err
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["eval"], "the following arguments are required: --dataset"),
        (["eval", "--dataset", "x", "--root", "r", "--model", "m", "--out", "o", "--limit", "a"],
         "nucleus-bench eval: argument --limit: invalid int value: 'a'"),
        (["trian"], "invalid choice: 'trian'"),
    ],
)  # fmt: skip
def test_a_usage_error_is_one_line_without_the_usage(
    capsys: pytest.CaptureFixture[str], argv: list[str], words: str
) -> None:
    """argparse printed its usage before the error (five lines for eval)."""
    assert main(argv) == 2
    assert words in _one_error_line(capsys)


def test_model_options_are_read_as_the_types_the_model_takes() -> None:
    from benchmark.evaluate import check_model_options
    from nucleus_models.models import get_spec

    given = {"foreground_threshold": "80", "min_nucleus_area": 30.0}
    checked = check_model_options(get_spec("classical-he"), given)
    assert checked == {"foreground_threshold": 80.0, "min_nucleus_area": 30}
    assert type(checked["min_nucleus_area"]) is int
    unet = {"fg_threshold": 0.6, "seed_mode": "hmax", "tta": 1.0, "device": "cpu"}
    assert check_model_options(get_spec("unet-monuseg"), unet) == {**unet, "tta": 1}


def test_a_classical_models_radii_are_checked_with_its_other_options() -> None:
    """Crossed radii (given, or one the model's own) are refused with the
    other options, before any sample is read: the model refused them only
    when the first sample was segmented."""
    from benchmark.evaluate import check_model_options
    from nucleus_models.errors import ParameterError
    from nucleus_models.models import get_spec

    with pytest.raises(ParameterError, match="min_radius 10 is larger than max_radius 2"):
        check_model_options(get_spec("classical-he"), {"min_radius": "10", "max_radius": "2"})
    with pytest.raises(ParameterError, match="max_radius: model histomicstk-kofahi's own"):
        check_model_options(get_spec("histomicstk-kofahi"), {"min_radius": 25})


@pytest.mark.parametrize("where", ["a file", "under a file", "unwritable"])
def test_an_out_that_cannot_be_written_is_one_line(
    monuseg_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep")
    out = {"a file": a_file, "under a file": a_file / "out", "unwritable": UNWRITABLE}[where]
    assert main(_eval(monuseg_root, out)) == 2
    err = _one_error_line(capsys)
    assert str(out) in err
    assert a_file.read_text() == "keep" and sorted(tmp_path.iterdir()) == [a_file]


@pytest.mark.parametrize(
    ("limit", "mpp", "words"),
    [
        ("0", [], "limit must be at least 1"),
        ("-1", [], "limit must be at least 1"),
        ("1", ["--mpp", "-1"], "not a microscope's resolution"),
        ("1", ["--mpp", "0"], "not a microscope's resolution"),
        # (500 made OpenCV ask for 394 GB; 0.0001 shrank the images to nothing)
        ("1", ["--mpp", "500"], "not a microscope's resolution"),
        ("1", ["--mpp", "0.0001"], "not a microscope's resolution"),
    ],
)
def test_limit_and_mpp_out_of_range_are_refused(
    monuseg_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    limit: str,
    mpp: list[str],
    words: str,
) -> None:
    out = tmp_path / "out"
    assert main(_eval(monuseg_root, out, *mpp, limit=limit)) == 2
    assert words in _one_error_line(capsys)
    assert not out.exists()


def test_an_image_far_coarser_than_the_model_is_refused_before_resampling() -> None:
    """An ``mpp.txt`` of 100 um/px (inside the range a folder accepts) would
    have the image upsampled 250x for a 0.4 um/px model."""
    from nucleus_models.detection import segment_image
    from nucleus_models.errors import ParameterError

    with pytest.raises(ParameterError, match="too coarse an image"):
        segment_image(np.zeros((64, 64, 3), np.uint8), mpp=100.0, model="classical-he")


def test_a_root_that_is_a_file_is_called_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "image.tif"
    root.write_bytes(b"")
    assert main(_eval(root, tmp_path / "out")) == 2
    err = _one_error_line(capsys)
    assert "not a folder" in err and "does not exist" not in err


def _earlier_run(out: Path) -> None:
    """An earlier run's outputs: two predictions and their metrics."""
    (out / "predictions").mkdir(parents=True)
    for sid in ("earlier-a", "earlier-b"):
        tifffile.imwrite(out / "predictions" / f"{sid}.tif", np.zeros((4, 4), np.uint32))
    (out / "metrics.json").write_text('{"rows": [{"id": "earlier-a"}, {"id": "earlier-b"}]}')


def test_a_run_replaces_the_predictions_of_an_earlier_one(
    monuseg_root: Path, tmp_path: Path
) -> None:
    """A smaller run into the folder of a larger one leaves no stale predictions."""
    out = tmp_path / "out"
    _earlier_run(out)
    assert main(_eval(monuseg_root, out)) == 0
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    assert len(rows) == 1
    assert sorted(p.name for p in (out / "predictions").iterdir()) == [f"{rows[0]['id']}.tif"]
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "predictions"]


def test_ctrl_c_is_one_line_exit_130_and_keeps_the_earlier_run(
    monuseg_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import nucleus_models.detection

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(nucleus_models.detection, "segment_image", interrupted)
    out = tmp_path / "out"
    _earlier_run(out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    try:
        rc = main(_eval(monuseg_root, out))
    except KeyboardInterrupt:
        rc = None
    assert rc == 130
    assert _one_error_line(capsys) == "error: interrupted"
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "predictions"]


def test_a_run_that_fails_midway_leaves_no_folder_it_made(
    monuseg_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An image that cannot be read, found while evaluating: one line, and
    the --out folders the run made are gone; a folder that was there stays."""
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    xml = sorted((monuseg_root / "annotations").glob("*.xml"))[0]
    (root / "annotations" / xml.name).write_bytes(xml.read_bytes())
    tif = (monuseg_root / "images" / xml.name).with_suffix(".tif")
    (root / "images" / tif.name).write_bytes(tif.read_bytes()[:5000])  # truncated
    out = tmp_path / "new" / "out"
    assert main(_eval(root, out)) == 2
    _one_error_line(capsys)
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    assert main(_eval(root, kept)) == 2
    _one_error_line(capsys)
    assert kept.is_dir() and not any(kept.iterdir())


@pytest.mark.parametrize("suffix", [".tif", ".png"])
def test_a_truncated_image_file_is_one_line(tmp_path: Path, suffix: str) -> None:
    """tifffile returns no pixels for a TIFF cut short and Pillow raises for
    a PNG: either is one DatasetError naming the file, not a traceback."""
    from PIL import Image

    from benchmark.datasets import DatasetError
    from benchmark.datasets.base import read_image

    whole = tmp_path / f"whole{suffix}"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(whole)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 3])
    assert read_image(whole).shape == (256, 256, 3)
    with pytest.raises(DatasetError, match=f"cut{suffix}: cannot read the image"):
        read_image(cut)
    with pytest.raises(DatasetError, match="gone.png: no such file"):
        read_image(tmp_path / "gone.png")


@pytest.mark.parametrize("args", [["models", "--json"], ["datasets"]])
def test_output_into_a_closed_pipe_is_quiet(args: list[str]) -> None:
    """``nucleus-bench models --json | head`` ended in a BrokenPipeError
    traceback once head had its lines; now it stops quietly, as cat does."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader has gone before the first line
    try:
        res = subprocess.run(
            [sys.executable, "-m", "benchmark", *args],
            cwd=Path(__file__).resolve().parents[1],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write)
    assert res.stderr == "" and res.returncode == 141
