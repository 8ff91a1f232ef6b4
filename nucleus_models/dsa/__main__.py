"""``python -m nucleus_models.dsa folder-job``: the folder job for cron.

The token comes from the ``GIRDER_TOKEN`` environment variable (never from the
command line, where ``ps`` would show it), or, when that is not set, a
long-lived API key from ``GIRDER_API_KEY``, exchanged for a token at the
start. Progress and per-item results are logged to stderr; bad input (unreachable server, bad token, unknown folder)
prints one ``error: ...`` line and exits with status 2. With ``--strict`` the
exit status is 1 when any slide failed. While another run of the same analysis
key holds the folder (a run outlasting the cron interval) it logs a warning and
exits with status 0 without analysing anything.

Example::

    GIRDER_TOKEN=... python -m nucleus_models.dsa folder-job \\
        --api-url https://dsa.example.org/api/v1 --folder 5f0c... --model classical-he
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from typing import Any, NoReturn

__all__ = ["main", "build_parser"]

log = logging.getLogger(__name__)


def _roi(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None


def _seconds(text: str) -> float:
    """A positive, finite number of seconds (requests refused 0 and
    negative time-outs in a traceback, at the first request)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _retries(text: str) -> int:
    """A whole number of retries, 0 or more (0: each request tried once)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of retries, 0 or more (0: no retry), got {text!r}"
        )
    return value


def shown_default(default: Any) -> str:
    """A flag's default as ``--help`` shows it; "" where none is shown (no
    default, a switch, an empty string).

    >>> shown_default([0.5, 2.0]), shown_default(0.25), shown_default(False), shown_default("x")
    ('0.5,2', '0.25', '', 'x')
    """
    if default is None or default is False or default == "":
        return ""
    if isinstance(default, list):
        return ",".join(f"{v:g}" for v in default)
    return f"{default:g}" if isinstance(default, float) else str(default)


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one ``error: ...`` line and exit status 2."""

    def error(self, message: str) -> NoReturn:  # noqa: D102
        from ..cli_support import fail

        fail(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    """The command line (flags mirror the NucleusFolderJob CLI's parameters)."""
    from ..models import list_models
    from ..models.unet import PRECISIONS
    from .folder_job import ANALYSES, DEVICES, FolderJobParams

    d = FolderJobParams(inputFolder="")
    ap = _OneLineParser(
        prog="python -m nucleus_models.dsa",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="command", required=True)
    fj = sub.add_parser("folder-job", help="run an analysis on every large image of a folder")

    def add(*flags: str, **kwargs: Any) -> None:
        """Flags, each also spelt with underscores (``--input_mpp``, the CLI's
        and the error messages' spelling, as well as ``--input-mpp``); the
        help ends with the default, when there is one to show."""
        also = ["--" + f[2:].replace("-", "_") for f in flags if "-" in f[2:]]
        if shown := shown_default(kwargs.get("default")):
            kwargs["help"] = f"{kwargs['help']} (default: {shown})"
        fj.add_argument(*flags, *also, **kwargs)

    models = ", ".join(list_models())
    add("--api-url", dest="girderApiUrl", required=True, help="Girder API root URL")
    add("--folder", dest="inputFolder", required=True, help="Girder folder id")
    add(
        "--analysis",
        choices=sorted(ANALYSES),
        default=d.analysis,
        help="analysis run on each slide",
    )
    add(
        "--analysis-key",
        dest="analysis_key",
        default="",
        help="identity of this analysis on each item (default: the --analysis name); a re-run "
        "with the same key replaces its annotation and metadata, another key keeps both",
    )
    add("--force", action="store_true", help="redo items that are already done")
    add("--model", default=d.model, help=f"nucleus model: {models}")
    add(
        "--analysis-roi",
        dest="analysis_roi",
        type=_roi,
        default=d.analysis_roi,
        help="region of every slide: left,top,width,height in base pixels, or polygon "
        "vertices x1,y1,x2,y2,...; -1,-1,-1,-1 is the whole slide",
    )
    add(
        "--input-mpp",
        dest="input_mpp",
        type=float,
        default=d.input_mpp,
        help="microns per base pixel, for slides without one; -1: the slide's own",
    )
    add(
        "--frame",
        default=d.frame,
        help="the frame of multi-frame slides (multiplex fluorescence, z-stacks) to analyse: "
        "its index (0 is the first) or its channel's name, any case (e.g. DAPI); empty: each "
        "slide's one nuclear-stain channel (DAPI, Hoechst, DRAQ5, DNA), else frame 0 with a "
        "warning; a slide without that channel fails alone",
    )
    add(
        "--format",
        "--nuclei-annotation-format",
        dest="nuclei_annotation_format",
        choices=["polygon", "point", "box"],
        default=d.nuclei_annotation_format,
        help="element drawn per nucleus",
    )
    add(
        "--annotation-name",
        dest="annotation_name",
        default="",
        help='name of the annotation (default: "Nuclei (<model>)")',
    )
    add(
        "--tile-size",
        "--analysis-tile-size",
        dest="analysis_tile_size",
        type=int,
        default=-1,
        help="tile size in pixels at the model's resolution; -1: the model's",
    )
    add(
        "--tile-overlap",
        "--analysis-tile-overlap",
        dest="analysis_tile_overlap",
        type=int,
        default=-1,
        help="context read around each tile (pixels at the model's resolution); -1: the model's",
    )
    add(
        "--min-fgnd-frac",
        dest="min_fgnd_frac",
        type=float,
        default=0.0,
        help="tiles with at most this fraction of tissue are skipped",
    )
    add(
        "--batch-size",
        dest="batch_size",
        type=int,
        default=d.batch_size,
        help="tiles per model call; -1: the model's",
    )
    add(
        "--device",
        choices=list(DEVICES),
        default=d.device,
        help="where learned models run: auto picks a GPU when one is available",
    )
    add(
        "--precision",
        choices=list(PRECISIONS),
        default=d.precision,
        help="arithmetic of learned U-Nets: auto is int8 on x86 CPUs (else bfloat16 where the "
        "CPU has it in hardware, else float32) and float32 on GPUs; int8 runs on CPUs only; "
        "any but auto redoes the slides done with auto (a few nuclei can differ), while "
        "--device and --batch-size redo none",
    )
    add(
        "--test-time-flips",
        dest="test_time_flips",
        action="store_true",
        help="U-Nets: average the network over each tile and its two flips (3x its time)",
    )
    # the classical models' thresholds (HistomicsTK's names; -1: the model's own)
    for name in (
        "foreground_threshold",
        "min_radius",
        "max_radius",
        "local_max_search_radius",
        "min_nucleus_area",
    ):
        add(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=float,
            default=-1.0,
            help="classical models' setting (HistomicsTK's name); -1: the model's own",
        )
    add(
        "--scheduler",
        default="",
        help="empty: a thread pool on a CPU, a pipeline on a GPU; or multithreading, "
        "pipeline, multiprocessing, tcp://host:port (a dask scheduler)",
    )
    add(
        "--num-workers",
        dest="num_workers",
        type=int,
        default=0,
        help="workers; 0: all the cores this process may use, negative: that many fewer",
    )
    add("--timeout", type=_seconds, default=120.0, help="seconds per request")
    add(
        "--retries",
        type=_retries,
        default=4,
        help="retries of a failed request after its first try (0: none; 4: 5 tries)",
    )
    add("--workdir", default=None, help="where slides are downloaded (temporary)")
    add("--strict", action="store_true", help="exit 1 when any slide failed")
    return ap


class _ProgressLog:
    def __init__(self, step: float = 0.05):
        self.step, self.last = step, -1.0

    def __call__(self, frac: float) -> None:
        if frac - self.last >= self.step or (frac >= 1.0 > self.last):
            self.last = frac
            log.info("progress %.0f%%", 100 * frac)


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    from ..cli_support import (
        Terminated,
        fail,
        handle_termination,
        join_negative_values,
        log_level,
    )
    from ..errors import NucleusModelsError
    from .client import TOKEN_ENV, RetryPolicy, connect, install_log_redaction
    from .folder_job import FolderJobParams, run_folder_job, summary_name
    from .lease import FolderBusy

    logging.basicConfig(
        level=log_level("INFO"),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("large_image", "distributed", "tornado", "PIL", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    install_log_redaction()

    if argv is None:  # run as a command, not called from Python
        handle_termination()
    ns: Any = build_parser().parse_args(
        join_negative_values(sys.argv[1:] if argv is None else argv)
    )
    params = FolderJobParams.from_namespace(ns)
    policy = RetryPolicy(attempts=1 + ns.retries, read_timeout=ns.timeout)
    try:
        params.check()  # before connecting
        client = connect(params.girderApiUrl, os.environ.get(TOKEN_ENV), retry=policy)
        outcomes = run_folder_job(client, params, progress=_ProgressLog(), workdir=ns.workdir)
    except FolderBusy as exc:  # a cron run outlasting its interval: the other run goes on
        log.warning("%s", exc)
        return 0
    except NucleusModelsError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except Terminated:
        fail("terminated (SIGTERM)", 143)
    failed = [o for o in outcomes if o.status == "failed"]
    log.info(
        "%d item(s): %d done, %d skipped, %d failed, %d not analysed; summary in %s",
        len(outcomes),
        sum(o.status == "done" for o in outcomes),
        sum(o.status == "skipped" for o in outcomes),
        len(failed),
        sum(o.status == "not_analysed" for o in outcomes),
        summary_name(params.key()),
    )
    return 1 if failed and ns.strict else 0


if __name__ == "__main__":
    sys.exit(main())
