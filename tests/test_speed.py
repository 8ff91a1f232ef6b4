"""The speed benchmark's input builder (timings themselves are reported, not asserted)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def test_mosaic_reuses_images_in_turn_and_is_a_readable_pyramid(tmp_path: Path) -> None:
    import large_image

    from benchmark.speed import make_mosaic

    src = tmp_path / "src"
    src.mkdir()
    for i, colour in enumerate([(200, 0, 0), (0, 0, 200)]):
        Image.fromarray(np.full((64, 80, 3), colour, np.uint8)).save(src / f"im{i}.png")
    out = make_mosaic(str(src), tmp_path / "m.tif", grid=3, mpp=0.25)
    ts = large_image.open(str(out))
    meta = ts.getMetadata()
    assert (meta["sizeX"], meta["sizeY"]) == (3 * 80, 3 * 64)
    assert abs(ts.getNativeMagnification()["mm_x"] - 0.25e-3) < 1e-9
    arr, _ = ts.getRegion(format=large_image.tilesource.TILE_FORMAT_NUMPY)
    # cells alternate red, blue, red, ... in reading order
    centres = [arr[32 + 64 * (k // 3), 40 + 80 * (k % 3), :3] for k in range(9)]
    reds = [int(c[0]) > int(c[2]) for c in centres]
    assert reds == [k % 2 == 0 for k in range(9)]


def test_the_mosaic_is_removed_after_the_timing(tmp_path: Path, monkeypatch) -> None:
    """A 10 x 10 MoNuSeg mosaic is ~125 MB: it must not stay behind in /tmp,
    whether the timing succeeds or fails."""
    import argparse

    import pytest

    from benchmark import speed

    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(np.full((64, 80, 3), 128, np.uint8)).save(src / "im.png")
    seen: list[Path] = []

    def fake_run(args: argparse.Namespace, command: str | None) -> int:
        seen.append(Path(args.slide))
        assert seen[-1].is_file()
        if len(seen) == 2:
            raise RuntimeError("timing failed")
        return 0

    monkeypatch.setattr(speed, "_run", fake_run)
    args = argparse.Namespace(
        mosaic_from=str(src), mosaic_grid=2, mosaic_mpp=0.25, slide="", repeat=1, out=""
    )
    assert speed.run(args) == 0
    with pytest.raises(RuntimeError):
        speed.run(args)
    assert len(seen) == 2 and not any(p.exists() or p.parent.exists() for p in seen)


def test_a_failing_timed_cli_is_a_one_line_error(shared_data: Path, capsys) -> None:
    """An unknown model (the CLI refuses it) ends ``nucleus-bench speed`` with
    exit 2 and one line naming the CLI and its complaint, not a traceback."""
    from benchmark.__main__ import main

    slide = shared_data / "wsi" / "CMU-1-Small-Region.svs"
    assert slide.is_file(), f"missing shared data: {slide}"
    args = ["speed", "--slide", str(slide), "--model", "no-such-model", "--skip_histomicstk"]
    assert main([*args, "--analysis_roi", "0,0,64,64"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("error: NucleusDetection (no-such-model) failed: ")
    assert "invalid choice: 'no-such-model'" in err
    assert err.count("error:") == 1  # the CLI's own "error: " is not repeated


def test_speed_times_the_model_nucleus_detection_runs_by_default() -> None:
    """Without --model, `speed` times what a HistomicsUI user gets: the XML's default."""
    from ctk_cli import CLIModule

    from benchmark.__main__ import build_parser

    xml = Path(__file__).resolve().parents[1] / "cli" / "NucleusDetection" / "NucleusDetection.xml"
    default = {p.name: p for p in CLIModule(str(xml)).parameters()}["model"].default
    args = build_parser(["speed"]).parse_args(["speed", "--slide", "s.svs"])
    assert args.model == default == "unet-monuseg"


def _fake_timing(calls: list[list[str]]):  # noqa: ANN202
    """A stand-in for :func:`benchmark.speed.time_cli` that records the commands."""

    def time_cli(cmd: list[str], out_file: Path, name: str) -> dict:
        calls.append(cmd)
        return {"seconds": 2.0, "nuclei": 10, "stages": {}, "runtime": {}, "tiles": {}}

    return time_cli


def _speed_args(shared_data: Path, *extra: str) -> list[str]:
    slide = shared_data / "wsi" / "CMU-1-Small-Region.svs"
    assert slide.is_file(), f"missing shared data: {slide}"
    return ["speed", "--slide", str(slide), "--skip_histomicstk", "--model", "classical-he",
            "--analysis_roi", "0,0,64,64", "--input_mpp", "0.5", *extra]  # fmt: skip


def test_speed_json_records_its_provenance(shared_data: Path, tmp_path: Path, monkeypatch) -> None:
    """As eval's metrics.json: package version, model and sha256, parameters, command, time."""
    import json

    from benchmark import speed
    from benchmark.__main__ import main
    from nucleus_models import __version__
    from nucleus_models.models import get_spec

    calls: list[list[str]] = []
    monkeypatch.setattr(speed, "time_cli", _fake_timing(calls))
    out = tmp_path / "s.json"
    assert main(_speed_args(shared_data, "--repeat", "2", "--out", str(out))) == 0
    assert len(calls) == 2
    doc = json.loads(out.read_text())
    assert doc["rows"][0]["nuclei"] == 10
    prov = doc["provenance"]
    assert set(prov) == {"package_version", "libraries", "model", "params", "created", "command"}
    assert prov["package_version"] == __version__
    spec = get_spec("classical-he")
    assert prov["model"] == {
        "name": spec.name,
        "sha256": spec.sha256,
        "mpp": spec.mpp,
        "modality": spec.modality,
    }
    assert prov["params"]["repeat"] == 2 and prov["params"]["input_mpp"] == 0.5
    assert prov["command"].startswith("nucleus-bench speed --slide ")
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]  # no temporary file left


@pytest.mark.parametrize("case", ["out under a file", "out a folder", "out unwritable", "repeat 0"])
def test_speed_refuses_bad_input_before_timing(
    shared_data: Path, tmp_path: Path, monkeypatch, capsys, case: str
) -> None:
    from benchmark import speed
    from benchmark.__main__ import main

    calls: list[list[str]] = []
    monkeypatch.setattr(speed, "time_cli", _fake_timing(calls))
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep")
    extra = {
        "out under a file": ["--out", str(a_file / "s.json")],
        "out a folder": ["--out", str(tmp_path)],
        "out unwritable": ["--out", "/sys/s.json"],  # sysfs: not even root may write there
        "repeat 0": ["--repeat", "0", "--out", str(tmp_path / "s.json")],
    }[case]
    assert main(_speed_args(shared_data, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ")
    assert ("--repeat must be at least 1" if case == "repeat 0" else "--out") in err
    assert calls == []  # refused before any timing
    assert sorted(tmp_path.iterdir()) == [a_file] and a_file.read_text() == "keep"


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--mosaic_from", "MISSING"], "not a folder"),
        (["--mosaic_from", "EMPTY"], "has no .tif/.png/.jpg images"),
        (["--mosaic_from", "IMAGES", "--mosaic_grid", "0"], "--mosaic_grid 0"),
        (["--mosaic_from", "IMAGES", "--mosaic_mpp", "0"], "--mosaic_mpp 0"),
        (["--mosaic_from", "IMAGES", "--mosaic_mpp", "-0.25"], "--mosaic_mpp -0.25"),
    ],
)
def test_a_mosaic_that_cannot_be_made_is_one_line(
    shared_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    words: str,
) -> None:
    from benchmark.__main__ import main

    (tmp_path / "empty").mkdir()
    where = {
        "MISSING": str(tmp_path / "missing"),
        "EMPTY": str(tmp_path / "empty"),
        "IMAGES": str(shared_data / "monuseg2018" / "train" / "images"),
    }
    argv = ["speed", "--skip_histomicstk", "--model", "classical-he"]
    assert main(argv + [where.get(a, a) for a in extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and words in err, err


def test_speed_counts_a_polygon_rois_own_area_not_its_bounding_box() -> None:
    from benchmark.speed import _area_mpx

    sample = str(Path(__file__).resolve().parents[1] / "samples" / "CMU-1-Small-Region-crop.tif")
    assert _area_mpx(sample, "-1,-1,-1,-1", -1) == 1024 * 1024 / 1e6
    assert _area_mpx(sample, "0,0,400,300", -1) == 0.12
    # a right triangle (a fourth vertex on its hypotenuse): half its bounding box
    assert _area_mpx(sample, "0,0, 400,0, 200,200, 0,400", -1) == pytest.approx(0.08)
    # two overlapping squares count their union once; one reaches past the slide
    two = "0,0, 200,0, 200,200, 0,200, -1,-1, 100,100, 300,100, 300,300, 100,300"
    assert _area_mpx(sample, two, -1) == pytest.approx((2 * 200 * 200 - 100 * 100) / 1e6)
    past = "924,924, 1224,924, 1224,1224, 924,1224"
    assert _area_mpx(sample, past, -1) == pytest.approx(100 * 100 / 1e6)
