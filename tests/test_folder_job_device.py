"""The folder job's device, precision and batch size (NucleusDetection's
parameters): taken by both of its entry points, checked before any request,
passed to each slide's detection, recorded; which of them redo a done slide;
and a slide that runs out of memory."""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest

from nucleus_models.dsa import FolderJobParams

REPO = Path(__file__).resolve().parents[1]
NEW = ("batch_size", "device", "precision")


def _xml(name: str) -> dict[str, Any]:
    from ctk_cli import CLIModule
    from slicer_cli_web import CLIArgumentParser  # noqa: F401  (its ctk_cli adjustments)

    return {p.name: p for p in CLIModule(str(REPO / "cli" / name / f"{name}.xml")).parameters()}


def _cron_parser() -> Any:
    from nucleus_models.dsa.__main__ import build_parser

    return build_parser()


def test_the_folder_job_takes_device_precision_and_batch_size_as_nucleus_detection_does() -> None:
    """NucleusFolderJob had neither the device, the arithmetic nor the batch
    size, though its out-of-memory advice names batch_size: now its XML
    has NucleusDetection's three parameters as they are there, the cron
    takes them (both spellings, the same choices) and they reach
    FolderJobParams."""
    det, job = _xml("NucleusDetection"), _xml("NucleusFolderJob")
    for name in NEW:
        a, b = det[name], job[name]
        for attr in ("typ", "label", "description", "longflag", "default", "elements"):
            assert getattr(b, attr, None) == getattr(a, attr, None), (name, attr)
    ns = _cron_parser().parse_args(
        ["folder-job", "--api-url", "u", "--folder", "f", "--batch_size", "4",
         "--device", "cpu", "--precision", "int8"]
    )  # fmt: skip
    params = FolderJobParams.from_namespace(ns)
    assert (params.batch_size, params.device, params.precision) == (4, "cpu", "int8")
    ns = _cron_parser().parse_args(["folder-job", "--api-url", "u", "--folder", "f"])
    params = FolderJobParams.from_namespace(ns)
    assert (params.batch_size, params.device, params.precision) == (-1, "auto", "auto")
    sub = next(a for a in _cron_parser()._actions if a.dest == "command")
    by_dest = {a.dest: a for a in sub.choices["folder-job"]._actions}  # type: ignore[attr-defined]
    for name in ("device", "precision"):
        assert list(by_dest[name].choices) == det[name].elements


def test_device_and_batch_size_redo_no_slide_and_precision_only_when_asked() -> None:
    """Where and how fast a slide runs does not change its nuclei: no redo.
    An arithmetic asked for can (int8 against float32), so it redoes the
    slides; auto, what every earlier result ran with, keeps their hash."""
    import hashlib

    from nucleus_models.models import get_spec

    plain = FolderJobParams(inputFolder="f")
    old = {"analysis": plain.analysis, "model_sha256": get_spec(plain.model).sha256}
    old.update({k: getattr(plain, k) for k in ("model", "analysis_roi", "input_mpp")})
    old.update({k: getattr(plain, k) for k in ("nuclei_annotation_format", "annotation_name")})
    old.update({k: getattr(plain, k) for k in ("analysis_tile_size", "analysis_tile_overlap")})
    old.update({k: getattr(plain, k) for k in ("min_fgnd_frac", "foreground_threshold")})
    old.update({k: getattr(plain, k) for k in ("min_radius", "max_radius")})
    old.update({k: getattr(plain, k) for k in ("local_max_search_radius", "min_nucleus_area")})
    blob = json.dumps(old, sort_keys=True, separators=(",", ":"))
    assert plain.params_hash() == hashlib.sha256(blob.encode()).hexdigest()[:16]
    for same in ({"device": "cpu"}, {"device": "cuda"}, {"batch_size": 2}):
        assert FolderJobParams(inputFolder="f", **same).params_hash() == plain.params_hash()
    hashes = {
        p: FolderJobParams(inputFolder="f", precision=p).params_hash()
        for p in ("auto", "float32", "bfloat16", "int8")
    }
    assert len(set(hashes.values())) == 4 and hashes["auto"] == plain.params_hash()


class _NoServer:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the server was asked ({name})")


@pytest.mark.parametrize(
    ("kw", "gpu", "says"),
    [
        ({"device": "cuda"}, False, "device 'cuda' requested but no CUDA GPU is available"),
        (
            {"precision": "int8"},
            True,
            "precision int8 runs on CPUs only (device cuda): use float32 or bfloat16",
        ),
        ({"device": "gpu"}, False, "device must be one of auto, cpu, cuda, not 'gpu'"),
        ({"precision": "half"}, False, "precision must be one of auto, float32, bfloat16, int8"),
    ],
)
def test_a_device_or_precision_no_slide_can_run_fails_before_any_request(
    kw: dict[str, Any], gpu: bool, says: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused once, in NucleusDetection's words, before the server is asked,
    rather than recorded as a failure on every slide of the folder (int8 on
    a machine whose GPU auto picks, too). A model without a network given
    cuda runs on the CPU, with NucleusDetection's warning, on a machine
    without a GPU too."""
    import torch

    from nucleus_models.dsa import run_folder_job
    from nucleus_models.errors import ParameterError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    with pytest.raises(ParameterError) as exc:
        run_folder_job(_NoServer(), FolderJobParams(inputFolder="F", **kw))  # type: ignore[arg-type]
    assert str(exc.value) == says or str(exc.value).startswith(says + ","), exc.value
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    FolderJobParams(inputFolder="F", model="classical-he", device="cuda").check()


def _script(name: str) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"cli_{name}", REPO / "cli" / name / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_device_cuda_without_a_gpu_is_the_line_nucleus_detection_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """From HistomicsUI (the NucleusFolderJob CLI) and from cron alike: one
    line, exit 2, before the (here unreachable) server is asked, as the
    NucleusDetection CLI says it."""
    import signal

    import torch

    from nucleus_models.cli_support import run_cli
    from nucleus_models.dsa import __main__ as cron

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("GIRDER_TOKEN", "t0ken")
    slide = REPO / "samples" / "CMU-1-Small-Region-crop.tif"
    api = "http://127.0.0.1:9/api/v1"
    sigterm = signal.getsignal(signal.SIGTERM)
    said = []
    try:
        for name, argv in (
            ("NucleusDetection", [str(slide), str(tmp_path / "o.anot"), "--device", "cuda"]),
            ("NucleusFolderJob", ["F", "--api-url", api, "--device", "cuda"]),
            ("cron", ["folder-job", "--api-url", api, "--folder", "F", "--device", "cuda"]),
        ):
            with pytest.raises(SystemExit) as stop:
                if name == "cron":
                    cron.main(argv)
                else:
                    script = _script(name)
                    monkeypatch.setattr(sys, "argv", [name, *argv])
                    run_cli(script.main, str(REPO / "cli" / name / f"{name}.py"))
            lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
            assert stop.value.code == 2 and len(lines) == 1, (name, lines)
            said.append(lines[0])
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    assert said == ["error: device 'cuda' requested but no CUDA GPU is available"] * 3
    assert not (tmp_path / "o.anot").exists()


def test_the_parameters_reach_each_slides_detection_and_what_ran_is_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """batch_size, device and precision reach the detection; the annotation,
    the item's record, the summary's row and the job's log line say how the
    model ran (the summary and log did not); the record of a
    slide done on the CPU still counts as done for another device or batch
    size, not for another arithmetic."""
    import tifffile
    from conftest import disk_centres, draw_disks

    from nucleus_models import detection
    from nucleus_models.dsa import folder_job
    from nucleus_models.dsa.annotations import PushResult

    img = draw_disks(384, 384, disk_centres(384, 384, (128,), radius=6.0), 6.0)
    path = tmp_path / "disks.tif"
    tifffile.imwrite(path, img, photometric="rgb")
    records: dict[str, Any] = {}
    pushed: list[Any] = []

    def push(client: Any, item_id: str, doc: Any, **kw: Any) -> PushResult:
        pushed.append(doc)
        return PushResult("NEW", 0)

    monkeypatch.setattr(folder_job, "SWEEP_SETTLE_S", 0.0)
    monkeypatch.setattr(folder_job, "read_record", lambda c, i, k: records.get(i))
    monkeypatch.setattr(folder_job, "write_record", lambda c, i, k, r: records.__setitem__(i, r))
    monkeypatch.setattr(folder_job, "push_annotation", push)
    monkeypatch.setattr(folder_job, "find_annotations", lambda *a, **k: [{"_id": "NEW"}])
    monkeypatch.setattr(folder_job, "dedupe", lambda *a, **k: [])
    seen: list[Any] = []
    real = detection.detect_nuclei
    monkeypatch.setattr(detection, "detect_nuclei", lambda p, **k: seen.append(p) or real(p, **k))

    class Slide:
        def get(self, path: str, parameters: Any = None) -> Any:
            return {"_id": "f", "name": "disks.tif", "size": path_.stat().st_size}

        def download_file(self, file_id: str, dest: str, *, size: int | None = None) -> str:
            Path(dest).write_bytes(path_.read_bytes())
            return dest

    path_ = path
    item = {"_id": "I", "name": "disks.tif", "folderId": "F", "largeImage": {"fileId": "f"}}
    params = FolderJobParams(
        inputFolder="F", input_mpp=0.4, device="cpu", precision="float32", batch_size=3
    )
    with caplog.at_level(logging.INFO, logger="nucleus_models.dsa"):
        (out,) = folder_job._run_items(Slide(), params, {"name": "F"}, [item], _Lease(), None, None)  # type: ignore[arg-type]
    assert out.status == "done", out.error
    assert (seen[0].batch_size, seen[0].device, seen[0].precision) == (3, "cpu", "float32")
    runtime = {"device": "cpu", "precision": "float32"}
    assert pushed[0].attributes["runtime"] == runtime
    assert records["I"]["provenance"]["runtime"] == runtime
    assert records["I"]["provenance"]["job"]["batch_size"] == 3
    assert out.runtime == "float32 on cpu"
    rows = list(csv.DictReader(io.StringIO(folder_job._summary_csv([out], params, "h").decode())))
    assert rows[0]["runtime"] == "float32 on cpu"
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("item 1/1")]
    assert said[-1] == f"item 1/1 'disks.tif': done {out.nuclei_count} (float32 on cpu)", said

    def done_for(**kw: Any) -> bool:
        again = FolderJobParams(**{**params.public(), **kw})
        return folder_job._done_record(Slide(), item, again.key(), again.params_hash()) is not None  # type: ignore[arg-type]

    assert done_for(device="auto", batch_size=-1) and done_for(device="cuda")
    assert not done_for(precision="int8") and not done_for(precision="auto")
    # a skipped slide's row says how it ran when it was done
    (skip,) = folder_job._run_items(Slide(), params, {"name": "F"}, [item], _Lease(), None, None)  # type: ignore[arg-type]
    assert skip.status == "skipped" and skip.runtime == "float32 on cpu"


class _Lease:
    def check(self) -> bool:
        return False


@pytest.mark.parametrize(("raised", "wrapped"), [("gpu", False), ("ram", False), ("gpu", True)])
def test_a_slide_out_of_memory_fails_alone_in_a_line_naming_the_folder_jobs_parameters(
    raised: str, wrapped: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPU out of memory on one slide was that slide's failure, but said in
    torch's words ("CUDA out of memory. Tried to allocate ...", no advice),
    and a RAM one as a bare "MemoryError"; now the line names the folder
    job's batch_size and analysis_tile_size with their values (and device
    cpu for the GPU), the next slide still runs, and the GPU memory torch
    kept cached for the failed batch is given back."""
    import torch

    from nucleus_models.dsa import folder_job
    from nucleus_models.models import get_spec

    monkeypatch.setattr(folder_job, "SWEEP_SETTLE_S", 0.0)
    monkeypatch.setattr(folder_job, "read_record", lambda c, i, k: None)
    monkeypatch.setattr(folder_job, "write_record", lambda c, i, k, r: r)
    monkeypatch.setattr(folder_job, "find_annotations", lambda *a, **k: [])
    monkeypatch.setattr(folder_job, "dedupe", lambda *a, **k: [])
    emptied: list[bool] = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    error = {
        "gpu": torch.cuda.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of"
            " 79.19 GiB of which 1.5 GiB is free.\nIncluding non-PyTorch memory ..."
        ),
        "ram": MemoryError(),
    }[raised]

    def process(client: Any, params: Any, item: dict[str, Any], *rest: Any) -> Any:
        if item["_id"] == "0" and not wrapped:
            raise error  # (a tile worker's error reaches the job as it was raised)
        if item["_id"] == "0":
            try:
                raise error
            except Exception as exc:
                raise RuntimeError("a tile failed") from exc
        return folder_job.ItemOutcome(item["_id"], item["name"], "done", nuclei_count=5), {}

    monkeypatch.setattr(folder_job, "_process", process)
    items = [{"_id": str(i), "name": f"{i}.svs"} for i in range(2)]
    params = FolderJobParams(inputFolder="F", batch_size=16)
    out = folder_job._run_items(None, params, {"name": "F"}, items, _Lease(), None, None)  # type: ignore[arg-type]
    assert [o.status for o in out] == ["failed", "done"]
    tile = get_spec(params.model).tile_size
    now = f"with batch_size 16 and analysis_tile_size {tile} (the model's): "
    want = {
        "gpu": f"GPU out of memory {now}use a smaller batch_size or analysis_tile_size, or device"
        " cpu (CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of"
        " 79.19 GiB of which 1.5 GiB is free)",
        "ram": f"out of memory {now}use a smaller analysis_tile_size or batch_size",
    }[raised]
    assert out[0].error == want
    if raised == "gpu":
        assert emptied == [True]
    for flag in ("--batch_size", "--analysis_tile_size", "--device"):  # the cron's spellings
        assert any(flag in a.option_strings for a in _all_cron_actions()), flag


def _all_cron_actions() -> list[Any]:
    sub = next(a for a in _cron_parser()._actions if a.dest == "command")
    return list(sub.choices["folder-job"]._actions)  # type: ignore[attr-defined]


def test_other_failures_keep_their_own_words() -> None:
    from nucleus_models.dsa import folder_job

    assert folder_job._out_of_memory(RuntimeError("boom"), FolderJobParams(inputFolder="F")) is None
