"""The folder job's ``frame`` (NucleusDetection's ``--frame``): taken by both
of its entry points as NucleusDetection takes it, passed to each slide's
detection, in the settings hash only when given, a slide without the channel
asked for failing alone, and the frame each slide was read in said in the
summary and the log."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nucleus_models.dsa import FolderJobParams

REPO = Path(__file__).resolve().parents[1]
SIZE = 256
#: nuclei of the DAPI channel: disks of radius 10 every 50 px
CENTRES = np.array([(x, y) for y in range(30, SIZE, 50) for x in range(30, SIZE, 50)], float)


def _xml(name: str) -> dict[str, Any]:
    from ctk_cli import CLIModule
    from slicer_cli_web import CLIArgumentParser  # noqa: F401  (its ctk_cli adjustments)

    return {p.name: p for p in CLIModule(str(REPO / "cli" / name / f"{name}.xml")).parameters()}


def _group(cli: str, name: str) -> str:
    """The label of the XML group holding parameter ``name``."""
    from ctk_cli import CLIModule

    module = CLIModule(str(REPO / "cli" / cli / f"{cli}.xml"))
    return next(g.label for g in module if any(p.name == name for p in g))


def _cron(*args: str) -> FolderJobParams:
    from nucleus_models.dsa.__main__ import build_parser

    ns = build_parser().parse_args(["folder-job", "--api-url", "u", "--folder", "f", *args])
    return FolderJobParams.from_namespace(ns)


def test_the_folder_job_takes_frame_as_nucleus_detection_does() -> None:
    """NucleusFolderJob had no frame: every multi-frame slide of a folder got
    the automatic choice. Its XML now has NucleusDetection's parameter as it
    is there (in the same group), and the cron takes it."""
    det, job = _xml("NucleusDetection"), _xml("NucleusFolderJob")
    for attr in ("typ", "label", "description", "longflag", "default"):
        assert getattr(job["frame"], attr, None) == getattr(det["frame"], attr, None), attr
    assert _group("NucleusFolderJob", "frame") == _group("NucleusDetection", "frame")
    assert _cron("--frame", "DAPI").frame == "DAPI"
    assert _cron().frame == "" == FolderJobParams(inputFolder="f").frame


def test_an_empty_frame_keeps_the_hash_of_earlier_results_and_one_given_changes_it() -> None:
    """Slides done before the parameter existed (all with the automatic
    choice) are not redone for an empty frame (nor -1, its other spelling);
    a frame given redoes them, the same channel in another case does not."""
    from nucleus_models.models import get_spec

    plain = FolderJobParams(inputFolder="f")
    old = {"analysis": plain.analysis, "model_sha256": get_spec(plain.model).sha256}
    for k in ("model", "analysis_roi", "input_mpp", "nuclei_annotation_format"):
        old[k] = getattr(plain, k)
    for k in ("annotation_name", "analysis_tile_size", "analysis_tile_overlap", "min_fgnd_frac"):
        old[k] = getattr(plain, k)
    for k in ("foreground_threshold", "min_radius", "max_radius", "local_max_search_radius"):
        old[k] = getattr(plain, k)
    old["min_nucleus_area"] = plain.min_nucleus_area
    blob = json.dumps(old, sort_keys=True, separators=(",", ":"))
    assert plain.params_hash() == hashlib.sha256(blob.encode()).hexdigest()[:16]

    def h(frame: str) -> str:
        return FolderJobParams(inputFolder="f", frame=frame).params_hash()

    assert h("") == h("-1") == h(" ") == plain.params_hash()
    assert h("DAPI") == h("dapi") == h(" Dapi ") != plain.params_hash()
    assert h("1") == h("01") != h("dapi")
    assert h("0") != plain.params_hash()  # (frame 0 asked for: not the automatic choice)


def _planes(names: tuple[str, ...]) -> np.ndarray:
    """One 12-bit plane a channel: bright disks in DAPI, a bright square
    (stained tissue, no nuclei) in the others."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    planes = np.full((len(names), SIZE, SIZE), 100, np.uint16)
    for i, name in enumerate(names):
        if name == "DAPI":
            for cx, cy in CENTRES:
                planes[i][(yy - cy) ** 2 + (xx - cx) ** 2 < 10**2] = 3000
        else:
            planes[i, 40:160, 40:160] = 2000
    return planes


def _ome(path: Path, names: tuple[str, ...]) -> Path:
    import tifffile

    meta = {"axes": "CYX", "Channel": {"Name": list(names)}}
    tifffile.imwrite(path, _planes(names), ome=True, tile=(128, 128), metadata=meta)
    return path


class _Lease:
    def check(self) -> bool:
        return False


class _Slides:
    """A client whose items' files are the given local files (file id = item id)."""

    def __init__(self, files: dict[str, Path]):
        self.files = files

    def get(self, path: str, parameters: Any = None) -> Any:
        f = self.files[path.removeprefix("file/")]
        return {"_id": path, "name": f.name, "size": f.stat().st_size}

    def download_file(self, file_id: str, dest: str, *, size: int | None = None) -> str:
        Path(dest).write_bytes(self.files[file_id].read_bytes())
        return dest


def _found(centroids: np.ndarray) -> int:
    """How many of the DAPI disks have a nucleus within 4 px of their centre."""
    if not len(centroids):
        return 0
    d = np.hypot(*(CENTRES[:, None, :] - centroids[None, :, :]).transpose(2, 0, 1))
    return int((d.min(axis=1) < 4).sum())


def test_each_slide_is_read_in_the_frame_given_and_one_without_that_channel_fails_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``frame dapi`` reaches each slide's detection: the slide whose DAPI is
    its second channel is analysed in it (the disks found, the record's
    provenance, the summary's ``frame`` column and the log line say frame
    1), and the next slide, which has no DAPI channel, fails with
    NucleusDetection's one line naming its own file (not the name it was
    downloaded as), without stopping the job; run again, the first is
    skipped and its row still says the frame it was read in."""
    from nucleus_models import detection
    from nucleus_models.dsa import folder_job
    from nucleus_models.dsa.annotations import PushResult

    files = {
        "A": _ome(tmp_path / "a.ome.tif", ("CD3", "DAPI", "CK")),
        "B": _ome(tmp_path / "b.ome.tif", ("CD3", "CK")),
    }
    records: dict[str, Any] = {}
    monkeypatch.setattr(folder_job, "SWEEP_SETTLE_S", 0.0)
    monkeypatch.setattr(folder_job, "read_record", lambda c, i, k: records.get(i))
    monkeypatch.setattr(folder_job, "write_record", lambda c, i, k, r: records.__setitem__(i, r))
    monkeypatch.setattr(folder_job, "push_annotation", lambda *a, **k: PushResult("NEW", 0))
    monkeypatch.setattr(folder_job, "find_annotations", lambda *a, **k: [{"_id": "NEW"}])
    monkeypatch.setattr(folder_job, "dedupe", lambda *a, **k: [])
    found: list[int] = []
    real = detection.detect_nuclei

    def detect(p: Any, **kw: Any) -> Any:
        assert p.frame == "dapi"
        r = real(p, **kw)
        found.append(_found(r.nuclei.centroids))
        return r

    monkeypatch.setattr(detection, "detect_nuclei", detect)
    items = [
        {"_id": k, "name": f.name, "folderId": "F", "largeImage": {"fileId": k}}
        for k, f in files.items()
    ]
    params = FolderJobParams(
        inputFolder="F", model="unet-bbbc038", input_mpp=0.5, precision="float32", frame="dapi"
    )
    client: Any = _Slides(files)
    lease: Any = _Lease()
    with caplog.at_level(logging.INFO, logger="nucleus_models.dsa"):
        out = folder_job._run_items(client, params, {"name": "F"}, items, lease, None, None)
    assert [o.status for o in out] == ["done", "failed"], [o.error for o in out]
    assert found == [len(CENTRES)]
    assert records["A"]["provenance"]["slide"]["frame"] == {
        "index": 1,
        "channel": "DAPI",
        "frames": 3,
        "chosen": "given",
    }
    assert out[0].frame == "1 (DAPI)" and out[1].frame == ""
    assert out[1].error == (
        "frame 'dapi': b.ome.tif has no channel of that name; it has 2 frames: 0 CD3, 1 CK"
        " (give a channel's name or a frame's index)"
    )
    assert records["B"]["status"] == "failed" and records["B"]["error"] == out[1].error
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("item 1/2")]
    assert said[-1] == f"item 1/2 'a.ome.tif': done {out[0].nuclei_count} in frame 1 (DAPI)" + (
        f" ({out[0].runtime})"
    ), said
    rows = list(csv.DictReader(io.StringIO(folder_job._summary_csv(out, params, "h").decode())))
    assert [r["frame"] for r in rows] == ["1 (DAPI)", ""]
    again = folder_job._run_items(client, params, {"name": "F"}, items[:1], lease, None, None)
    assert again[0].status == "skipped" and again[0].frame == "1 (DAPI)"


def test_the_hash_reads_a_frame_as_nucleus_detection_does() -> None:
    """``frame_key`` (the settings hash's frame) took ``++1`` for an index
    and ended the job in a ValueError traceback before any slide (int()
    refuses it), where NucleusDetection reads it as a channel's name (a
    slide without one fails alone): spellings the hash takes alike are read
    alike, and every spelling has a hash."""
    from nucleus_models.dsa.folder_job import frame_key
    from nucleus_models.errors import ParameterError
    from nucleus_models.wsi.slide import Slide, choose_frame

    meta = {"frames": [{"IndexC": c} for c in (0, 1)], "channels": ["CD8", "DAPI"]}
    slide = Slide("x.tif", 10, 10, 0.5, "metadata", None, meta)

    def read(frame: str) -> object:
        try:
            return choose_frame(slide, frame).index
        except ParameterError:
            return "refused"

    spellings = ["", "-1", " ", "1", "+1", "01", " 1 ", "++1", "+-1", "1.0", "-0", "DAPI"]
    spellings += ["dapi", "\u0661", "\u00b9"]
    for a in spellings:
        FolderJobParams(inputFolder="f", frame=a).params_hash()
        for b in spellings:
            if frame_key(a) == frame_key(b):
                assert read(a) == read(b), (a, b)
