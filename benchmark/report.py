"""Markdown and HTML report of a ``nucleus-bench eval`` run, built from its ``metrics.json``.

:func:`write_report` reads ``OUT/metrics.json``, draws PNG figures into
``OUT/figures/`` with matplotlib's Agg canvas (no pyplot state, no display
needed) and writes ``OUT/report.md`` plus a self-contained ``OUT/report.html``
(figures embedded as data URIs). Figures: a per-sample bar plot of the main
metric, predicted-vs-true counts with Pearson r, the pooled precision-recall
curve, and TP (green) / FP (blue) / FN (red) overlays of the first samples,
which reload the images and annotations from the dataset named in the
provenance (or the ``dataset`` object given) and the predictions in ``OUT``.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .datasets import Dataset, DatasetError, get_dataset
from .metrics import label_overlap, match_points_within_radius, pearson_r

__all__ = ["write_report"]

logger = logging.getLogger(__name__)

TP_COLOR, FP_COLOR, FN_COLOR = (0, 200, 0), (30, 110, 255), (230, 0, 0)
_TABLE_METRICS = {
    "instances": ("det_f1", "precision", "recall", "f1_iou50", "aji", "dice", "pq"),
    "points": ("f1", "precision", "recall"),
}
Block = tuple[Any, ...]
#: What each column of a report means, for a reader without the code (the
#: names alone do not say which AJI, nor that det_f1 matches by centroid)
_METRIC_DEFINITIONS = {
    "instances": (
        "det_f1, precision, recall: detection by hit-in-mask (a predicted nucleus is a true "
        "positive when its centroid lies inside a true nucleus that no higher-scoring "
        "prediction has hit; no distance radius); f1_iou50, precision_iou50, recall_iou50: "
        "one-to-one matches at IoU > 0.5; aji: Aggregated Jaccard Index as Kumar et al. 2017 "
        "define it (each true nucleus takes the prediction of highest IoU, which several "
        "nuclei may share; not AJI+); dice: Dice of the foreground pixels; pq, dq, sq: "
        "panoptic quality and its detection and segmentation parts (Kirillov et al. 2019) at "
        "IoU > 0.5; map_dsb: the Data Science Bowl 2018 score, TP / (TP + FP + FN) averaged "
        "over IoU thresholds 0.50-0.95; ap: area under the pooled precision-recall curve of "
        "the hit-in-mask detections ranked by score. Pooled values are computed from the "
        "counts of all images together; aji, dice, pq, dq, sq and map_dsb are per-image scores, "
        "shown as their mean."
    ),
    "points": (
        "f1, precision, recall: predictions matched one to one to true points (the most "
        "pairs, then the higher-scoring predictions, then the shortest distances) within the "
        "radius; ap: area under the pooled precision-recall curve of the predictions ranked "
        "by score. Pooled values are computed from the counts of all images together."
    ),
}


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def _save(fig: Figure, path: Path, dpi: float = 100) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi)
    return path


def _bin_name(b: dict) -> str:
    hi = "inf" if b["hi"] is None else f"{b['hi']:g}"
    return f"[{b['lo']:g}, {hi})"


def _short(text: str, n: int = 18) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


# -- figures -----------------------------------------------------------------------
def _bar_plot(rows: list[dict], key: str, mean: float | None, path: Path) -> Path:
    vals = [np.nan if r.get(key) is None else r[key] for r in rows]
    fig = Figure(figsize=(7, 1.2 + 0.28 * len(rows)))
    ax = fig.add_subplot()
    y = np.arange(len(rows))
    ax.barh(y, vals, color="#4c72b0")
    ax.set_yticks(y, [_short(r["id"], 26) for r in rows], fontsize=7)
    ax.invert_yaxis()
    if mean is not None:
        ax.axvline(mean, color="k", ls="--", lw=1, label=f"mean {mean:.3f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel(key)
    ax.set_title(f"{key} per sample")
    fig.tight_layout()
    return _save(fig, path)


def _count_scatter(rows: list[dict], path: Path) -> tuple[Path, float | None]:
    t = np.array([r["n_true"] for r in rows], float)
    p = np.array([r["n_pred"] for r in rows], float)
    r, _ = pearson_r(t, p)
    r = None if np.isnan(r) else r
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.scatter(t, p, s=18, color="#4c72b0")
    hi = max(1.0, float(np.max(np.r_[t, p]))) * 1.05
    ax.plot([0, hi], [0, hi], color="grey", lw=1, ls="--")
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
    ax.set_xlabel("true nuclei per sample")
    ax.set_ylabel("predicted nuclei per sample")
    ax.set_title(f"Predicted vs true counts (r = {_fmt(r)}, n = {len(rows)})")
    fig.tight_layout()
    return _save(fig, path), r


def _pr_plot(curve: dict, pooled: dict, path: Path) -> Path:
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.plot(curve["recall"], curve["precision"], color="#4c72b0", lw=1.5)
    ax.scatter([pooled["recall"]], [pooled["precision"]], color="k", zorder=3, s=20)
    ax.annotate(
        "all detections",
        (pooled["recall"], pooled["precision"]),
        xytext=(-70, -14),
        textcoords="offset points",
        fontsize=8,
    )
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ap = curve.get("ap")
    ax.set_title(f"Precision-recall ({curve['match']}, pooled), AP = {_fmt(ap)}")
    fig.tight_layout()
    return _save(fig, path)


def _display_rgb(image: np.ndarray) -> np.ndarray:
    """8-bit RGB for display (greyscale / high bit depth stretched to 1-99.5 percentiles)."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] >= 3 and a.dtype == np.uint8:
        return np.ascontiguousarray(a[..., :3])
    a = a.astype(np.float64)
    if a.ndim == 3:
        a = a[..., :3] if a.shape[2] >= 3 else a[..., 0]
    lo, hi = np.percentile(a, (1, 99.5))
    out = np.clip((a - lo) / max(hi - lo, 1e-9) * 255, 0, 255).astype(np.uint8)
    return np.repeat(out[..., None], 3, axis=2) if out.ndim == 2 else out


def _overlay_figure(rgb: np.ndarray, title: str) -> tuple[Figure, Any]:
    h, w = rgb.shape[:2]
    scale = max(1.0, 800 / max(h, w))
    dpi = 100
    fig = Figure(figsize=(w * scale / dpi, h * scale / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(rgb, interpolation="nearest")
    ax.set_axis_off()
    ax.text(4, 4, title, va="top", fontsize=8, color="w", backgroundcolor=(0, 0, 0, 0.5))
    return fig, ax


def _legend(ax: Any, counts: Sequence[int]) -> None:
    names = ("TP", "FP", "FN")
    colors = (TP_COLOR, FP_COLOR, FN_COLOR)
    handles = [
        Patch(color=np.array(c) / 255, label=f"{n} ({k})")
        for n, c, k in zip(names, colors, counts, strict=True)
    ]
    ax.legend(handles=handles, loc="lower right", fontsize=8, framealpha=0.7)


def _instance_overlay(sample: Any, pred_path: Path, title: str, path: Path) -> Path:
    import tifffile
    from skimage.segmentation import find_boundaries

    truth, pred = np.asarray(sample.labels), tifffile.imread(pred_path)
    ov = label_overlap(truth, pred)
    m = ov.iou > 0.5
    tp_pred, tp_true = ov.pred_ids[ov.pj[m]], ov.true_ids[ov.ti[m]]
    rgb = _display_rgb(sample.image).copy()
    p_edge, p_tp = find_boundaries(pred, mode="inner"), np.isin(pred, tp_pred)
    rgb[find_boundaries(truth, mode="inner") & ~np.isin(truth, tp_true)] = FN_COLOR
    rgb[p_edge & ~p_tp] = FP_COLOR
    rgb[p_edge & p_tp] = TP_COLOR
    fig, ax = _overlay_figure(rgb, title)
    n_tp = int(m.sum())
    _legend(ax, (n_tp, ov.pred_ids.size - n_tp, ov.true_ids.size - n_tp))
    return _save(fig, path)


def _point_overlay(sample: Any, pred_path: Path, radius: float, title: str, path: Path) -> Path:
    with pred_path.open(newline="") as fh:
        rows = [(float(r["x"]), float(r["y"]), float(r["score"])) for r in csv.DictReader(fh)]
    arr = np.array(rows, float).reshape(-1, 3)
    pred, truth = arr[:, :2], np.asarray(sample.points, float).reshape(-1, 2)
    m = match_points_within_radius(pred, truth, radius=radius, pred_scores=arr[:, 2])
    fn = np.ones(len(truth), bool)
    fn[m.pairs[:, 1]] = False
    fig, ax = _overlay_figure(_display_rgb(sample.image), title)
    for pts, color in (
        (truth[fn], FN_COLOR),
        (pred[~m.pred_is_tp], FP_COLOR),
        (pred[m.pred_is_tp], TP_COLOR),
    ):
        edge = np.array(color) / 255
        ax.scatter(pts[:, 0], pts[:, 1], s=60, facecolors="none", edgecolors=[edge], linewidths=1.5)
    _legend(ax, (m.tp, m.fp, m.fn))
    return _save(fig, path)


def _overlays(metrics: dict, out: Path, dataset: Dataset | None, n: int) -> list[Path]:
    prov = metrics["provenance"]["dataset"]
    if dataset is None:
        try:
            dataset = get_dataset(prov["name"], prov["root"])
        except (DatasetError, KeyError) as exc:
            logger.warning("overlays skipped: cannot reload dataset %s: %s", prov["name"], exc)
            return []
    paths = []
    for row in metrics["rows"][:n]:
        sid = row["id"]
        path = out / "figures" / f"overlay_{sid}.png"
        points = metrics["kind"] == "points"
        pred_path = out / "predictions" / f"{sid}.{'csv' if points else 'tif'}"
        if not pred_path.is_file():
            logger.warning("overlay of %s skipped: %s is missing", sid, pred_path)
            continue
        try:
            sample = dataset.load(sid)
        except DatasetError as exc:  # (an image moved away since the eval)
            logger.warning("overlay of %s skipped: %s", sid, exc)
            continue
        if points:
            title = f"{_short(sid, 28)}  green TP / blue FP / red FN"
            paths.append(_point_overlay(sample, pred_path, row["radius_px"], title, path))
        else:
            title = f"{_short(sid, 28)}  green TP / blue FP / red FN (IoU > 0.5)"
            paths.append(_instance_overlay(sample, pred_path, title, path))
    return paths


# -- documents -----------------------------------------------------------------------
def _runtime_text(runtime: dict | None) -> str:
    """``", run on cpu in bfloat16"`` from a provenance's ``runtime`` (empty if absent).

    >>> _runtime_text({"device": "cpu", "precision": "bfloat16"})
    ', run on cpu in bfloat16'
    >>> _runtime_text({"device": "cpu", "precision": "not applicable"})  # no network
    ', run on cpu'
    >>> _runtime_text({})
    ''
    """
    if not runtime:
        return ""
    text = f", run on {runtime.get('device', '?')}"
    precision = runtime.get("precision", "?")
    return text if precision == "not applicable" else f"{text} in {precision}"


def _model_scale_text(model: dict) -> str:
    """The model's resolution for a report's header: a size-normalised model
    (``unet-bbbc038``) has a nominal one and picks each image's scale from
    its nuclei, so a figure in um on images without a resolution is at the
    nominal one.

    >>> _model_scale_text({"name": "unet-monuseg", "mpp": 0.4})
    '0.4 um/px'
    >>> _model_scale_text({"name": "unet-bbbc038", "mpp": 0.5})
    "nominal 0.5 um/px: it picks each image's scale from the size of its nuclei"
    """
    from nucleus_models.models import get_spec

    try:
        normalised = bool(get_spec(model["name"]).thresholds.get("diameter_px"))
    except Exception:  # a model no longer registered here: say what was recorded
        normalised = False
    if not normalised:
        return f"{model['mpp']} um/px"
    return f"nominal {model['mpp']} um/px: it picks each image's scale from the size of its nuclei"


def _options_text(params: dict) -> str:
    """The model options a run was given, for a report's header (empty if none):
    two runs of one model with other thresholds are otherwise told apart only
    by a command line, which from Python is the script's.

    >>> _options_text({"model_option": {"foreground_threshold": 80.0}})
    'model options: foreground_threshold=80'
    >>> _options_text({"model_options": {}}), _options_text({})
    ('', '')
    """
    # (the CLI records its --model_option as model_option, evaluate() as model_options)
    options = params.get("model_options") or params.get("model_option") or {}
    if not options:
        return ""
    text = ", ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in options.items()
    )
    return f"model options: {text}"


def _resolution_text(rows: list[dict]) -> str:
    """Where the images' resolutions came from, for a report's header.

    >>> _resolution_text([{"mpp": 0.25, "mpp_source": "sample"}] * 2)
    "resolution: 0.25 um/px (the images' own)"
    >>> _resolution_text([{"mpp": 0.25, "mpp_source": "sample"}, {"mpp": 0.4, "mpp_source": "model"}])
    "resolution: 0.25 um/px (the images' own) for 1; 0.4 um/px (none recorded: the model's) for 1"
    """
    if not rows or any(r.get("mpp") is None for r in rows):
        return ""  # a metrics.json of before 0.2.4
    words = {"sample": "the images' own", "model": "none recorded: the model's"}
    seen = Counter((str(r.get("mpp_source", "sample")), float(r["mpp"])) for r in rows)
    parts = [(f"{m:g} um/px ({words.get(src, src)})", n) for (src, m), n in seen.items()]
    if len(parts) == 1:
        return f"resolution: {parts[0][0]}"
    return "resolution: " + "; ".join(f"{text} for {n}" for text, n in parts)


def _analysis_scale_text(rows: list[dict], model: dict) -> str:
    """The resolutions the model ran at, for a report's header, where they are
    not its own: those a size-normalised model (``unet-bbbc038``) picked for
    each image from its nuclei, or an image's own within the tolerance of the
    model's (empty when every image ran at the model's resolution).

    >>> rows = [{"analysis_mpp": 0.2414}, {"analysis_mpp": 0.5}, {"analysis_mpp": 0.2978}]
    >>> _analysis_scale_text(rows, {"mpp": 0.5})
    'model run at 0.2414-0.5 um/px (analysis_mpp of each row of metrics.json)'
    >>> _analysis_scale_text([{"analysis_mpp": 0.4}], {"mpp": 0.4}), _analysis_scale_text([{}], {"mpp": 0.4})
    ('', '')
    """
    picked = [float(r["analysis_mpp"]) for r in rows if r.get("analysis_mpp") is not None]
    if not picked or all(abs(m / float(model["mpp"]) - 1) < 0.01 for m in picked):
        return ""  # (or a metrics.json of before analysis_mpp was recorded)
    lo, hi = min(picked), max(picked)
    scale = f"{lo:g} um/px" if lo == hi else f"{lo:g}-{hi:g} um/px"
    return f"model run at {scale} (analysis_mpp of each row of metrics.json)"


def other_modalities(rows: list[dict], model_modality: str) -> Counter[str]:
    """How many of an evaluation's ``rows`` are of each kind of image other
    than the model's (their ``groups.modality``; unknown ones not counted).

    >>> other_modalities([{"groups": {"modality": "fluorescence"}}, {"groups": {}}], "brightfield")
    Counter({'fluorescence': 1})
    """
    return Counter(
        r["groups"]["modality"]
        for r in rows
        if r.get("groups", {}).get("modality") not in (None, "", model_modality)
    )


def _modality_text(rows: list[dict], model_modality: str | None) -> str:
    """The images of another kind than the model's, for a report's header.

    >>> rows = [{"groups": {"modality": "fluorescence"}}, {"groups": {"modality": "brightfield"}}]
    >>> _modality_text(rows, "brightfield")
    'images of another kind than the model (brightfield): 1 fluorescence of 2'
    >>> _modality_text(rows[1:], "brightfield"), _modality_text(rows, None)
    ('', '')
    """
    if not model_modality:
        return ""  # a metrics.json of before 0.2.7
    other = other_modalities(rows, model_modality)
    if not other:
        return ""
    kinds = ", ".join(f"{n} {m}" for m, n in sorted(other.items()))
    return f"images of another kind than the model ({model_modality}): {kinds} of {len(rows)}"


def _dataset_text(ds: dict) -> str:
    """The dataset line of a report's header: which samples of which split
    were scored (``--limit`` keeps the first ones), and its hashes.

    >>> ds = {"name": "monuseg", "root": "/d", "n_samples": 3, "fingerprint": "ab" * 32}
    >>> _dataset_text({**ds, "n_selected": 3, "n_available": 30})
    'dataset: monuseg at /d (the first 3 of its 30 samples; fingerprint abababababababab)'
    >>> _dataset_text({**ds, "n_selected": 3, "n_available": 3, "split": "test", "content_sha256": "cd" * 32})
    'dataset: monuseg at /d (3 samples of split test; fingerprint abababababababab, content sha256 cdcdcdcdcdcdcdcd)'
    >>> _dataset_text({**ds, "n_samples": 1})  # a metrics.json of before 0.2.11
    'dataset: monuseg at /d (1 sample; fingerprint abababababababab)'
    """
    n, selected, available = int(ds["n_samples"]), ds.get("n_selected"), ds.get("n_available")
    split = f" of split {ds['split']}" if ds.get("split") else ""
    if selected is not None and available is not None and int(available) > int(selected):
        count = f"the first {selected} of its {available} samples{split}"
        count += f", {n} scored" if n != int(selected) else ""
    else:
        count = f"{n} sample{'s' if n != 1 else ''}{split}"
    hashes = f"fingerprint {ds['fingerprint'][:16]}"
    if ds.get("content_sha256"):
        hashes += f", content sha256 {ds['content_sha256'][:16]}"
    return f"dataset: {ds['name']} at {ds['root']} ({count}; {hashes})"


def _training_text(rows: list[dict]) -> str:
    """The images the model was trained on, for a report's header: its scores
    there are in-sample (empty when there are none, or its card lists none).

    >>> _training_text([{"training_image": True}, {"training_image": False}])
    'images the model was trained on: 1 of 2 (their scores are in-sample, not held out)'
    >>> _training_text([{"training_image": False}]), _training_text([{}])
    ('', '')
    """
    n = sum(1 for r in rows if r.get("training_image"))
    if not n:
        return ""
    return (
        f"images the model was trained on: {n} of {len(rows)} "
        "(their scores are in-sample, not held out)"
    )


def _blocks(metrics: dict, figs: list[tuple[str, str]]) -> list[Block]:
    prov, kind = metrics["provenance"], metrics["kind"]
    keys = list(_TABLE_METRICS[kind])
    mean, pooled = metrics["mean"], metrics["pooled"]
    ds, mod = prov["dataset"], prov["model"]
    blocks: list[Block] = [
        ("h1", f"nucleus-bench: {mod['name']} on {ds['name']}"),
        (
            "ul",
            [
                f"model: {mod['name']} (sha256 {mod['sha256']}, {_model_scale_text(mod)})"
                + _runtime_text(prov.get("runtime")),
                _dataset_text(ds),
                *filter(
                    None,
                    [
                        _options_text(prov.get("params", {})),
                        _resolution_text(metrics["rows"]),
                        _analysis_scale_text(metrics["rows"], mod),
                        _modality_text(metrics["rows"], prov["model"].get("modality")),
                        _training_text(metrics["rows"]),
                    ],
                ),
                f"nucleus-models {prov['package_version']}, created {prov['created']}",
                f"command: `{prov['command']}`",
            ],
        ),
        ("h2", "Mean metrics"),
    ]
    if kind == "instances":
        match = "hit-in-mask for det_f1/precision/recall"
    else:  # the radius is what the point scores mean: a report without it says nothing
        radius = metrics.get("density", {}).get("match_radius_um")
        within = f" within {radius:g} um" if radius is not None else ""
        match = f"predictions matched one to one to true points{within}"
    blocks.append(("p", f"Mean over samples and pooled over all nuclei ({match})."))
    if skipped := metrics.get("skipped"):
        # (in no mean, pooled count or table below: a reader comparing two runs must know)
        reasons = Counter(str(s.get("reason", "?")) for s in skipped)
        ids = ", ".join(str(s.get("id")) for s in skipped[:20])
        more = f" and {len(skipped) - 20} more" if len(skipped) > 20 else ""
        why = "; ".join(f"{n} {reason}" for reason, n in reasons.items())
        blocks.append(("p", f"Not scored: {len(skipped)} of the samples ({why}): {ids}{more}."))
    mkeys = [*metrics["metric_keys"], "ap", "n_true", "n_pred", "seconds"]
    blocks.append(
        (
            "table",
            ["metric", "mean", "pooled"],
            [[k, _fmt(mean.get(k)), _fmt(pooled.get(k))] for k in mkeys],
        )
    )
    blocks.append(("p", _METRIC_DEFINITIONS[kind]))
    errors = pooled.get("errors")
    if errors:
        from .evaluate import error_sentences

        blocks.append(("h2", "Where the errors are"))
        blocks.append(
            (
                "p",
                "Object categories after Kromp et al. 2020 (a true nucleus is matched at IoU > 0.5, "
                "split into >= 2 predicted fragments, merged into a prediction covering >= 2 "
                "nuclei, or none of these); pixel errors near the true outlines are outline "
                "placement, those away from them whole nuclei missed or invented.",
            )
        )
        blocks.append(("ul", error_sentences(errors)))
    if metrics["groups"]:
        # (under a heading of their own: they are not part of the error profile above)
        blocks.append(("h2", "By group"))
        blocks.append(
            ("p", "Means over the images of each group (n: images), as the mean column above.")
        )
    for gkey, block in metrics["groups"].items():
        blocks.append(("h3", f"By {gkey}"))
        body = [[g, _fmt(v["n"]), *[_fmt(v.get(k)) for k in keys]] for g, v in block.items()]
        blocks.append(("table", [gkey, "n", *keys], body))
    if "density" in metrics:
        d = metrics["density"]
        blocks.append(("h2", "Detection by local density"))
        blocks.append(
            (
                "p",
                f"Density: other true nuclei within {d['density_radius_um']} um (an unmatched "
                "prediction: true nuclei within that distance of it); counts summed over all "
                "images.",
            )
        )
        hdr = ["neighbours", "n_true", "recall", "n_pred", "precision"]
        cols = ("n_true", "recall", "n_pred", "precision")
        body = [[_bin_name(b), *[_fmt(b[k]) for k in cols]] for b in d["bins"]]
        blocks.append(("table", hdr, body))
    blocks.append(("h2", "Per sample"))
    body = [
        [r["id"], r["n_true"], r["n_pred"], *[_fmt(r.get(k)) for k in keys], _fmt(r["seconds"])]
        for r in metrics["rows"]
    ]
    blocks.append(("table", ["id", "n_true", "n_pred", *keys, "seconds"], body))
    blocks.append(("h2", "Figures"))
    for alt, rel in figs:
        blocks.append(("img", rel, alt))
    return blocks


def _markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            lines += ["#" * int(kind[1]) + " " + b[1], ""]
        elif kind == "p":
            lines += [b[1], ""]
        elif kind == "ul":
            lines += [f"- {item}" for item in b[1]] + [""]
        elif kind == "table":
            lines.append("| " + " | ".join(map(str, b[1])) + " |")
            lines.append("|" + "---|" * len(b[1]))
            lines += ["| " + " | ".join(map(str, row)) + " |" for row in b[2]]
            lines.append("")
        elif kind == "img":  # (a sample id may hold spaces or brackets)
            lines += [f"![{b[2]}]({quote(b[1])})", ""]
    return "\n".join(lines)


def _embed(path: Path, max_png_bytes: int = 400_000) -> tuple[str, str]:
    """MIME type and base64 of a figure; large (photographic) PNGs are embedded as JPEG."""
    raw, mime = path.read_bytes(), "image/png"
    if len(raw) > max_png_bytes:
        from PIL import Image

        buf = io.BytesIO()
        with Image.open(path) as im:
            im.convert("RGB").save(buf, format="JPEG", quality=88)
        raw, mime = buf.getvalue(), "image/jpeg"
    return mime, base64.b64encode(raw).decode("ascii")


def _inline_html(text: str) -> str:
    """A block's text as HTML: escaped, its Markdown `code` spans as <code>.

    >>> _inline_html("command: `nucleus-bench eval --root a<b`")
    'command: <code>nucleus-bench eval --root a&lt;b</code>'
    """
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _html(blocks: list[Block], out: Path) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>nucleus-bench report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px}"
        "img{max-width:100%;display:block;margin:8px 0}</style></head><body>",
    ]
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3", "p"):
            parts.append(f"<{kind}>{_inline_html(b[1])}</{kind}>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in b[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{esc(str(c))}</th>" for c in b[1])
            body = "".join(
                "<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in r) + "</tr>" for r in b[2]
            )
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        elif kind == "img":
            mime, data = _embed(out / b[1])
            parts.append(
                f"<p>{esc(b[2])}</p><img alt='{esc(b[2])}' src='data:{mime};base64,{data}'>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(
    out_dir: str | Path, *, dataset: Dataset | None = None, n_overlays: int = 3
) -> Path:
    """Write ``report.md``, ``report.html`` and ``figures/*.png`` for an evaluation folder.

    Parameters
    ----------
    out_dir : str or Path
        Folder written by :func:`benchmark.evaluate.evaluate` (holds ``metrics.json``).
    dataset : Dataset, optional
        Loader for the overlays; default: rebuilt from the provenance's name and root.
        When it cannot be rebuilt the overlays are left out (with a warning).
    n_overlays : int, default 3
        Number of samples (the first rows) drawn as TP/FP/FN overlays.

    Returns
    -------
    Path
        The path of ``report.md``.

    Raises
    ------
    DatasetError
        If ``metrics.json`` is missing or unreadable.
    """
    from nucleus_models.errors import ParameterError

    if n_overlays < 0:
        raise ParameterError(f"the number of overlays must be 0 or more, got {n_overlays}")
    out = Path(out_dir)
    try:
        metrics = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{out / 'metrics.json'}: cannot read metrics ({exc})") from None
    keys = ("rows", "main_metric", "mean", "pooled", "pr_curve", "kind", "provenance")
    missing = [k for k in keys if k not in metrics] if isinstance(metrics, dict) else list(keys)
    if missing:
        raise DatasetError(
            f"{out / 'metrics.json'}: not written by nucleus-bench eval (no {', '.join(missing)})"
        )
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    for old in fig_dir.glob("overlay_*.png"):  # an earlier report's samples
        old.unlink()
    rows, main = metrics["rows"], metrics["main_metric"]
    figs: list[tuple[str, Path]] = []
    p = _bar_plot(rows, main, metrics["mean"].get(main), fig_dir / f"per_sample_{main}.png")
    figs.append((f"{main} per sample", p))
    p, r = _count_scatter(rows, fig_dir / "counts_scatter.png")
    figs.append((f"predicted vs true counts (Pearson r = {_fmt(r)})", p))
    p = _pr_plot(metrics["pr_curve"], metrics["pooled"], fig_dir / "pr_curve.png")
    figs.append(("precision-recall curve (pooled detections sorted by score)", p))
    for p in _overlays(metrics, out, dataset, n_overlays):
        figs.append((f"TP/FP/FN overlay: {p.stem.removeprefix('overlay_')}", p))
    blocks = _blocks(metrics, [(alt, p.relative_to(out).as_posix()) for alt, p in figs])
    md = out / "report.md"
    md.write_text(_markdown(blocks))
    (out / "report.html").write_text(_html(blocks, out))
    logger.info("wrote %s", md)
    return md
