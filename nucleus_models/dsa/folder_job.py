"""The folder job: run an analysis on every large image of a Girder folder.

For each large-image item (in name order) :func:`run_folder_job` downloads
the slide, runs the analysis, pushes the annotation (replacing the previous
one of the same analysis) and writes scores and provenance to the item's
metadata; then it uploads a summary CSV to the folder, replacing the previous
one. The item metadata is the ledger: an item whose record says ``done`` with
the same parameters hash (analysis, model, model sha256, parameters), and
whose recorded annotation is still there, is skipped, so a re-run after a
crash resumes where the crash happened. A failing slide is recorded (in the
summary and the item's metadata) and the job goes on.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import PurePath
from typing import Any

from ..errors import NucleusModelsError
from .annotations import (
    BatchedDocument,
    dedupe,
    delete_annotation,
    find_annotations,
    push_annotation,
)
from .client import (
    AuthenticationError,
    DSAClient,
    DSAError,
    GirderRequestError,
    GirderUnavailable,
    redact,
)
from .lease import FolderBusy, FolderLease
from .metadata import read_record, write_record

__all__ = [
    "ANALYSES",
    "FolderJobParams",
    "ItemOutcome",
    "AnalysisOutput",
    "run_folder_job",
    "summary_name",
]

log = logging.getLogger(__name__)

#: Wait before the final sweep, so a metadata write made by another job just
#: after this run's last one has landed when the records are read back.
SWEEP_SETTLE_S = 0.5
#: Slides in a row whose requests went unanswered after every retry before the
#: job stops (one slide's file failing on the server does not stop it)
UNANSWERED_SLIDES = 3

Progress = Callable[[float], None]
#: told, in a line, what a long step of a slide's analysis does (the job's log)
Note = Callable[[str], None]

_DETECTION_FIELDS = (
    "model",
    "analysis_roi",
    "input_mpp",
    "nuclei_annotation_format",
    "annotation_name",
    "analysis_tile_size",
    "analysis_tile_overlap",
    "min_fgnd_frac",
    "foreground_threshold",
    "min_radius",
    "max_radius",
    "local_max_search_radius",
    "min_nucleus_area",
    "test_time_flips",
    "precision",
    "frame",
)
#: where and how fast a run goes, not what it finds: outside the settings hash
#: (a slide done on the GPU is not redone on the CPU, nor for another batch size)
_RUNTIME_FIELDS = ("scheduler", "num_workers", "device", "batch_size")
#: detection fields added after results were stored under settings hashes,
#: with the value all those results had: a field at that value is left out
#: of the hash, so results made before the field existed are not redone.
#: ``precision``: int8 or bfloat16 asked for can change a few nuclei against
#: float32, so asking for one redoes slides; ``auto`` (every earlier result)
#: is the machine's choice, as the device is, and redoes none. ``frame``:
#: empty (the automatic choice, what every earlier result was made with) keeps
#: the hash; a frame asked for redoes the slides
_LATER_FIELDS: dict[str, Any] = {"test_time_flips": False, "precision": "auto", "frame": ""}
#: the values of ``device`` (NucleusDetection's menu)
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class FolderJobParams:
    """Parameters of the folder job; field names are the NucleusFolderJob CLI's XML names."""

    inputFolder: str
    girderApiUrl: str = ""
    girderToken: str = field(default="", repr=False)
    analysis: str = "NucleusDetection"
    analysis_key: str = ""
    force: bool = False
    model: str = "unet-monuseg"
    analysis_roi: list[float] = field(default_factory=lambda: [-1.0, -1.0, -1.0, -1.0])
    input_mpp: float = -1.0
    nuclei_annotation_format: str = "polygon"
    annotation_name: str = ""
    analysis_tile_size: int = -1
    analysis_tile_overlap: int = -1
    min_fgnd_frac: float = 0.0
    foreground_threshold: float = -1.0
    min_radius: float = -1.0
    max_radius: float = -1.0
    local_max_search_radius: float = -1.0
    min_nucleus_area: float = -1.0
    test_time_flips: bool = False
    batch_size: int = -1
    device: str = "auto"
    precision: str = "auto"
    #: the frame of a multi-frame slide: an index or a channel name (any
    #: case); empty: each slide's nuclear-stain channel, else frame 0
    #: (NucleusDetection's ``frame``)
    frame: str = ""
    scheduler: str = ""
    num_workers: int = 0

    @classmethod
    def from_namespace(cls, ns: Any) -> FolderJobParams:
        """Build from an argparse namespace (unknown attributes are ignored)."""
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: getattr(ns, k) for k in names if hasattr(ns, k)})

    def check(self) -> None:
        """One-line errors for values no slide could use, before connecting."""
        from ..detection import DetectionParams, check_params
        from ..models import get_spec
        from ..wsi import parse_roi

        if self.analysis not in ANALYSES:
            raise NucleusModelsError(
                f"unknown analysis {self.analysis!r}; available: {', '.join(ANALYSES)}"
            )
        spec = get_spec(self.model)
        fields = {k: getattr(self, k) for k in _DETECTION_FIELDS + _RUNTIME_FIELDS}
        det = DetectionParams(inputImageFile="", **fields)
        check_params(det)
        parse_roi(self.analysis_roi)
        self._check_runtime(spec.name, det.model_options())

    def _check_runtime(self, model: str, options: dict[str, Any]) -> None:
        """A device or precision no slide could run with (``cuda`` without a
        GPU, ``int8`` on a GPU, a model without int8) fails here, in
        NucleusDetection's words, not once per slide: the model is built
        as each slide's analysis builds it (and is then reused by it)."""
        from ..errors import ParameterError
        from ..models.unet import PRECISIONS

        if self.device not in DEVICES:
            raise ParameterError(f"device must be one of {', '.join(DEVICES)}, not {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ParameterError(
                f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}"
            )
        if self.device == "auto" and self.precision == "auto":
            return  # (nothing to refuse: the model is built with the first slide)
        from ..wsi.runner import shared_model

        shared_model(model, options)

    def key(self) -> str:
        """The analysis key: annotations and metadata records are per key."""
        return self.analysis_key or self.analysis

    def settings(self) -> dict[str, Any]:
        """What determines the result: analysis, model (and its sha256) and parameters."""
        from ..models import get_spec

        spec = get_spec(self.model)
        fields = {k: getattr(self, k) for k in _DETECTION_FIELDS}
        fields["frame"] = frame_key(self.frame)
        return {
            "analysis": self.analysis,
            "model_sha256": spec.sha256,
            **{k: v for k, v in fields.items() if k not in _LATER_FIELDS or v != _LATER_FIELDS[k]},
        }

    def params_hash(self) -> str:
        """sha256 (16 hex) of :meth:`settings`: equal hashes mean equal results."""
        blob = json.dumps(self.settings(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def public(self) -> dict[str, Any]:
        """The parameters without the token (for provenance and logs)."""
        d = asdict(self)
        d.pop("girderToken", None)
        return d


def frame_key(frame: str | None) -> str:
    """``frame`` as the settings hash takes it: spellings of the same
    choice alike (NucleusDetection reads channel names in any case, and
    ``-1`` as empty).

    >>> frame_key(" DAPI "), frame_key("-1"), frame_key("+02"), frame_key("++2"), frame_key(None)
    ('dapi', '', '2', '++2', '')
    """
    from ..wsi.slide import FRAME_INDEX

    text = "" if frame is None else str(frame).strip()
    if text == "-1":
        return ""
    if FRAME_INDEX.fullmatch(text):  # (an index as choose_frame reads one)
        return str(int(text))
    return text.casefold()


@dataclass
class AnalysisOutput:
    """An analysis's result for one slide: annotation document (its
    attributes are set when pushed), scores, provenance."""

    document: BatchedDocument
    scores: dict[str, Any]
    provenance: dict[str, Any]


@dataclass
class ItemOutcome:
    """One row of the summary."""

    item_id: str
    item_name: str
    status: str  # done | skipped | failed | not_analysed (an image-like item, not a large image)
    annotation_id: str = ""
    nuclei_count: int | None = None
    seconds: float = 0.0
    error: str = ""
    scores: dict[str, Any] = field(default_factory=dict)
    #: the analysis's warnings (e.g. a fluorescence slide given a brightfield model)
    warnings: list[str] = field(default_factory=list)
    #: how the model ran (``int8 on cpu``), as NucleusDetection's log line says it
    runtime: str = ""
    #: the frame of a multi-frame slide analysed (``1 (DAPI)``); "" for a plain slide
    frame: str = ""


def _run_detection(
    params: FolderJobParams, slide: str, workdir: str, progress: Progress, note: Note
) -> Any:
    from ..detection import DetectionParams, annotation_options, detect_nuclei
    from ..io import annotation_batches

    det = DetectionParams(
        inputImageFile=slide,
        outputNucleiAnnotationFile=os.path.join(workdir, "nuclei.anot"),  # named, not written
        **{k: getattr(params, k) for k in _DETECTION_FIELDS + _RUNTIME_FIELDS},
    )
    result = detect_nuclei(det, progress=progress, note=note)
    # the document the NucleusDetection CLI writes, made a batch at a time when pushed
    opts = annotation_options(result)
    name, description = opts.pop("name"), opts.pop("description")
    doc = BatchedDocument(
        name=name,
        batches=lambda: annotation_batches(result.nuclei, **opts),
        description=description,
    )
    prov = result.provenance()
    x, y, w, h = result.region
    area_mm2 = w * h * (result.slide["mpp"] or 0) ** 2 / 1e6
    scores = {
        "nuclei_count": prov["nuclei_count"],
        "class_counts": prov["class_counts"],
        "nuclei_per_mm2": nuclei_per_mm2(prov["nuclei_count"], area_mm2),
    }
    return AnalysisOutput(document=doc, scores=scores, provenance=prov)


def how_it_ran(runtime: Any) -> str:
    """A provenance's ``runtime`` as NucleusDetection's summary line says it;
    "" where none is recorded.

    >>> how_it_ran({"device": "cuda:0", "precision": "float32"}), how_it_ran(
    ...     {"device": "cpu", "precision": "not applicable"}), how_it_ran(None)
    ('float32 on cuda:0', 'on cpu', '')
    """
    if not isinstance(runtime, dict) or not runtime.get("device"):
        return ""
    precision = str(runtime.get("precision") or "")
    arithmetic = "" if precision in ("", "not applicable") else precision + " "
    return f"{arithmetic}on {runtime['device']}"


def frame_read(provenance: Any) -> str:
    """The frame a multi-frame slide's analysis read, from its provenance's
    ``slide.frame`` (``1 (DAPI)``, or ``2`` where channels have no names);
    "" for a plain slide or where none is recorded.

    >>> frame_read({"slide": {"frame": {"index": 1, "channel": "DAPI", "frames": 3}}})
    '1 (DAPI)'
    >>> frame_read({"slide": {"frame": {"index": 0, "channel": None, "frames": 1}}}), frame_read({})
    ('', '')
    """
    from ..wsi.slide import frame_label

    slide = provenance.get("slide") if isinstance(provenance, dict) else None
    return frame_label(slide.get("frame") if isinstance(slide, dict) else None)


def nuclei_per_mm2(count: int, area_mm2: float) -> float | None:
    """Nuclei per mm^2 of the region analysed, to 2 decimals or 4
    significant figures, whichever keeps more (rounded to 2 decimals, a
    few nuclei in a large region, 1 in 400 mm^2, read 0.0); 0 for no
    nuclei, None for a region of no known (or no finite) area.

    >>> nuclei_per_mm2(1, 400.0), nuclei_per_mm2(3, 7.0), nuclei_per_mm2(123456, 10.0)
    (0.0025, 0.4286, 12345.6)
    >>> nuclei_per_mm2(0, 400.0), nuclei_per_mm2(5, 0.0), nuclei_per_mm2(5, float("nan"))
    (0.0, None, None)
    """
    if not area_mm2 or not math.isfinite(area_mm2) or area_mm2 <= 0:
        return None
    rate = count / area_mm2
    if rate == 0:
        return 0.0
    return round(rate, max(2, 3 - math.floor(math.log10(abs(rate)))))


#: Analyses the folder job can run: name -> runner(params, slide path, workdir,
#: progress, note); ``note`` is told what a long step does (a line in the job's log).
ANALYSES: dict[str, Callable[[FolderJobParams, str, str, Progress, Note], AnalysisOutput]] = {
    "NucleusDetection": _run_detection,
}


def summary_name(analysis_key: str) -> str:
    """Name of the summary CSV item in the folder."""
    return f"nucleus_models_summary_{analysis_key}.csv"


#: file name endings of slides and images; an item so named that is not a
#: large image is listed in the summary as not analysed
_IMAGE_SUFFIXES = (
    ".svs", ".ndpi", ".tif", ".tiff", ".scn", ".mrxs", ".vsi", ".czi", ".bif", ".qptiff",
    ".isyntax", ".dcm", ".jp2", ".png", ".jpg", ".jpeg", ".bmp",
)  # fmt: skip


def not_analysed_reason(item: dict[str, Any]) -> str | None:
    """Why an item the folder job skips looks like a slide, or None if it does not."""
    large = item.get("largeImage")
    if large is not None and "fileId" not in large:
        if large.get("expected") or large.get("jobId"):
            return (
                "still being made a large image (conversion job running): run the job again later"
            )
        return "its large image has no file: make it a large image again"
    if large is None and str(item.get("name", "")).lower().endswith(_IMAGE_SUFFIXES):
        return "not a large image: make it one in Girder (its file's menu) to analyse it"
    return None


def _large_images(
    client: DSAClient, folder_id: str
) -> tuple[list[dict[str, Any]], list[ItemOutcome]]:
    """The folder's large images in name order, and the image-like items that are not."""
    items, others = [], []
    for i in client.listItem(folder_id):
        if "fileId" in (i.get("largeImage") or {}):
            items.append(i)
        elif (why := not_analysed_reason(i)) is not None:
            others.append(ItemOutcome(i["_id"], i["name"], "not_analysed", error=why))
    items.sort(key=lambda i: (i["name"], i["_id"]))
    return items, sorted(others, key=lambda o: (o.item_name, o.item_id))


def _done_record(
    client: DSAClient, item: dict[str, Any], key: str, phash: str
) -> dict[str, Any] | None:
    """The item's record when it is done with these parameters and its annotation exists."""
    rec = read_record(client, item["_id"], key)
    if not rec or rec.get("status") != "done" or rec.get("params_hash") != phash:
        return None
    analysed = ((rec.get("provenance") or {}).get("girder") or {}).get("file_id")
    if analysed and analysed != item["largeImage"]["fileId"]:
        return None  # another slide was put in the item since: redo
    anns = find_annotations(client, item["_id"], key)
    if not any(a["_id"] == rec.get("annotation_id") for a in anns):
        return None  # the annotation was deleted: redo
    if len(anns) > 1:  # a push that crashed before its metadata: the record wins
        dedupe(client, item["_id"], key, rec["annotation_id"])
    return rec


def local_name(file_name: str) -> str:
    """A short name to download a slide as, keeping its extensions (large_image
    picks a reader by them): a Girder file name can be longer than a file
    system takes (255 bytes; 85 characters of CJK script).

    >>> local_name("病理標本" * 22 + ".ome.tif"), local_name("case 1.2 scan.svs"), local_name("x")
    ('slide.ome.tif', 'slide.svs', 'slide')
    """
    ext = ""
    for suffix in reversed(PurePath(file_name).suffixes[-2:]):
        if not (2 <= len(suffix) <= 9 and suffix.isascii() and suffix[1:].isalnum()):
            break
        ext = suffix + ext
    return "slide" + ext


def _sanitize(prov: dict[str, Any], file_name: str) -> dict[str, Any]:
    params = dict(prov.get("params") or {})
    params["inputImageFile"] = file_name
    for k in [k for k in params if k.startswith("output")]:
        params.pop(k)
    out = {**prov, "params": params}
    if isinstance(prov.get("slide"), dict):  # named as downloaded (local_name): the slide's name
        out["slide"] = {**prov["slide"], "file": file_name}
    return out


def _process(
    client: DSAClient,
    params: FolderJobParams,
    item: dict[str, Any],
    phash: str,
    workdir: str | None,
    progress: Progress,
    note: Note,
) -> tuple[ItemOutcome, dict[str, Any]]:
    """The item analysed, pushed and recorded: its outcome and the record written."""
    t0 = time.perf_counter()
    key = params.key()
    file_id = item["largeImage"]["fileId"]
    gfile = client.get(f"file/{file_id}")
    fname = os.path.basename(gfile["name"]) or "slide"
    size = gfile.get("size")  # a download that ends short of it is retried, never analysed
    size = size if isinstance(size, int) and not isinstance(size, bool) else None
    with tempfile.TemporaryDirectory(prefix="nm-folder-job-", dir=workdir) as tmp:
        slide = client.download_file(file_id, os.path.join(tmp, local_name(fname)), size=size)
        try:
            out = ANALYSES[params.analysis](params, slide, tmp, progress, note)
        except NucleusModelsError as exc:
            # its message names the file as downloaded (local_name): name the slide's file
            msg = str(exc).replace(slide, fname).replace(os.path.basename(slide), fname)
            exc.args = (msg,)
            raise
    prov = _sanitize(out.provenance, fname)
    girder = {"item_id": item["_id"], "file_id": file_id, "folder_id": item["folderId"]}
    doc = dataclasses.replace(out.document, attributes={**prov, "girder": girder})
    previous = read_record(client, item["_id"], key)
    # the older annotation is removed only once the item's record names the new
    # one: a job cancelled in between leaves the item as it was, never bare
    push = push_annotation(
        client,
        item["_id"],
        doc,
        analysis_key=key,
        record={"params_hash": phash, "analysis": params.analysis, "model": params.model},
        replace=False,
        workdir=workdir,
    )
    log.info("item %s: annotation %s pushed", item["_id"], push.annotation_id)
    record = {
        "status": "done",
        "analysis": params.analysis,
        "model": params.model,
        "params_hash": phash,
        "annotation_id": push.annotation_id,
        "annotation_name": doc.name,
        "element_count": push.element_count,
        "scores": out.scores,
        "provenance": {**prov, "girder": girder, "job": params.public()},
    }
    # a key of the user's own keeps the annotations NucleusDetection made by hand
    legacy_name = doc.name if key == params.analysis else None

    def replace_older() -> None:
        dedupe(client, item["_id"], key, push.annotation_id, legacy_name=legacy_name)

    try:
        write_record(client, item["_id"], key, record)
    except BaseException:
        # failed or cancelled (SIGTERM) before its record landed: the new annotation is
        # taken back and the older one, still named by the record, stays (the slide is
        # redone by the next run); landed: the older one goes
        with contextlib.suppress(Exception):
            if (read_record(client, item["_id"], key) or {}).get("annotation_id") != (
                push.annotation_id
            ):
                delete_annotation(client, push.annotation_id)
            else:
                replace_older()
        raise
    try:
        replace_older()
    except DSAError:
        # the older one cannot be removed (e.g. 403: not ours to delete): the new one
        # and its record are taken back, so a failed replacement never leaves two
        with contextlib.suppress(Exception):
            undo = previous or {"status": "failed", "params_hash": phash}
            write_record(client, item["_id"], key, undo)
            delete_annotation(client, push.annotation_id)
        raise
    except BaseException:  # cancelled midway: the record names the new one; finish
        with contextlib.suppress(Exception):
            replace_older()
        raise
    outcome = ItemOutcome(
        item["_id"],
        item["name"],
        "done",
        annotation_id=push.annotation_id,
        nuclei_count=out.scores.get("nuclei_count"),
        seconds=time.perf_counter() - t0,
        scores=out.scores,
        warnings=list(prov.get("warnings") or []),
        runtime=how_it_ran(prov.get("runtime")),
        frame=frame_read(prov),
    )
    return outcome, record


def _record_failure(
    client: DSAClient, item: dict[str, Any], key: str, phash: str, error: str
) -> dict[str, Any] | None:
    """Note the failure on the item, keeping a previous successful record
    intact; returns the record written (None when it could not be)."""
    failure = {"error": error, "params_hash": phash, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        old = read_record(client, item["_id"], key)
        rec = (
            {**old, "last_failure": failure}
            if old and old.get("status") == "done"
            else {"status": "failed", **failure}
        )
        write_record(client, item["_id"], key, rec)
        return rec
    except (DSAError, OSError) as exc:
        log.warning("item %s: could not record the failure: %s", item["_id"], exc)
        return None


def _memory_error(exc: BaseException) -> BaseException | None:
    """``exc``, or an error it was raised from or during, when it is one of
    memory: torch's ``OutOfMemoryError`` (a RuntimeError, matched by name),
    ``MemoryError`` or a worker process killed (``BrokenProcessPool``)."""
    from concurrent.futures.process import BrokenProcessPool

    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return None
        if isinstance(seen, MemoryError | BrokenProcessPool):
            return seen
        if type(seen).__name__ == "OutOfMemoryError":
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _out_of_memory(exc: BaseException, params: FolderJobParams) -> str | None:
    """A slide's failure for memory as the folder job's parameters to change,
    with their values (None for another failure).

    The NucleusDetection CLI says "use a smaller batch_size or
    analysis_tile_size"; the folder job gave torch's own text ("CUDA out of
    memory. Tried to allocate ...") or a bare ``MemoryError`` as the slide's
    error.
    """
    from concurrent.futures.process import BrokenProcessPool

    from ..models import get_spec

    seen = _memory_error(exc)
    if seen is None:
        return None
    if isinstance(seen, BrokenProcessPool):
        return (
            "a post-processing worker process died (killed, e.g. for memory):"
            " use fewer num_workers, or the scheduler 'multithreading'"
        )
    spec = get_spec(params.model)
    batch, tile = params.batch_size, params.analysis_tile_size
    own = " (the model's)"
    now = (
        f"batch_size {batch if batch > 0 else f'{spec.batch_size}{own}'} and"
        f" analysis_tile_size {tile if tile > 0 else f'{spec.tile_size}{own}'}"
    )
    if isinstance(seen, MemoryError):
        return f"out of memory with {now}: use a smaller analysis_tile_size or batch_size"
    # torch's first sentences: what was asked for, and how much of the GPU was
    # free (on a shared GPU, whether others held it)
    said = ". ".join(" ".join(str(seen).split()).split(". ")[:3])
    return (
        f"GPU out of memory with {now}: use a smaller batch_size or analysis_tile_size,"
        f" or device cpu{f' ({said})' if said else ''}"
    )


def _free_gpu_cache() -> None:
    """Hand the GPU memory torch's caching allocator keeps reserved back to
    the driver: after an out-of-memory error the failed batch's blocks stay
    reserved by this process (not free for others sharing the GPU) through
    the slides after it."""
    torch = sys.modules.get("torch")
    with contextlib.suppress(Exception):
        if torch is not None and torch.cuda.is_initialized():
            torch.cuda.empty_cache()


def _failure_of(rec: dict[str, Any] | None) -> tuple[Any, Any]:
    """The (error, time) of the failure a record notes (a done record's last one)."""
    f = (rec or {}).get("last_failure", rec or {})
    return f.get("error"), f.get("time")


def _summary_csv(outcomes: list[ItemOutcome], params: FolderJobParams, phash: str) -> bytes:
    buf = io.StringIO()
    cols = ["item_id", "item_name", "status", "analysis", "analysis_key", "model"]
    cols += ["params_hash", "nuclei_count", "nuclei_per_mm2", "annotation_id", "seconds", "error"]
    cols += ["warnings", "runtime", "frame"]
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for o in outcomes:
        w.writerow(
            {
                "item_id": o.item_id,
                "item_name": o.item_name,
                "status": o.status,
                "analysis": params.analysis,
                "analysis_key": params.key(),
                "model": params.model,
                "params_hash": phash,
                "nuclei_count": "" if o.nuclei_count is None else o.nuclei_count,
                "nuclei_per_mm2": o.scores.get("nuclei_per_mm2", ""),
                "annotation_id": o.annotation_id,
                "seconds": f"{o.seconds:.2f}",
                "error": o.error,
                "warnings": "; ".join(o.warnings),
                "runtime": o.runtime,
                "frame": o.frame,
            }
        )
    return buf.getvalue().encode()


def upload_summary(client: DSAClient, folder_id: str, name: str, payload: bytes) -> str:
    """Put ``payload`` in the folder's item ``name`` as its only file; returns the file id."""
    items = list(client.listItem(folder_id, name=name))
    item = items[0] if items else client.createItem(folder_id, name, reuseExisting=True)
    new = client.upload_bytes_to_item(item["_id"], name, payload, "text/csv")
    for f in client.listFile(item["_id"]):
        if f["_id"] != new["_id"]:
            client.sendRestRequest("DELETE", f"file/{f['_id']}")
    for extra in items[1:]:
        client.sendRestRequest("DELETE", f"item/{extra['_id']}")
    return str(new["_id"])


def run_folder_job(
    client: DSAClient,
    params: FolderJobParams,
    *,
    progress: Progress | None = None,
    workdir: str | None = None,
) -> list[ItemOutcome]:
    """Run ``params.analysis`` on every large image of ``params.inputFolder``.

    Returns
    -------
    list of ItemOutcome
        One per large-image item: ``done``, ``skipped`` (already done with
        the same parameters) or ``failed`` (with the error); then one
        ``not_analysed`` per item named like a slide that is not a large
        image, or not yet (conversion running), with the reason as its error.

    Raises
    ------
    DSAError
        The folder does not exist or the server cannot be reached at the start.
    """
    params.check()  # before any request: a bad value would fail every slide
    if workdir is not None and not (os.path.isdir(workdir) and os.access(workdir, os.W_OK)):
        raise NucleusModelsError(f"workdir {workdir}: not a folder this job can write to")
    phash = params.params_hash()
    key = params.key()
    try:
        folder = client.get(f"folder/{params.inputFolder}")
    except GirderRequestError as exc:
        raise DSAError(f"folder {params.inputFolder!r} not found: {exc}") from None
    if int(folder.get("_accessLevel", 2)) < 1:
        raise DSAError(
            f"folder {folder.get('name', params.inputFolder)!r}: write access is needed to record "
            "each slide's result in its metadata; this token has read access only"
        )
    items, not_analysed = _large_images(client, folder["_id"])
    if not items:
        subs = [f["name"] for f in client.listFolder(folder["_id"], parentFolderType="folder")]
        where = f"; its sub-folders ({', '.join(subs[:5])}) are not searched" if subs else ""
        if not_analysed:
            o = not_analysed[0]
            where += (
                f"; {len(not_analysed)} item(s) are not (yet) one, e.g. {o.item_name!r}: {o.error}"
            )
        raise DSAError(f"folder {folder['name']!r} holds no large image{where}")
    lease = FolderLease.acquire(client, folder, key)  # FolderBusy while another run holds it
    # (after the lease: a run refused for a busy folder says only that)
    log.info("folder %s: %d large image(s), analysis %s", folder["name"], len(items), key)
    try:
        outcomes = _run_items(client, params, folder, items, lease, progress, workdir)
    finally:
        lease.release()
    for o in not_analysed:
        log.warning("item %r not analysed: %s", o.item_name, o.error)
    outcomes += not_analysed
    fid = upload_summary(
        client, folder["_id"], summary_name(key), _summary_csv(outcomes, params, phash)
    )
    log.info(
        "summary %s (file %s): %s",
        summary_name(key),
        fid,
        ", ".join(
            f"{s} {sum(o.status == s for o in outcomes)}"
            for s in ("done", "skipped", "failed", "not_analysed")
        ),
    )
    return outcomes


def _run_items(
    client: DSAClient,
    params: FolderJobParams,
    folder: dict[str, Any],
    items: list[dict[str, Any]],
    lease: FolderLease,
    progress: Progress | None,
    workdir: str | None,
) -> list[ItemOutcome]:
    """Each item analysed or skipped, then the final sweep of duplicate annotations."""
    phash, key = params.params_hash(), params.key()

    report = progress or (lambda f: None)
    outcomes: list[ItemOutcome] = []
    written: dict[str, dict[str, Any]] = {}  # item id -> the record this run wrote
    unanswered = 0  # slides in a row the server did not answer for
    for i, item in enumerate(items):
        label = f"item {i + 1}/{len(items)} {item['name']!r}"

        def sub(frac: float, i: int = i) -> None:
            report((i + min(max(frac, 0.0), 1.0) * 0.95) / max(len(items), 1))

        def said(text: str, label: str = label) -> None:
            # (on this logger: the job's log shows it, the analysis's own may be quiet)
            log.info("%s: %s", label, text)

        if lease.check():  # read now: a heartbeat may be 30 s away
            raise FolderBusy(
                f"folder {folder['name']!r}: another run of {key} took the folder over"
                f" (this one went unheard too long, or both started at the same moment);"
                f" stopped before {label}"
            )
        try:
            rec = None if params.force else _done_record(client, item, key, phash)
            if rec is not None:
                scores = rec.get("scores") or {}
                outcome = ItemOutcome(
                    item["_id"],
                    item["name"],
                    "skipped",
                    annotation_id=rec["annotation_id"],
                    nuclei_count=scores.get("nuclei_count"),
                    scores=scores,
                    warnings=list((rec.get("provenance") or {}).get("warnings") or []),
                    runtime=how_it_ran((rec.get("provenance") or {}).get("runtime")),
                    frame=frame_read(rec.get("provenance")),
                )
            else:
                outcome, written[item["_id"]] = _process(
                    client, params, item, phash, workdir, sub, said
                )
        except AuthenticationError:
            raise  # the token expired or was revoked: every later slide would fail too
        except Exception as exc:  # one slide's failure never stops the job
            if (oom := _out_of_memory(exc, params)) is not None:
                _free_gpu_cache()
            msg = " ".join((oom or redact(exc)).split())[:500] or type(exc).__name__
            log.warning("%s failed: %s", label, msg)
            unanswered = unanswered + 1 if isinstance(exc, GirderUnavailable) else 0
            if unanswered >= UNANSWERED_SLIDES:  # the server is down, not one slide bad
                raise GirderUnavailable(
                    f"Girder did not answer for {unanswered} slides in a row; stopped at "
                    f"{label} (a later run goes on from there): {msg}"
                ) from None
            if (noted := _record_failure(client, item, key, phash, msg)) is not None:
                written[item["_id"]] = noted
            outcome = ItemOutcome(item["_id"], item["name"], "failed", error=msg)
        else:
            unanswered = 0
        outcomes.append(outcome)
        count = "" if outcome.nuclei_count is None else str(outcome.nuclei_count)
        ran = f"({outcome.runtime})" if outcome.runtime and outcome.status == "done" else ""
        of = f"in frame {outcome.frame}" if outcome.frame else ""
        log.info("%s: %s", label, " ".join(w for w in (outcome.status, count, of, ran) if w))
        report((i + 1) / max(len(items), 1))
    # Late copies of a push whose answer was lost may arrive after it, and an
    # item's record may have been undone by another write of the item's
    # metadata (Girder's PUT rewrites the whole document; another analysis's
    # job writes its own record from what it read a moment before): sweep once
    # more, when a write landing just after the last one has landed too.
    if written:
        time.sleep(SWEEP_SETTLE_S)
    for o in outcomes:
        if o.status == "failed":
            try:
                rec = read_record(client, o.item_id, key)
                mine = written.get(o.item_id)
                if mine is not None and _failure_of(rec) != _failure_of(mine):
                    log.warning(
                        "item %s: its failure record was undone by another write of the "
                        "item's metadata; written again",
                        o.item_id,
                    )
                    write_record(client, o.item_id, key, mine)
                    rec = mine
                # a slide that failed this time keeps the annotation its (done)
                # record names, alone: an earlier run's unrecorded copy goes
                recorded = (rec or {}).get("annotation_id")
                found = find_annotations(client, o.item_id, key) if recorded else []
                if any(a["_id"] == recorded for a in found):
                    dedupe(client, o.item_id, key, str(recorded), found=found)
            except DSAError as exc:
                log.warning("item %s: final check failed: %s", o.item_id, exc)
        if o.status in ("done", "skipped"):
            try:
                # the item's record names the annotation to keep: another run of
                # the same key that finished later recorded its own, newer one
                found = find_annotations(client, o.item_id, key)
                recorded = (read_record(client, o.item_id, key) or {}).get("annotation_id")
                if any(a["_id"] == recorded for a in found):
                    o.annotation_id = str(recorded)
                elif o.item_id in written:
                    log.warning(
                        "item %s: its record was undone by another write of the item's"
                        " metadata; written again",
                        o.item_id,
                    )
                    write_record(client, o.item_id, key, written[o.item_id])
                dedupe(client, o.item_id, key, o.annotation_id, found=found)
            except DSAError as exc:
                log.warning("item %s: final check failed: %s", o.item_id, exc)
    return outcomes
