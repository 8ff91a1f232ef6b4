"""``nucleus-bench speed``: NucleusDetection vs HistomicsTK's NucleiDetection, side by side.

Both CLIs run as the DSA would run them (a fresh process each, startup
included) on the same slide, region and number of cores; the command reports
wall time, megapixels/s (analysed base-layer area) and nuclei/s.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from nucleus_models.errors import NucleusModelsError, ParameterError
from nucleus_models.io.atomic import atomic_write
from nucleus_models.models.unet import PRECISIONS
from nucleus_models.wsi.runner import available_cores

__all__ = ["TimedCLIFailed", "add_arguments", "run", "time_cli"]

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``speed`` subcommand."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--slide", help="slide to analyse (e.g. ../shared/data/wsi/CMU-1-Small-Region.svs)"
    )
    src.add_argument(
        "--mosaic_from",
        help="build a pyramidal TIFF mosaic of the images in this folder (e.g. MoNuSeg's 40x images) and time on it",
    )
    parser.add_argument(
        "--mosaic_mpp", type=float, default=0.25, help="resolution written into the mosaic (um/px)"
    )
    parser.add_argument(
        "--mosaic_grid",
        type=int,
        default=4,
        help="mosaic of N x N images (images are reused in turn when the folder has fewer than N*N, "
        "to time slide-sized inputs where start-up costs no longer dominate)",
    )
    parser.add_argument(
        "--analysis_roi", default="-1,-1,-1,-1", help="left,top,width,height in base pixels"
    )
    parser.add_argument(
        "--model",
        default=cli_default_model(),
        help="our model (registry name; default: NucleusDetection's own, %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=available_cores(),
        help="cores given to each CLI (default: those this process may use)",
    )
    parser.add_argument("--input_mpp", type=float, default=-1.0, help="resolution override (um/px)")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="NucleusDetection --precision (learned U-Nets; auto: int8 on x86 CPUs, else "
        "bfloat16 on CPUs with it in hardware, else float32)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="NucleusDetection --device (auto: a CUDA GPU when there is one)",
    )
    parser.add_argument(
        "--scheduler",
        default="",
        help="NucleusDetection --scheduler (default '': what the CLI picks itself, a thread pool "
        "of --workers threads on a CPU, a pipeline on a GPU; or multithreading, pipeline, "
        "multiprocessing, tcp://host:port)",
    )
    parser.add_argument(
        "--test_time_flips",
        action="store_true",
        help="NucleusDetection --test_time_flips true (U-Nets: three network passes a batch)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per CLI (the fastest is reported)"
    )
    parser.add_argument(
        "--skip_histomicstk", action="store_true", help="time only NucleusDetection"
    )
    parser.add_argument(
        "--out",
        default="",
        help="also write the results as JSON to this file, with their provenance (package "
        "version, model and sha256, parameters, command, time)",
    )


class TimedCLIFailed(NucleusModelsError):
    """A timed CLI exited non-zero (``nucleus-bench speed`` prints it as one line)."""


def time_cli(cmd: list[str], out_file: Path, name: str) -> dict[str, Any]:
    """Run one CLI command; return wall seconds and the number of annotation elements.

    A failing CLI raises :class:`TimedCLIFailed` with ``name`` and the last
    lines it printed."""
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        tail = [s.removeprefix("error: ") for s in (res.stderr or res.stdout).strip().splitlines()]
        raise TimedCLIFailed(f"{name} failed: {' | '.join(tail[-3:])}")
    doc = json.loads(out_file.read_text())
    docs = doc if isinstance(doc, list) else [doc]
    n = sum(len(d.get("elements", [])) for d in docs)
    attrs = (docs[0].get("attributes") or {}) if docs else {}
    return {
        "seconds": wall,
        "nuclei": n,
        "stages": attrs.get("timings_s", {}),
        "runtime": attrs.get("runtime", {}),
        "tiles": attrs.get("tiles", {}),
    }


def _area_mpx(slide: str, roi: str, input_mpp: float) -> float:
    """Megapixels of base layer the ROI covers on the slide: the rectangle's,
    or for polygons the area of their union inside the slide (the pixels
    whose nuclei NucleusDetection keeps), not their bounding box's."""
    from nucleus_models.wsi import clip_region, open_slide, parse_roi

    s = open_slide(slide, input_mpp=input_mpp if input_mpp > 0 else None)
    r = clip_region(parse_roi(roi), s.width, s.height)
    if not r.polygons:
        return r.width * r.height / 1e6
    import shapely

    from nucleus_models.wsi.tiling import roi_geometry

    inside = roi_geometry(r.polygons).intersection(shapely.box(0, 0, s.width, s.height))
    return float(inside.area) / 1e6


def _histomicstk_cli() -> Path:
    import histomicstk

    return Path(histomicstk.__file__).parent / "cli" / "NucleiDetection" / "NucleiDetection.py"


def make_mosaic(folder: str, out: Path, *, grid: int, mpp: float) -> Path:
    """Tile ``grid * grid`` images of ``folder`` (in name order, reused in turn
    when there are fewer) into one pyramidal TIFF."""
    import numpy as np
    import pyvips
    from PIL import Image

    from nucleus_models.detection import mpp_problem

    if grid < 1:
        raise ParameterError(f"--mosaic_grid {grid}: expected 1 or more")
    if why := mpp_problem(mpp):
        raise ParameterError(f"--mosaic_mpp {mpp:g}: {why}")
    if not Path(folder).is_dir():
        raise ParameterError(f"--mosaic_from {folder}: not a folder")
    files = sorted(
        p for p in Path(folder).iterdir() if p.suffix.lower() in (".tif", ".tiff", ".png", ".jpg")
    )
    if not files:
        raise ParameterError(
            f"--mosaic_from {folder} has no .tif/.png/.jpg images for a mosaic (a dataset's "
            "images/ folder, e.g. monuseg2018/train/images)"
        )
    if len(files) < grid * grid:
        log.warning("mosaic: %d images reused in turn for %d cells", len(files), grid * grid)
    images = [np.asarray(Image.open(f).convert("RGB")) for f in files[: grid * grid]]
    tiles = [images[i % len(images)] for i in range(grid * grid)]
    h = min(t.shape[0] for t in tiles)
    w = min(t.shape[1] for t in tiles)
    rows = [np.hstack([t[:h, :w] for t in tiles[r * grid : (r + 1) * grid]]) for r in range(grid)]
    arr = np.ascontiguousarray(np.vstack(rows))
    img = pyvips.Image.new_from_memory(arr.data, arr.shape[1], arr.shape[0], 3, "uchar")
    img.tiffsave(
        str(out), tile=True, tile_width=256, tile_height=256, pyramid=True, compression="jpeg", Q=90,
        xres=1000.0 / mpp, yres=1000.0 / mpp, resunit="cm",
    )  # fmt: skip
    return out


def _check_out(path: Path) -> None:
    """Fail now, not after the timing, when no file can be written at ``path``."""
    if path.is_dir():
        raise ParameterError(f"--out {path} is a folder, not a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".speed-"):
            pass
    except OSError as exc:
        raise ParameterError(f"cannot write --out {path}: {exc.strerror}") from None


def run(args: argparse.Namespace, command: str | None = None) -> int:
    """Time both CLIs and print a side-by-side table (``command``: the command
    line recorded with ``--out``'s results)."""
    if args.repeat < 1:
        raise ParameterError(f"--repeat must be at least 1, got {args.repeat}")
    if args.out:
        _check_out(Path(args.out))
    if not args.mosaic_from:
        return _run(args, command)
    # the mosaic (~125 MB for 10 x 10 MoNuSeg images) goes when the timing ends
    with tempfile.TemporaryDirectory(prefix="nucleus-speed-") as tmpdir:
        args.slide = str(
            make_mosaic(
                args.mosaic_from,
                Path(tmpdir) / "mosaic.tif",
                grid=args.mosaic_grid,
                mpp=args.mosaic_mpp,
            )
        )
        return _run(args, command)


def cli_default_model() -> str:
    """The model NucleusDetection runs when HistomicsUI's user picks none:
    the ``<default>`` of its XML's ``model`` parameter.

    >>> cli_default_model()
    'unet-monuseg'
    """
    import xml.etree.ElementTree as ET

    import cli

    xml = Path(cli.__file__).resolve().parent / "NucleusDetection" / "NucleusDetection.xml"
    for param in ET.parse(xml).getroot().iter("string-enumeration"):
        if param.findtext("name") == "model":
            return str(param.findtext("default"))
    raise ValueError(f"{xml}: no model parameter")


def nucleus_detection_command(args: argparse.Namespace, out: Path) -> list[str]:
    """The timed ``NucleusDetection`` command line, as the DSA would run it.

    >>> a = argparse.Namespace(slide="s.tif", model="unet-monuseg", analysis_roi="-1,-1,-1,-1",
    ...     scheduler="", workers=2, precision="auto", device="cuda", input_mpp=-1.0)
    >>> nucleus_detection_command(a, Path("o.anot"))[9:]
    ['--scheduler', '', '--num_workers', '2', '--precision', 'auto', '--device', 'cuda']
    """
    cmd = [
        sys.executable, "-m", "cli", "NucleusDetection", args.slide, str(out),
        "--model", args.model, f"--analysis_roi={args.analysis_roi}",
        "--scheduler", args.scheduler, "--num_workers", str(args.workers),
        "--precision", args.precision, "--device", args.device,
    ]  # fmt: skip
    if args.input_mpp > 0:
        cmd += ["--input_mpp", str(args.input_mpp)]
    if getattr(args, "test_time_flips", False):
        cmd += ["--test_time_flips", "true"]
    return cmd


def _run(args: argparse.Namespace, command: str | None) -> int:
    area = _area_mpx(args.slide, args.analysis_roi, args.input_mpp)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        ours_out = Path(tmp) / "ours.anot"
        ours = nucleus_detection_command(args, ours_out)
        candidates = [("NucleusDetection (" + args.model + ")", ours, ours_out)]
        if not args.skip_histomicstk:
            htk_out = Path(tmp) / "htk.anot"
            htk = [
                sys.executable, str(_histomicstk_cli()), args.slide, str(htk_out),
                f"--analysis_roi={args.analysis_roi}", "--num_workers", str(args.workers),
                "--num_threads_per_worker", "1", "--nuclei_annotation_format", "boundary",
            ]  # fmt: skip
            candidates.append(("HistomicsTK NucleiDetection", htk, htk_out))
        for name, cmd, out in candidates:
            best: dict[str, Any] | None = None
            for _ in range(args.repeat):
                r = time_cli(cmd, out, name)
                if best is None or r["seconds"] < best["seconds"]:
                    best = r
            assert best is not None
            rows.append(
                {
                    "cli": name,
                    "seconds": round(best["seconds"], 2),
                    "nuclei": best["nuclei"],
                    "megapixels": round(area, 3),
                    "megapixels_per_s": round(area / best["seconds"], 3),
                    "nuclei_per_s": round(best["nuclei"] / best["seconds"], 1),
                    "stages_s": best.get("stages", {}),
                    "runtime": best.get("runtime", {}),
                    "tiles": best.get("tiles", {}),
                }
            )
    header = f"{'CLI':40s} {'seconds':>8s} {'nuclei':>8s} {'MP':>7s} {'MP/s':>7s} {'nuclei/s':>9s}"
    lines = [
        f"slide: {args.slide}  roi: {args.analysis_roi}  workers: {args.workers}  cores: {available_cores()}",
        header,
    ]
    for r in rows:
        lines.append(
            f"{r['cli']:40s} {r['seconds']:8.2f} {r['nuclei']:8d} {r['megapixels']:7.2f} "
            f"{r['megapixels_per_s']:7.3f} {r['nuclei_per_s']:9.1f}"
        )
    for r in rows:
        st = r.get("stages_s") or {}
        if "network_cpu" in st:
            lines.append(
                f"  {r['cli']}: setup {st.get('setup', 0):.2f}s, tiles {st.get('tiles', 0):.2f}s wall; "
                f"summed over workers: read {st['read_cpu']:.2f}s, network {st['network_cpu']:.2f}s, "
                f"post-processing {st['postprocess_cpu']:.2f}s"
            )
        rt = r.get("runtime") or {}
        if rt:
            tl = r.get("tiles") or {}
            lines.append(
                f"  {r['cli']}: device {rt.get('device')}, precision {rt.get('precision')}, "
                f"scheduler {tl.get('scheduler', '?')} with {tl.get('workers', '?')} worker(s)"
            )
    sys.stdout.write("\n".join(lines) + "\n")
    if args.out:
        from nucleus_models.models import get_spec

        from .evaluate import provenance

        params = {k: v for k, v in vars(args).items() if k not in ("command", "verbose")}
        record = {"slide": args.slide, "roi": args.analysis_roi, "rows": rows}
        record["provenance"] = provenance(get_spec(args.model), params, command)
        with atomic_write(args.out) as f:
            f.write(json.dumps(record, indent=2) + "\n")
    return 0
