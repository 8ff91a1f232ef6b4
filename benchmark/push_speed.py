"""Push speed of nucleus annotations to Girder, and HistomicsUI-style region queries.

Pushes synthetic nucleus annotations (points, or 12-vertex polygons like the
classical detector's, with class, colour and per-nucleus score) of 10k, 100k
or 1M elements to one item through :func:`nucleus_models.dsa.push_annotation`
(one POST of the whole document, verified, replacing the previous one) and
times them; then times ``GET annotation/{id}`` region queries the way
HistomicsUI asks for them: a full-resolution viewport, a zoomed-out viewport
with ``minimumSize``/``maxDetails``, the whole slide with ``maxDetails``, and
``centroids=true`` for the whole slide.

Against the integration-test server (started here, ``.venv-girder`` needed)::

    .venv/bin/python -m benchmark.push_speed --sizes 10000 100000 --out bench_out/push.json

``--batched 5000`` pushes the documents a batch at a time, as the folder job
does; ``--memory`` adds the push's peak of Python allocations.

or an existing server (token from ``GIRDER_TOKEN``)::

    .venv/bin/python -m benchmark.push_speed --api-url URL --item ITEM_ID --sizes 10000

Note: the test server keeps its database in process memory (mongomock), so its
numbers are a lower bound on speed compared with a real MongoDB.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["synthetic_document", "time_push", "time_queries", "main"]

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]
NUCLEUS_SPACING = 20.0  # px between nuclei centres: ~2500 nuclei/mm^2 at 0.5 um/px


def synthetic_document(n: int, form: str, *, seed: int = 0) -> tuple[dict[str, Any], int]:
    """An annotation document of ``n`` nuclei on a square slide; returns it and the slide side."""
    rng = np.random.default_rng(seed)
    side = int(math.ceil(math.sqrt(n)) * NUCLEUS_SPACING)
    centres = np.round(rng.uniform(10, side - 10, (n, 2)), 1)
    scores = np.round(rng.uniform(0.3, 1.0, n), 3).tolist()
    elements: list[dict[str, Any]] = []
    if form == "point":
        for (x, y), s in zip(centres.tolist(), scores, strict=True):
            elements.append(
                {
                    "type": "point",
                    "center": [x, y, 0],
                    "lineColor": "rgb(0,200,255)",
                    "lineWidth": 1,
                    "group": "nucleus",
                    "user": {"score": s},
                }
            )
    else:
        ang = np.linspace(0, 2 * np.pi, 12, endpoint=False)
        ring = np.c_[np.cos(ang), np.sin(ang)]
        radii = rng.uniform(4, 8, n)
        for i, s in enumerate(scores):
            pts = np.round(centres[i] + radii[i] * ring, 1)
            elements.append(
                {
                    "type": "polyline",
                    "closed": True,
                    "points": np.c_[pts, np.zeros(12)].tolist(),
                    "fillColor": "rgba(0,200,255,0.25)",
                    "lineColor": "rgb(0,200,255)",
                    "lineWidth": 1,
                    "group": "nucleus",
                    "user": {"score": s, "area_um2": round(math.pi * radii[i] ** 2 / 4, 2)},
                }
            )
    doc = {"name": f"Nuclei bench {form} {n}", "elements": elements, "attributes": {"n": n}}
    return doc, side


def time_push(
    client: Any, item_id: str, doc: dict[str, Any], *, batched: int = 0, memory: bool = False
) -> dict[str, Any]:
    """Push ``doc`` (replacing the previous benchmark annotation) and time it.

    ``batched`` > 0 pushes it as a :class:`~nucleus_models.dsa.BatchedDocument`
    of that many elements a batch (as the folder job does); ``memory`` records
    the push's peak of Python allocations (``tracemalloc``, which slows it).
    """
    import tracemalloc

    from nucleus_models.dsa import BatchedDocument, push_annotation

    body: Any = BatchedDocument.from_document(doc, batched) if batched > 0 else doc
    if memory:
        tracemalloc.start()
    t0 = time.perf_counter()
    try:
        res = push_annotation(client, item_id, body, analysis_key="push-speed-benchmark")
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1] if memory else None
    finally:
        if memory:
            tracemalloc.stop()
    return {
        "annotation_id": res.annotation_id,
        "elements": res.element_count,
        "push_s": round(seconds, 2),
        "mbytes": round(res.upload_bytes / 1e6, 1),
        "elements_per_s": round(res.element_count / max(seconds, 1e-9)),
        "client_peak_mb": None if peak is None else round(peak / 1e6, 1),
    }


def time_queries(client: Any, annotation_id: str, side: int) -> dict[str, Any]:
    """Time the region queries HistomicsUI makes while a user pans and zooms."""
    c = side / 2
    queries = {
        "viewport_full_res": {
            "left": c - 1024,
            "top": c - 512,
            "right": c + 1024,
            "bottom": c + 512,
        },
        "viewport_zoom_out_8x": {
            "left": c - 8192,
            "top": c - 4096,
            "right": c + 8192,
            "bottom": c + 4096,
            "minimumSize": 8,
            "maxDetails": 250000,
        },
        "whole_slide_maxDetails": {
            "left": 0,
            "top": 0,
            "right": side,
            "bottom": side,
            "maxDetails": 250000,
        },
        "whole_slide_centroids": {
            "left": 0,
            "top": 0,
            "right": side,
            "bottom": side,
            "centroids": "true",
        },
    }
    out: dict[str, Any] = {}
    for name, params in queries.items():
        t0 = time.perf_counter()
        resp = client.sendRestRequest(
            "GET", f"annotation/{annotation_id}", params, jsonResp=False, timeout=(10, 600)
        )
        seconds = time.perf_counter() - t0
        if params.get("centroids"):
            # JSON wrapper, NUL, 28-byte records (12-byte id + <fffl), NUL, JSON trailer
            body = resp.content
            start = body.index(b'"elements": [\x00') + len(b'"elements": [\x00')
            returned = (body.rindex(b"\x00") - start) // 28
        else:
            returned = len(resp.json()["annotation"]["elements"])
        out[name] = {
            "s": round(seconds, 3),
            "returned": returned,
            "mbytes": round(len(resp.content) / 1e6, 2),
        }
    return out


def _server_and_item(args: argparse.Namespace, workdir: Path) -> tuple[Any, Any, str]:
    from nucleus_models.dsa import connect

    if args.api_url:
        return None, connect(args.api_url), args.item
    sys.path.insert(0, str(REPO / "tests"))
    from girder_server import GirderServer, create_folder, upload_slide  # type: ignore[import-not-found]

    server = GirderServer(workdir).start()
    gc = server.setup_admin()
    folder = create_folder(gc, "bench")
    item = upload_slide(gc, folder["_id"], REPO / "samples" / "CMU-1-Small-Region-crop.tif")
    return server, connect(server.api_url, server.token), item["_id"]


def _measure(args: argparse.Namespace, form: str, n: int) -> dict[str, Any]:
    """One push and its queries, on a fresh test server (mongomock has no indexes:
    every query scans the whole element collection, so earlier runs would slow later ones)."""
    from nucleus_models.dsa.annotations import delete_annotation

    with tempfile.TemporaryDirectory(prefix="push-speed-") as tmp:
        server, client, item_id = _server_and_item(args, Path(tmp))
        row: dict[str, Any] = {"form": form, "n": n}
        try:
            doc, side = synthetic_document(n, form)
            row |= time_push(client, item_id, doc, batched=args.batched, memory=args.memory)
            del doc
            row["queries"] = time_queries(client, row["annotation_id"], side)
            return row
        finally:
            if server is not None:
                server.stop()
            elif row.get("annotation_id"):  # never leave the synthetic nuclei on a user's slide
                delete_annotation(client, row["annotation_id"])


def main(argv: list[str] | None = None) -> None:
    """Run the measurements and print a Markdown table (JSON with ``--out``)."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument(
        "--forms", nargs="+", default=["point", "polygon"], choices=["point", "polygon"]
    )
    ap.add_argument("--api-url", default="", help="existing server (token from GIRDER_TOKEN)")
    ap.add_argument("--item", default="", help="item to push to (with --api-url)")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    ap.add_argument(
        "--batched",
        type=int,
        default=0,
        help="push as a BatchedDocument of this many elements a batch (the folder job: 5000)",
    )
    ap.add_argument(
        "--memory",
        action="store_true",
        help="record the push's peak of Python allocations (tracemalloc; slows the push)",
    )
    ap.add_argument(
        "--budget-s", type=float, default=300.0, help="skip sizes projected to take longer"
    )
    args = ap.parse_args(argv)
    from nucleus_models.cli_support import fail, log_level

    logging.basicConfig(level=log_level(), stream=sys.stderr)
    if min(args.sizes) < 1:
        fail(f"--sizes: each at least 1, got {min(args.sizes)}")
    if args.api_url and not args.item:
        fail("--api-url needs --item, the large-image item to push to (and remove from)")
    if args.out and Path(args.out).is_dir():
        fail(f"--out {args.out} is a folder, not a file")
    rows: list[dict[str, Any]] = []
    for form in args.forms:
        rate = 0.0
        for n in sorted(args.sizes):
            if rate and n / rate > args.budget_s:
                rows.append({"form": form, "n": n, "skipped": f"projected {n / rate:.0f} s"})
                continue
            rows.append(_measure(args, form, n))
            rate = rows[-1]["elements_per_s"]
            log.warning("%s", json.dumps(rows[-1]))
    _print_table(rows)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        record = {"rows": rows, "provenance": _provenance(args, argv)}
        Path(args.out).write_text(json.dumps(record, indent=1))


def _provenance(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    """What the timings were measured with: package and library versions
    (girder-client's too), the server (a throw-away test server unless
    ``--api-url``), the options, the command line (``argv``, as :func:`main`
    was given it; the process's own arguments without) and the time."""
    from datetime import datetime, timezone

    import girder_client

    from nucleus_models import __version__
    from nucleus_models.detection import library_versions

    given = sys.argv[1:] if argv is None else argv
    return {
        "package_version": __version__,
        "libraries": {**library_versions(), "girder_client": girder_client.__version__},
        "server": args.api_url or "test server (tests/girder_server.py, mongomock)",
        "params": {k: v for k, v in vars(args).items() if k != "api_url"},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, "-m", "benchmark.push_speed", *given]),
    }


def _print_table(rows: list[dict[str, Any]]) -> None:
    qnames = [
        "viewport_full_res",
        "viewport_zoom_out_8x",
        "whole_slide_maxDetails",
        "whole_slide_centroids",
    ]
    head = (
        "| form | elements | MB | push s | elements/s | client peak MB | "
        + " | ".join(f"{q} s (n)" for q in qnames)
        + " |"
    )
    lines = [head, "|" + "---|" * (6 + len(qnames))]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['form']} | {r['n']} | skipped: {r['skipped']} |")
            continue
        q = r["queries"]
        cells = [f"{q[k]['s']} ({q[k]['returned']})" for k in qnames]
        lines.append(
            f"| {r['form']} | {r['n']} | {r['mbytes']} | {r['push_s']} | {r['elements_per_s']} | "
            f"{r['client_peak_mb'] if r['client_peak_mb'] is not None else '-'} | "
            + " | ".join(cells)
            + " |"
        )
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
