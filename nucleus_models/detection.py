"""Nucleus detection on a slide: the one function the NucleusDetection CLI calls.

``detect_nuclei(params)`` opens the slide, resolves the analysis region and
resolution, builds the tissue mask and the tile grid, runs the model through
the tile runner and returns a :class:`DetectionResult` (nuclei in base-pixel
slide coordinates plus everything needed to record provenance).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from . import __version__
from .errors import NoTissueError, ParameterError
from .models import ModelSpec, get_spec
from .types import Nuclei

__all__ = [
    "annotation_options",
    "colourless",
    "modality_mismatch",
    "DetectionParams",
    "DetectionResult",
    "ImageSegmentation",
    "MODEL_OPTION_NAMES",
    "detect_nuclei",
    "segment_image",
    "write_outputs",
]

log = logging.getLogger(__name__)

#: Parameters passed to the model builder when set (>= 0); -1 keeps the model's tuned value.
MODEL_OPTION_NAMES = (
    "foreground_threshold",
    "min_radius",
    "max_radius",
    "local_max_search_radius",
    "min_nucleus_area",
)


@dataclass
class DetectionParams:
    """Parameters of nucleus detection; field names are the CLI's XML names."""

    inputImageFile: str
    outputNucleiAnnotationFile: str | None = None
    model: str = "unet-monuseg"
    analysis_roi: list[float] = field(default_factory=lambda: [-1.0, -1.0, -1.0, -1.0])
    input_mpp: float = -1.0
    nuclei_annotation_format: str = "polygon"
    annotation_name: str = ""
    outputNucleiCSVFile: str | None = None
    outputNucleiGeoJSONFile: str | None = None
    outputOverlayImageFile: str | None = None
    analysis_tile_size: int = -1
    analysis_tile_overlap: int = -1
    min_fgnd_frac: float = 0.0
    batch_size: int = -1
    device: str = "auto"
    precision: str = "auto"
    scheduler: str = ""
    num_workers: int = 0
    foreground_threshold: float = -1.0
    min_radius: float = -1.0
    max_radius: float = -1.0
    local_max_search_radius: float = -1.0
    min_nucleus_area: float = -1.0
    test_time_flips: bool = False
    #: the frame of a multi-frame slide to analyse: an index or a channel name
    #: (any case); empty: the slide's nuclear-stain channel, else frame 0
    #: (:func:`~nucleus_models.wsi.slide.choose_frame`)
    frame: str = ""

    @classmethod
    def from_namespace(cls, ns: Any) -> DetectionParams:
        """Build from an argparse namespace (unknown attributes are ignored)."""
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: getattr(ns, k) for k in names if hasattr(ns, k)})

    def model_options(self) -> dict[str, Any]:
        """Builder options: the thresholds the user set, plus the device and precision."""
        opts: dict[str, Any] = {
            k: getattr(self, k)
            for k in MODEL_OPTION_NAMES
            if getattr(self, k) is not None and getattr(self, k) >= 0
        }
        if self.device and self.device != "auto":
            opts["device"] = self.device
        if self.precision and self.precision != "auto":
            opts["precision"] = self.precision
        if self.test_time_flips:
            opts["tta"] = 1
        return opts


@dataclass
class DetectionResult:
    """Nuclei plus what is needed to describe how they were found."""

    nuclei: Nuclei
    params: DetectionParams
    spec: ModelSpec
    slide: dict[str, Any]
    region: list[int]
    tiles: dict[str, Any]
    timings: dict[str, float]
    version: str = __version__
    #: where and how the model ran: ``device`` and, for learned models, ``precision``
    runtime: dict[str, Any] = field(default_factory=dict)
    #: what the user should know about this run (also logged as it happens)
    warnings: list[str] = field(default_factory=list)

    def provenance(self) -> dict[str, Any]:
        """JSON-ready record: parameters, model, sha256, version, counts, timings."""
        counts = {
            name: int(np.sum(self.nuclei.labels == i)) for i, name in enumerate(self.spec.classes)
        }
        # the thresholds the run used: the model's, with those the user set
        used = self.params.model_options()
        thresholds = {k: used.get(k, v) for k, v in self.spec.thresholds.items()}
        return {
            "software": "nucleus-models",
            "version": self.version,
            "cli": "NucleusDetection",
            "params": asdict(self.params),
            "model": {
                "name": self.spec.name,
                "sha256": self.spec.sha256,
                "mpp": self.spec.mpp,
                "classes": list(self.spec.classes),
                "thresholds": thresholds,
            },
            "slide": self.slide,
            "analysis_region": self.region,
            "tiles": self.tiles,
            "nuclei_count": len(self.nuclei),
            "class_counts": counts,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "runtime": dict(self.runtime),
            "libraries": library_versions(),
            "warnings": list(self.warnings),
        }


#: libraries whose version can change a run's nuclei (when the run imported them)
_LIBRARIES = ("torch", "histomicstk", "large_image", "numpy", "scipy", "skimage", "cv2")


def library_versions() -> dict[str, str]:
    """Versions of the libraries in :data:`_LIBRARIES` this process has imported.

    int8 results, for one, depend on PyTorch's quantized kernels, and the
    Docker image's PyTorch is not CI's.
    """
    out = {}
    for name in _LIBRARIES:
        module = sys.modules.get(name)
        version = getattr(module, "__version__", None) if module is not None else None
        if version:
            out[name] = str(version)
    return out


Progress = Callable[[float], None]


#: how far --input_mpp may differ from a slide's own resolution unremarked
MPP_OVERRIDE_TOLERANCE = 0.1


#: the size of the overview (thumbnail) the tissue mask is made from, px
OVERVIEW_PX = 2048
#: the share of ``progress`` the overview takes where it is read tile by tile
#: (a slide without a pyramid: ~20 s for 30000 x 30000 px on 2 cores)
OVERVIEW_SHARE = 0.1


def detect_nuclei(
    params: DetectionParams,
    *,
    progress: Progress | None = None,
    note: Callable[[str], None] | None = None,
) -> DetectionResult:
    """Detect nuclei in ``params.inputImageFile``.

    ``progress`` is told the fraction done: the tiles analysed, after the
    overview where that is read tile by tile (a slide without a pyramid;
    its first :data:`OVERVIEW_SHARE`). ``note`` (default: the log, at
    INFO) is told, in a line, what a long step before the tiles does.

    Raises
    ------
    SlideError, ParameterError, ModelError, NoTissueError
        With a one-line message for the user.
    """
    from .wsi import (
        TileJob,
        clip_region,
        open_slide,
        parse_roi,
        run_tiles,
        tile_grid,
        tile_tissue_fraction,
        tissue_mask,
    )
    from .wsi.slide import choose_frame

    t0 = time.perf_counter()
    spec = get_spec(params.model)  # unknown model fails before any I/O
    check_params(params)
    check_output_paths(params)  # before the analysis, not after it
    roi = parse_roi(params.analysis_roi)
    input_mpp = params.input_mpp if params.input_mpp and params.input_mpp > 0 else None
    slide = open_slide(params.inputImageFile, input_mpp=input_mpp)
    frame = choose_frame(slide, params.frame)  # (an unknown channel: before anything is read)
    slide.frame = frame.read_frame
    base_mpp = slide.require_mpp()
    if why := mpp_problem(base_mpp):
        where = "--input_mpp" if input_mpp else f"the slide's metadata ({slide.mpp_source})"
        raise ParameterError(
            f"resolution {base_mpp:g} um/px (from {where}) is not a microscope's: {why}; "
            "pass the right --input_mpp ('Input resolution (um/px)' in HistomicsUI)"
        )
    region = clip_region(roi, slide.width, slide.height)

    from .wsi.runner import shared_model

    model = None
    warnings: list[str] = []  # logged as they happen, and recorded in the outputs

    def warn(msg: str) -> None:
        warnings.append(msg)
        log.warning("%s", msg)

    if frame.warning:
        warn(frame.warning)
    elif frame.note:
        (note or log.info)(frame.note)
    share = 0.0
    if (level := slide.overview_level(OVERVIEW_PX)) is not None:
        share = OVERVIEW_SHARE
        lw, lh = slide.level_size(level)
        (note or log.info)(
            f"reading the tissue overview from {lw} x {lh}"
            f" px of the slide (it has no pyramid level near {OVERVIEW_PX} px; saved as a pyramidal"
            " TIFF, e.g. vips tiffsave --tile --pyramid, it reads in a second)"
        )
    t_overview = time.perf_counter()
    thumb, tscale = slide.thumbnail(
        OVERVIEW_PX, progress=None if progress is None else (lambda f: progress(share * f))
    )
    t_overview = time.perf_counter() - t_overview
    # (its resolution: a hole larger than a lumen, e.g. glass inside a pen ring, is not tissue)
    tissue = tissue_mask(thumb, modality=spec.modality, um_per_px=base_mpp / tscale)
    if region.polygons:
        tissue = tissue & _polygon_mask(region.polygons, tissue.shape, tscale)
    mismatch = modality_mismatch(thumb, tscale, region.as_list(), spec)
    # (colour: of the tissue the analysis reads, inside a polygon ROI's outline)
    if mismatch := mismatch or colourless(thumb, tissue, tscale, region.as_list(), spec):
        warn(mismatch)
    analysis_mpp = spec.mpp
    target = spec.thresholds.get("diameter_px")
    if target and tissue.any():  # (no tissue: the one-line error below, nothing loaded)
        # size-normalised model: analyse at the scale where its own
        # segmentation of a tissue-rich sample finds nuclei target px across
        model = shared_model(spec.name, params.model_options())
        analysis_mpp = spec.mpp / _sample_scale(
            slide, model, spec, tissue, tscale, region, base_mpp, float(target)
        )
    downsample = analysis_mpp / base_mpp
    if not target and _native_if_close(downsample) == 1.0:
        downsample, analysis_mpp = 1.0, base_mpp
    if downsample < 1 / MAX_UPSAMPLING:
        raise _too_coarse(
            analysis_mpp,
            base_mpp,
            "check --input_mpp ('Input resolution (um/px)') or the slide's resolution",
        )
    own_mpp, own_source = slide.metadata_mpp()
    if input_mpp and own_mpp and abs(input_mpp / own_mpp - 1) > MPP_OVERRIDE_TOLERANCE:
        # (after the errors above; a preset's value or a typo: every size the model sees follows it)
        factor = f"{input_mpp / own_mpp:.2g}x"
        warn(
            f"--input_mpp {input_mpp:g} overrides the slide's own {own_mpp:.4g} um/px (from its "
            f"{own_source}): if the slide's is right, "
            + ("" if target else f"nuclei are analysed at {factor} their size and ")
            + f"lengths in um are recorded at {factor} theirs; "
            "'Input resolution (um/px)' -1 uses the slide's"
        )
    image_w = max(1, int(math.floor(slide.width / downsample)))
    image_h = max(1, int(math.floor(slide.height / downsample)))
    tile_size, overlap = tiling(params, spec)
    min_overlap = _min_overlap(spec)
    bounds = (
        int(math.floor(region.left / downsample)),
        int(math.floor(region.top / downsample)),
        min(int(math.ceil((region.left + region.width) / downsample)), image_w),
        min(int(math.ceil((region.top + region.height) / downsample)), image_h),
    )
    tiles = tile_grid(bounds, tile_size=tile_size, overlap=overlap, image_size=(image_w, image_h))
    if params.analysis_tile_overlap >= 0 and overlap < min_overlap:
        warn(
            f"tile overlap {overlap} px is smaller than the largest nucleus ({min_overlap} px; "
            f"pixels at the analysis resolution, {analysis_mpp:.3g} um/px): "
            "nuclei may be cut at seams"
        )

    keep = []
    for t in tiles:
        box = tuple(v * downsample for v in t.core)
        frac = tile_tissue_fraction(tissue, box, tscale)  # type: ignore[arg-type]
        if frac > params.min_fgnd_frac or (frac > 0 and params.min_fgnd_frac <= 0):
            keep.append(t)
    if not keep:
        raise NoTissueError(
            f"{slide.path.rsplit('/', 1)[-1]}: no tissue found in the analysis region {region.as_list()}"
        )
    if share:  # (and the job's progress message no longer says it reads the overview)
        (note or log.info)(
            f"overview read in {t_overview:.0f} s; analysing the {len(keep)} of {len(tiles)}"
            " tiles that hold tissue"
        )
    if model is None:
        model = shared_model(spec.name, params.model_options())
    if model.precision_note:
        warn(model.precision_note)  # auto could not run what it picked first
    if params.test_time_flips and not getattr(model, "tta", False):
        warn(f"test-time flips are for the U-Nets: model {spec.name} ran without them")
    unused = [k for k in MODEL_OPTION_NAMES if getattr(params, k) >= 0 and k not in spec.thresholds]
    if unused:
        warn(
            f"{', '.join(unused)}: settings of the classical models; model {spec.name} "
            "ran without them"
        )
    ran_on = str(model_runtime(model)["device"])
    if params.device not in ("", "auto") and ran_on.split(":")[0] != params.device.split(":")[0]:
        warn(f"model {spec.name} runs on the {ran_on} only: --device {params.device} was not used")
    if model.prepare_from == "analysis":
        sample = _tissue_windows(slide, tissue, tscale, region, downsample)
        context = model.prepare(sample, tissue_mask(sample, modality=spec.modality))
    else:
        context = model.prepare(thumb, tissue)
    t_setup = time.perf_counter()

    job = TileJob(
        slide_path=slide.path,
        input_mpp=input_mpp,
        model_name=spec.name,
        model_options=tuple(sorted(params.model_options().items())),
        context=context,
        downsample=downsample,
        image_size=(image_w, image_h),
        analysis_mpp=analysis_mpp,
        base_size=(slide.width, slide.height),
        white=slide.white,
        alpha_white=slide.alpha_white,
        frame=slide.frame,
    )

    def tick(done: int, total: int) -> None:
        if progress is not None:
            progress(share + (1 - share) * done / max(total, 1))

    scheduler, workers = effective_scheduler(
        params.scheduler,
        params.num_workers,
        model_runtime(model)["device"],
        detachable=model.postprocessor() is not None,
    )
    from .wsi.runner import available_cores

    if ":" not in scheduler and workers > 2 * available_cores():
        warn(
            f"num_workers {workers} is more than twice the {available_cores()} cores this run"
            " may use: each worker holds its own tiles in memory (~0.26 GB), for no speed"
        )
    stages: dict[str, float] = {}
    nuclei = run_tiles(
        job,
        keep,
        scheduler=scheduler,
        num_workers=workers,
        batch_size=params.batch_size if params.batch_size > 0 else spec.batch_size,
        progress=tick,
        stage_seconds=stages,
    )
    # nuclei must lie in the requested region (centroid rule, like the seams)
    inside = (
        (nuclei.centroids[:, 0] >= region.left)
        & (nuclei.centroids[:, 0] < region.left + region.width)
        & (nuclei.centroids[:, 1] >= region.top)
        & (nuclei.centroids[:, 1] < region.top + region.height)
    )
    if region.polygons and len(nuclei):
        inside &= _in_polygons(nuclei.centroids, region.polygons)
    nuclei = nuclei.select(inside)
    t_end = time.perf_counter()
    return DetectionResult(
        nuclei=nuclei,
        params=params,
        spec=spec,
        slide={
            "file": slide.path.rsplit("/", 1)[-1],
            "width": slide.width,
            "height": slide.height,
            "mpp": base_mpp,
            "mpp_source": slide.mpp_source,
            # (a multi-frame slide's, or one asked for: which frame was read)
            **({"frame": frame.record()} if frame.frames > 1 or frame.how == "given" else {}),
        },
        region=region.as_list(),
        tiles={
            "total": len(tiles),
            "analysed": len(keep),
            "size": tile_size,
            "overlap": overlap,
            "analysis_mpp": round(analysis_mpp, 4),
            "scheduler": scheduler or "serial",
            "workers": workers,
        },
        timings={
            "setup": t_setup - t0,
            "tiles": t_end - t_setup,
            "total": t_end - t0,
            **{f"{k}_cpu": v for k, v in stages.items()},
        },
        runtime=model_runtime(model),
        warnings=warnings,
    )


#: resolutions (um/px) a slide or image may have: outside, it is a wrong value
MPP_RANGE = (0.01, 100.0)
#: the most the analysis grid may be finer than the image
MAX_UPSAMPLING = 16


def mpp_problem(value: object) -> str | None:
    """Why ``value`` is not a microscope's resolution (None when it is one):
    the end of a one-line error, after the caller names the value.

    >>> mpp_problem(0.25) is None, mpp_problem(float("nan"))
    (True, 'expected microns per pixel, 0.01-100 (40x is ~0.25, 20x ~0.5)')
    """
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and MPP_RANGE[0] <= float(value) <= MPP_RANGE[1]:  # type: ignore[arg-type]
        return None
    return f"expected microns per pixel, {MPP_RANGE[0]:g}-{MPP_RANGE[1]:g} (40x is ~0.25, 20x ~0.5)"


def _too_coarse(model_mpp: float, image_mpp: float, hint: str) -> ParameterError:
    """The error for an image more than :data:`MAX_UPSAMPLING` times coarser
    than the model (almost always a wrong resolution), ending in ``hint``."""
    return ParameterError(
        f"the model works at {model_mpp:.3g} um/px, {image_mpp / model_mpp:.0f}x finer than the "
        f"image's {image_mpp:g} um/px: too coarse an image for it (at most {MAX_UPSAMPLING}x); "
        + hint
    )


#: an image within this fraction of a model's resolution is analysed on its
#: own pixels: resampling 0.499 um/px to 0.5 changes no nucleus's size that
#: matters, but blurs every pixel (interpolating between neighbours), and
#: HistomicsTK's detector at its defaults then finds a fifth fewer nuclei
NATIVE_MPP_TOLERANCE = 0.02


def _native_if_close(ratio: float) -> float:
    """``ratio`` (model um/px per image um/px), or 1 when within the tolerance.

    >>> _native_if_close(0.5 / 0.499), _native_if_close(0.4 / 0.25)
    (1.0, 1.6)
    """
    return 1.0 if abs(ratio - 1.0) <= NATIVE_MPP_TOLERANCE else ratio


def check_params(params: DetectionParams) -> None:
    """One-line errors for parameter values no run can use, before any I/O."""
    fmt = params.nuclei_annotation_format
    if fmt not in ("polygon", "point", "box", "boundary", "bbox"):
        raise ParameterError(f"nuclei_annotation_format must be polygon, point or box, got {fmt!r}")
    mpp = params.input_mpp
    if (
        not math.isfinite(mpp)
        or (mpp < 0 and mpp != -1)
        or (mpp > 0 and not MPP_RANGE[0] <= mpp <= MPP_RANGE[1])
    ):
        raise ParameterError(
            f"input_mpp must be -1 (the slide's own) or microns per pixel from {MPP_RANGE[0]:g} "
            f"to {MPP_RANGE[1]:g} (40x is ~0.25, 20x ~0.5), got {mpp:g}"
        )
    if not 0 <= params.min_fgnd_frac < 1:
        raise ParameterError(
            f"min_fgnd_frac is a fraction of a tile, from 0 to below 1, got {params.min_fgnd_frac:g}"
        )
    for name, least in (("analysis_tile_size", 1), ("analysis_tile_overlap", 0), ("batch_size", 1)):
        value = getattr(params, name)
        if value != -1 and value < least:
            raise ParameterError(
                f"{name} must be -1 (the model's default) or at least {least}, got {value}"
            )
    # (the model's defaults for the one not given: checked here, before any warning)
    spec = get_spec(params.model)
    tile, overlap = tiling(params, spec)
    if tile <= overlap:
        tile_note = "" if params.analysis_tile_size > 0 else ", the model's default"
        overlap_note = "" if params.analysis_tile_overlap >= 0 else ", the model's default"
        raise ParameterError(
            f"tile size ({tile}{tile_note}) must be larger than the tile overlap "
            f"({overlap}{overlap_note})"
        )
    sched = (params.scheduler or "").strip()
    if sched not in ("", "multithreading", "multiprocessing", "pipeline") and ":" not in sched:
        raise ParameterError(
            f"unknown scheduler {params.scheduler!r}: use '', 'multithreading', 'multiprocessing',"
            " 'pipeline' or tcp://host:port"
        )
    if ":" in sched and (why := _address_problem(sched)):
        raise ParameterError(
            f"scheduler {params.scheduler!r} is not a dask scheduler's address ({why}):"
            " use tcp://host:port"
        )
    for k in MODEL_OPTION_NAMES:
        if not math.isfinite(getattr(params, k)):
            raise ParameterError(f"{k} must be a number, got {getattr(params, k)}")
        if getattr(params, k) < 0 and getattr(params, k) != -1:  # (was taken for -1)
            raise ParameterError(
                f"{k} must be -1 (the model's tuned value) or at least 0, got {getattr(params, k):g}"
            )
    if params.foreground_threshold > 255:
        raise ParameterError(
            "foreground_threshold is a hematoxylin intensity, 0-255 (-1: the model's tuned"
            f" value), got {params.foreground_threshold:g}"
        )
    if "min_radius" in spec.thresholds:  # the classical models
        from .models.classical import check_thresholds

        check_thresholds(spec, params.model_options())


def _address_problem(address: str) -> str | None:
    """Why ``address`` (``tcp://host:port`` or ``host:port``) cannot be a dask
    scheduler's (None when it can): dask's own parsing, which otherwise
    failed in a traceback once the tiles were about to run.

    >>> _address_problem("tcp://127.0.0.1:8786"), _address_problem("host:abc")
    (None, "invalid literal for int() with base 10: 'abc'")
    """
    from distributed.comm.addressing import get_address_host_port, parse_address

    address = address if "://" in address else f"tcp://{address}"
    try:
        if parse_address(address)[0] == "inproc":  # a cluster in this process: no port
            return None
        _, port = get_address_host_port(address)
    except ValueError as exc:
        return str(exc)
    return None if 0 < port < 65536 else f"port {port} is not 1-65535"


#: the CLI's output parameters and their descriptions
_OUTPUTS = {
    "outputNucleiAnnotationFile": "the annotation file",
    "outputNucleiCSVFile": "nuclei_csv",
    "outputNucleiGeoJSONFile": "nuclei_geojson",
    "outputOverlayImageFile": "overlay_image",
}


def check_output_paths(params: DetectionParams) -> None:
    """One-line errors for output paths that cannot be written, or would
    overwrite the input or each other."""
    if params.outputNucleiAnnotationFile == "":  # (None: a library call that writes none)
        # the CLI's required output: the run analysed the slide, wrote nothing, exit 0
        raise ParameterError("the annotation file's path is empty: name the .anot file to write")
    source = os.path.realpath(params.inputImageFile)
    seen: dict[str, str] = {}
    for name, what in _OUTPUTS.items():
        path = getattr(params, name)
        if not path:
            continue
        real = os.path.realpath(path)
        if real == source:
            raise ParameterError(f"{what} {path!r} is the input image: it would be overwritten")
        if real in seen:
            raise ParameterError(f"{what} and {seen[real]} are the same file {path!r}")
        seen[real] = what
        if name == "outputOverlayImageFile" and not path.lower().endswith(".png"):
            raise ParameterError(f"{what} is written as PNG: name it .png, got {path!r}")
        if os.path.isdir(real):
            raise ParameterError(f"{what} {path!r} is a folder, not a file name")
        if os.path.exists(real) and not os.path.isfile(real):
            # (renamed over, /dev/null or a named pipe became a regular file)
            raise ParameterError(
                f"{what} {path!r} is not a regular file (a device or a pipe): name a file"
            )
        folder = os.path.dirname(real)
        while not os.path.exists(folder):  # created when written
            folder = os.path.dirname(folder)
        if not os.path.isdir(folder):
            raise ParameterError(f"{what} {path!r}: {folder!r} is a file, not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ParameterError(f"{what} {path!r}: no permission to write in {folder!r}")


def modality_mismatch(thumb: np.ndarray, tscale: float, region: list[int], spec: Any) -> str | None:
    """A warning when the analysis region (left, top, width, height) of the
    thumbnail looks like fluorescence and the model is for brightfield stains,
    or the other way round (the run goes on, but its nuclei are likely
    nonsense); None when they agree or the region is undecided."""
    from .models import list_models
    from .wsi.tissue import apparent_modality, thumbnail_window

    x, y, w, h = region
    seen = apparent_modality(thumbnail_window(thumb, (x, y, x + w, y + h), tscale))
    if seen is None or seen == spec.modality:
        return None
    others = [m for m in list_models() if get_spec(m).modality == seen]
    background = "dark" if seen == "fluorescence" else "bright"
    return (
        f"the image looks like {seen} ({background} background) but model {spec.name} is for "
        f"{spec.modality} images; its nuclei are likely wrong"
        + (f" (for {seen} images: {', '.join(others)})" if others else "")
    )


#: median chroma (max - min of R, G, B) of a region's tissue below which it
#: is grey: MoNuSeg's H&E 30-92, CCAgT's silver stains 6-14; a grey scan 0
GREY_CHROMA = 3


def colourless(
    thumb: np.ndarray, tissue: np.ndarray, tscale: float, region: list[int], spec: Any
) -> str | None:
    """A warning when a brightfield model is given a region whose tissue
    (``tissue``: the thumbnail's brightfield mask) has no colour (a
    greyscale scan): the stains are told apart by colour, and the H&E models
    miss nuclei (MoNuSeg's 13 outlined training images made grey,
    ``unet-monuseg``: AJI 0.49 / det F1 0.79 against 0.61 / 0.87 in colour);
    None for colour, fluorescence models or too little tissue."""
    from .wsi.tissue import grid_sample, thumbnail_window

    if spec.modality != "brightfield":
        return None
    x, y, w, h = region
    box = (x, y, x + w, y + h)
    # (a small region: every pixel, towards the 64)
    window = grid_sample(thumbnail_window(thumb, box, tscale)[..., :3])
    # (black fill is no stain, and the tissue mask leaves it out)
    pixels = window[grid_sample(thumbnail_window(tissue, box, tscale))]
    if len(pixels) < 64:
        return None
    chroma = pixels.max(axis=-1).astype(np.int16) - pixels.min(axis=-1)
    if float(np.median(chroma)) >= GREY_CHROMA:
        return None
    return (
        f"the image has no colour (greyscale) but model {spec.name} is for stained colour "
        "images: it tells the stains apart by colour and will miss nuclei; "
        "scan or export the slide in colour"
    )


def effective_scheduler(
    scheduler: str, num_workers: int, device: str, *, detachable: bool = True
) -> tuple[str, int]:
    """The scheduler and worker count a run uses.

    An empty ``scheduler`` means "run here": on a CPU with more than one
    worker (``num_workers``: 0 = all cores, as up to 8 threads), a thread
    pool, whose workers each run a batch through the network on cores /
    workers torch threads and post-process it while others run theirs (on 2
    cores the 100 MP mosaic ran at 3.6 MP/s in bfloat16 this way against
    3.2 serially, and 2.5-2.7 against 2.0 in float32; each worker adds
    ~0.26 GB to the ~2 GB a run holds, hence the cap); with one worker,
    serially (tiles read ahead on a thread). On a GPU, ``"pipeline"``: the
    network runs here and ``num_workers`` processes post-process its maps
    (0 = all cores but the one driving the GPU, at most 8), where that
    makes two or more, the model can post-process apart from its network
    (``detachable``, the U-Nets) and this process may start others (a
    daemonic one, e.g. a dask worker, may not); otherwise serially. (One
    worker process was no faster than none: it only moves the watershed out
    of the process that waits for the GPU, and costs its start; measured
    with a network that cost nothing on 2 cores,
    ``scripts/pipeline_ceiling.py``.) HistomicsTK's CLIs likewise start
    local workers when the scheduler is empty. Any other value is kept, with
    ``num_workers`` as given (0 = one per core).

    >>> effective_scheduler("", 2, "cpu"), effective_scheduler("", 1, "cpu")
    (('multithreading', 2), ('', 1))
    >>> effective_scheduler("", 3, "cuda:0"), effective_scheduler("", 3, "cuda:0", detachable=False)
    (('pipeline', 3), ('', 1))
    >>> effective_scheduler("multiprocessing", 3, "cpu")
    ('multiprocessing', 3)
    """
    import multiprocessing

    from .wsi import resolve_workers

    workers = resolve_workers(num_workers)
    may_spawn = not multiprocessing.current_process().daemon
    if (scheduler or "").strip() == "":
        if device != "cpu":
            if num_workers <= 0:
                workers = min(resolve_workers(num_workers - 1), _DEFAULT_MAX_THREADS)
            if workers < 2 or not (detachable and may_spawn):
                return "", 1
            return "pipeline", workers
        if num_workers <= 0:
            workers = min(workers, _DEFAULT_MAX_THREADS)
        return ("multithreading", workers) if workers > 1 else ("", 1)
    if scheduler.strip() == "pipeline" and not (detachable and may_spawn):
        raise ParameterError(
            "the 'pipeline' scheduler needs a model that post-processes apart from its"
            " network (the U-Nets) and a process that may start others (not a daemonic one):"
            " use '' or 'multithreading'"
        )
    return scheduler, workers


#: worker threads an empty scheduler starts at most when ``num_workers`` <= 0
_DEFAULT_MAX_THREADS = 8


def model_runtime(model: Any) -> dict[str, Any]:
    """``{"device": ..., "precision": ...}`` as a built model resolved them
    (``auto`` made concrete), plus ``int8_calibration`` (its sha256) for an
    int8 network and ``test_time_flips`` where the network also ran on the
    tiles' flips; a model without a network reports ``cpu`` and ``not
    applicable``."""
    out: dict[str, Any] = {
        "device": str(getattr(model, "device", "cpu")),
        "precision": str(getattr(model, "precision", "not applicable")),
    }
    calibration = getattr(model, "int8_calibration", None)
    if calibration:
        out["int8_calibration"] = str(calibration)
    if getattr(model, "tta", False):
        out["test_time_flips"] = True
    return out


def _min_overlap(spec: ModelSpec) -> int:
    """Model pixels of tile context needed so the largest nucleus is never cut."""
    return int(math.ceil(spec.max_nucleus_diameter_um / spec.mpp))


def tiling(params: DetectionParams, spec: ModelSpec) -> tuple[int, int]:
    """The tile size and overlap a run uses: those asked for, or the model's
    (-1)."""
    tile = params.analysis_tile_size if params.analysis_tile_size > 0 else spec.tile_size
    given = params.analysis_tile_overlap
    return tile, given if given >= 0 else _default_overlap(spec)


def _default_overlap(spec: ModelSpec) -> int:
    """The tile context used when none is asked for: the spec's, at least :func:`_min_overlap`."""
    return max(spec.tile_overlap, _min_overlap(spec))


def _segment_rgb(
    rgb: np.ndarray,
    net: Any,
    spec: ModelSpec,
    scale: float,
    *,
    tile_size: int,
    overlap: int,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segment an in-memory RGB image resampled by ``scale`` (model-pixel grid):
    ``(labels, scores, classes)`` on that grid."""
    import cv2

    from .wsi.runner import segment_array
    from .wsi.tissue import tissue_mask

    h, w = rgb.shape[:2]
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    if size != (w, h):
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        rgb = cv2.resize(rgb, size, interpolation=interp)
    context = net.prepare(rgb, tissue_mask(rgb, modality=spec.modality))
    lab, scores, classes = segment_array(
        rgb, net, context, tile_size=tile_size, overlap=overlap, batch_size=batch_size
    )
    return lab, scores, classes


def _region_tissue(tissue: np.ndarray, tscale: float, region: Any) -> np.ndarray:
    """The thumbnail's tissue mask inside the analysis region's bounding box."""
    inside = np.zeros(tissue.shape, bool)
    r0, c0 = int(region.top * tscale), int(region.left * tscale)
    r1 = int(math.ceil((region.top + region.height) * tscale))
    c1 = int(math.ceil((region.left + region.width) * tscale))
    inside[r0:r1, c0:c1] = tissue[r0:r1, c0:c1]
    return inside


def _sample_scale(
    slide: Any,
    model: Any,
    spec: ModelSpec,
    tissue: np.ndarray,
    tscale: float,
    region: Any,
    base_mpp: float,
    target: float,
    size: int = 768,
) -> float:
    """Scale (analysis pixels per model pixel) at which ``model`` finds nuclei
    ``target`` px across, fitted on the most tissue-rich ``size`` px window of
    the analysis region (:func:`~nucleus_models.models.unet.fit_scale`)."""
    import cv2

    from .models.unet import fit_scale

    d0 = spec.mpp / base_mpp  # base pixels per model pixel
    win_w = min(size * d0, region.width)
    win_h = min(size * d0, region.height)
    inside = _region_tissue(tissue, tscale, region).astype(np.float32)
    k = max(1, int(round(max(win_w, win_h) * tscale)))
    cy, cx = np.unravel_index(np.argmax(cv2.blur(inside, (k, k))), inside.shape)
    x0 = float(np.clip(cx / tscale - win_w / 2, region.left, region.left + region.width - win_w))
    y0 = float(np.clip(cy / tscale - win_h / 2, region.top, region.top + region.height - win_h))
    sample = slide.read_region(
        int(x0),
        int(y0),
        max(1, int(win_w)),
        max(1, int(win_h)),
        out_w=max(1, int(round(win_w / d0))),
        out_h=max(1, int(round(win_h / d0))),
    )
    overlap = _default_overlap(spec)

    def segment(scale: float) -> tuple[np.ndarray, None]:
        lab = _segment_rgb(
            sample,
            model,
            spec,
            scale,
            tile_size=spec.tile_size,
            overlap=overlap,
            batch_size=spec.batch_size,
        )[0]
        return lab > 0, None

    scale, _ = fit_scale(segment, target)
    log.info("size-normalised model %s: analysing at %.3f um/px", spec.name, spec.mpp / scale)
    return scale


def _tissue_windows(
    slide: Any,
    tissue: np.ndarray,
    tscale: float,
    region: Any,
    downsample: float,
    *,
    n: int = 8,
    size: int = 512,
) -> np.ndarray:
    """Up to ``n`` windows of ``size`` analysis pixels centred on tissue of
    the analysis region, spread over it (seeded, so a slide always gets the
    same ones), read at the analysis resolution and put side by side."""
    rows, cols = np.nonzero(_region_tissue(tissue, tscale, region))
    if rows.size == 0:  # the region's centre
        rows = np.array([int((region.top + region.height / 2) * tscale)])
        cols = np.array([int((region.left + region.width / 2) * tscale)])
    pick = np.random.default_rng(0).choice(rows.size, size=min(n, rows.size), replace=False)
    out_w = max(1, min(size, int(region.width / downsample)))
    out_h = max(1, min(size, int(region.height / downsample)))
    w = max(1, min(int(round(out_w * downsample)), int(region.width)))
    h = max(1, min(int(round(out_h * downsample)), int(region.height)))
    windows = []
    for i in sorted(pick):
        x = float(np.clip(cols[i] / tscale - w / 2, region.left, region.left + region.width - w))
        y = float(np.clip(rows[i] / tscale - h / 2, region.top, region.top + region.height - h))
        windows.append(slide.read_region(int(x), int(y), w, h, out_w=out_w, out_h=out_h)[..., :3])
    return np.concatenate(windows, axis=1)


def _in_polygons(points: np.ndarray, polygons: tuple[np.ndarray, ...]) -> np.ndarray:
    import shapely

    from .wsi.tiling import roi_geometry

    geom = roi_geometry(polygons)
    shapely.prepare(geom)
    return shapely.contains_xy(geom, points[:, 0], points[:, 1])


def _polygon_mask(
    polygons: tuple[np.ndarray, ...], shape: tuple[int, ...], scale: float
) -> np.ndarray:
    # the pixels whose centre the centroid filter (_in_polygons) would keep:
    # one geometry, so a self-crossing outline's lobes are read alike by both
    rows, cols = np.indices(shape[:2])
    centres = np.column_stack([cols.ravel(), rows.ravel()]) / scale
    mask = _in_polygons(centres, polygons).reshape(shape[:2])
    # keep tiles that only graze the polygon
    from scipy import ndimage as ndi

    return ndi.binary_dilation(mask, iterations=2)


def annotation_options(result: DetectionResult) -> dict[str, Any]:
    """Name, description, element form and class colours of the run's annotation
    document (the keywords of :func:`~nucleus_models.io.write_annotation_document`
    besides the nuclei and attributes); the folder job pushes the same document."""
    p, spec = result.params, result.spec
    return {
        "name": p.annotation_name or f"Nuclei ({spec.name})",
        "form": p.nuclei_annotation_format,
        "class_names": spec.classes,
        "class_colors": spec.class_colors,
        "description": f"{len(result.nuclei)} nuclei by {spec.name} (nucleus-models {result.version})",
    }


def summary_line(result: DetectionResult, written: list[str]) -> str:
    """What a run found, for the job's log (HistomicsUI shows it): the count,
    the model and how it ran, the region analysed, the time and the files.

    >>> from nucleus_models.models import get_spec
    >>> r = DetectionResult(
    ...     nuclei=Nuclei.empty(), params=DetectionParams("s.tif", model="classical-he"),
    ...     spec=get_spec("classical-he"), slide={}, region=[0, 0, 2000, 1000],
    ...     tiles={"total": 4, "analysed": 3}, timings={"total": 2.04},
    ...     runtime={"device": "cpu", "precision": "not applicable"}, warnings=["w"])
    >>> summary_line(r, ["/out/n.anot"])
    '0 nuclei (classical-he on cpu) in a 2000 x 1000 px region (3 of its 4 tiles held tissue), 2.0 s, 1 warning above; wrote n.anot'
    """
    runtime = result.runtime
    precision = str(runtime.get("precision", ""))
    how = f"{'' if precision in ('', 'not applicable') else precision + ' '}on {runtime['device']}"
    _, _, w, h = result.region
    tiles = result.tiles
    n_warn = len(result.warnings)
    from .wsi.slide import frame_label

    frame = frame_label(result.slide.get("frame"))
    of_frame = f" of frame {frame}" if frame else ""
    return (
        f"{len(result.nuclei)} nuclei ({result.spec.name} {how}) in a {w} x {h} px region{of_frame} "
        f"({tiles['analysed']} of its {tiles['total']} tiles held tissue), "
        f"{result.timings['total']:.1f} s"
        + (f", {n_warn} warning{'s' * (n_warn > 1)} above" if n_warn else "")
        + "; wrote "
        + ", ".join(os.path.basename(f) for f in written)
    )


def write_outputs(result: DetectionResult) -> list[str]:
    """Write every output the parameters ask for; return the paths written.

    Each file is written atomically (the JSON ones a batch of nuclei at a
    time, so a whole slide's annotation is never all in memory as Python
    objects), and the set is too: each goes to a hidden name beside its
    target first and all are renamed into place once every one is complete,
    so a failure (or a cancelled run) leaves neither a partial file nor some
    outputs without the others, and the outputs of an earlier run stay.
    """
    from .io import write_annotation_document, write_csv, write_geojson_document

    p, spec = result.params, result.spec
    prov = result.provenance()
    token = f"{os.getpid()}-{time.monotonic_ns()}"
    pending: list[tuple[str, str]] = []  # (written as, target)

    def staged(target: str) -> str:
        head, name = os.path.split(target)
        stem, ext = os.path.splitext(name)
        tmp = os.path.join(head, f".{stem}.pending-{token}{ext}")  # (same suffix: same format)
        pending.append((tmp, target))
        return tmp

    try:
        if p.outputNucleiAnnotationFile:
            write_annotation_document(
                staged(p.outputNucleiAnnotationFile),
                result.nuclei,
                **annotation_options(result),
                attributes=prov,
            )
        if p.outputNucleiCSVFile:
            write_csv(
                staged(p.outputNucleiCSVFile),
                result.nuclei,
                class_names=spec.classes,
                mpp=result.slide["mpp"],
                provenance=prov,
            )
        if p.outputNucleiGeoJSONFile:
            write_geojson_document(
                staged(p.outputNucleiGeoJSONFile),
                result.nuclei,
                class_names=spec.classes,
                class_colors=spec.class_colors,
                properties=prov,
            )
        if p.outputOverlayImageFile:
            _write_overlay(result, prov, staged(p.outputOverlayImageFile))
        for tmp, target in pending:
            os.replace(tmp, target)
    except BaseException:
        for tmp, _ in pending:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    return [target for _, target in pending]


def _write_overlay(
    result: DetectionResult, provenance: dict[str, Any], path: str, max_size: int = 2048
) -> None:
    from .io import write_overlay
    from .wsi import open_slide, parse_roi

    p = result.params
    slide = open_slide(p.inputImageFile, input_mpp=p.input_mpp if p.input_mpp > 0 else None)
    if slide.frame_count > 1:  # (the frame the nuclei were found in)
        slide.frame = int(result.slide.get("frame", {}).get("index", 0))
    x, y, w, h = result.region
    scale = min(1.0, max_size / max(w, h))
    out_w, out_h = max(1, round(w * scale)), max(1, round(h * scale))
    img = slide.read_region(x, y, w, h, out_w=out_w, out_h=out_h)
    write_overlay(
        path,
        img,
        nuclei=result.nuclei,
        origin=(x, y),
        scale=out_w / w,
        class_colors=result.spec.class_colors,
        roi_polygons=parse_roi(p.analysis_roi).polygons,
        provenance=provenance,
    )


@dataclass
class ImageSegmentation:
    """Instances of an in-memory image, on the image's own pixel grid."""

    labels: np.ndarray  # (H, W) uint32
    nuclei: Nuclei  # image-pixel coordinates
    spec: ModelSpec
    seconds: float
    analysis_mpp: float  # resolution the model ran at (its own, or the fitted one)
    runtime: dict[str, Any] = field(default_factory=dict)  # model_runtime()


def segment_image(
    image: np.ndarray,
    *,
    mpp: float,
    model: str,
    model_options: dict[str, Any] | None = None,
    tile_size: int = -1,
    overlap: int = -1,
    batch_size: int = -1,
) -> ImageSegmentation:
    """Segment an RGB image (e.g. a benchmark sample) with a registered model.

    The image is resampled to the model's resolution, segmented with the
    same tiling and seam rule as slides, and the label map is resampled back
    to the image grid (:func:`~nucleus_models.instances.resize_labels`: the
    foreground the outlines of a slide's annotation enclose, ids by nearest
    pixel centre).  A size-normalised model (its spec
    has ``thresholds["diameter_px"]``, trained with ``rescale_to_diameter``)
    instead picks the scale at which its own segmentation finds nuclei of that
    diameter, starting from the resolution (:func:`~nucleus_models.models.unet.fit_scale`).
    """
    from .instances import nuclei_from_labels, resize_labels
    from .models import get_model
    from .models.unet import fit_scale
    from .wsi.slide import to_rgb_uint8

    t0 = time.perf_counter()
    spec = get_spec(model)
    net = get_model(model, **(model_options or {}))
    rgb = to_rgb_uint8(np.asarray(image), stretch=True)
    h, w = rgb.shape[:2]
    ts = tile_size if tile_size > 0 else spec.tile_size
    ov = overlap if overlap >= 0 else _default_overlap(spec)

    def at_scale(scale: float) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        out = _segment_rgb(
            rgb,
            net,
            spec,
            scale,
            tile_size=ts,
            overlap=ov,
            batch_size=batch_size if batch_size > 0 else spec.batch_size,
        )
        return out[0] > 0, out

    start = _native_if_close(mpp / spec.mpp)
    if start > MAX_UPSAMPLING:  # (a wrong resolution: the image would not fit in memory)
        raise _too_coarse(spec.mpp, mpp, "check the image's resolution")
    target = spec.thresholds.get("diameter_px")
    if target:
        # size-normalised model: its own first segmentation picks the scale
        scale, (lab, scores, classes) = fit_scale(at_scale, float(target), start=start)
    else:
        scale = start
        lab, scores, classes = at_scale(start)[1]
    lab = resize_labels(lab, (w, h))
    nuclei = nuclei_from_labels(lab, scores=scores, classes=classes, pixel_area_um2=mpp**2)
    return ImageSegmentation(
        labels=lab.astype(np.uint32),
        nuclei=nuclei,
        spec=spec,
        seconds=time.perf_counter() - t0,
        analysis_mpp=mpp / scale,
        runtime=model_runtime(net),
    )
