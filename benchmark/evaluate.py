"""Run a registered nucleus model on a benchmark dataset and score it.

:func:`evaluate` segments every sample with
:func:`nucleus_models.detection.segment_image` (the tiling and seam code the
CLIs use), scores the result against the sample's annotation and writes
``metrics.json``, ``predictions/`` and (optionally) the report of
:mod:`benchmark.report` into an output folder.

Coordinate convention: the library's nuclei centroids put pixel centres at
``i + 0.5``; the metrics (and dataset points) put them at integer
coordinates, so predicted centroids are shifted by ``-0.5`` before scoring
and before being written to ``predictions/<id>.csv``.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .datasets import Dataset, DatasetError, Sample, fingerprint
from .metrics import (
    average_precision,
    detection_by_density,
    f1_at_iou,
    hit_in_mask,
    instance_metrics,
    kromp_object_categories,
    match_points_within_radius,
    pixel_error_breakdown,
    precision_recall_curve,
    summarize_by_group,
)

__all__ = [
    "DEFAULT_RADIUS_UM",
    "DENSITY_EDGES",
    "DENSITY_RADIUS_UM",
    "ERROR_BAND_UM",
    "INSTANCE_METRICS",
    "POINT_METRICS",
    "check_model_options",
    "error_counts",
    "error_profile",
    "error_sentences",
    "evaluate",
    "jsonable",
    "provenance",
    "sample_digest",
    "training_image_ids",
]

logger = logging.getLogger(__name__)

#: Default point-matching radius in microns.
DEFAULT_RADIUS_UM = 6.0
#: Neighbourhood radius (microns) defining a true nucleus's local density.
DENSITY_RADIUS_UM = 15.0
#: Density bin edges (number of other true nuclei within ``DENSITY_RADIUS_UM``).
DENSITY_EDGES = (0.0, 3.0, 6.0, 10.0, math.inf)
#: Metrics averaged over samples for instance (label map) datasets.
INSTANCE_METRICS = tuple(
    "det_f1 precision recall f1_iou50 precision_iou50 recall_iou50 aji dice pq dq sq map_dsb".split()
)
#: Metrics averaged over samples for point datasets.
POINT_METRICS = ("f1", "precision", "recall")
#: Width (microns, each side of the true outlines) of the band in which pixel
#: errors count as outline placement rather than missed or invented nuclei.
ERROR_BAND_UM = 0.75
#: Object error categories (Kromp et al. 2020) summed into the pooled error profile.
_OBJECT_COUNTS = ("n_true", "split", "merged", "fn", "n_pred", "merge_objects", "split_fragments")
_PIXEL_COUNTS = ("true_px", "pred_px", "fp_px", "fn_px", "fp_band_px", "fn_band_px")
_MAX_CURVE_POINTS = 400


def jsonable(obj: Any) -> Any:
    """Convert NumPy scalars/arrays and non-finite floats to plain JSON values (NaN -> None)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def provenance(spec: Any, params: Mapping[str, Any], command: str | None = None) -> dict[str, Any]:
    """What made a result: package version, model (name, sha256, mpp), parameters,
    creation time, command line (default ``" ".join(sys.argv)``) and the
    versions of the libraries imported by then (torch's int8 kernels, for one)."""
    from nucleus_models import __version__
    from nucleus_models.detection import library_versions

    return {
        "package_version": __version__,
        "libraries": library_versions(),
        "model": {
            "name": spec.name,
            "sha256": spec.sha256,
            "mpp": spec.mpp,
            "modality": spec.modality,
        },
        "params": dict(params),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else " ".join(sys.argv),
    }


def _model_option_kinds(spec: Any) -> dict[str, Any] | None:
    """The builder options the model of ``spec`` reads: name -> type, or the
    tuple of the values it takes; ``None`` for a model of another kind than
    the classical ones and the U-Nets, whose options cannot be checked."""
    from dataclasses import fields

    from nucleus_models.models import classical, unet
    from nucleus_models.models.weights import WEIGHTS_DIR

    if spec.name in (classical.CLASSICAL_HE.name, classical.HISTOMICSTK_KOFAHI.name):
        return {f.name: type(f.default) for f in fields(classical.ClassicalParams)}
    card = WEIGHTS_DIR / f"{spec.name}.json"
    if not card.is_file() or json.loads(card.read_text()).get("arch", "unet") != "unet":
        return None
    return unet.option_kinds()


def check_model_options(spec: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` as the types the model of ``spec`` reads them (numbers given
    as text are converted).

    Raises
    ------
    nucleus_models.errors.ParameterError
        For an option the model does not read, or a value of the wrong type.
    """
    from nucleus_models.errors import ParameterError

    kinds = _model_option_kinds(spec)
    if kinds is None:
        return dict(options)
    unknown = sorted(set(options) - set(kinds))
    if unknown:
        raise ParameterError(
            f"model {spec.name} has no option {unknown[0]!r}; its options: {', '.join(sorted(kinds))}"
        )
    checked = {key: _option_value(key, value, kinds[key]) for key, value in options.items()}
    if "min_radius" in spec.thresholds:  # a classical model's radii, before any sample is read
        from nucleus_models.models.classical import check_thresholds

        check_thresholds(spec, checked)
    return checked


#: the values a model option can take (probabilities, 8-bit intensities, sizes)
_OPTION_RANGES: dict[str, tuple[float, float]] = {
    "fg_threshold": (0.0, 1.0),
    "seed_threshold": (0.0, 1.0),
    "min_score": (0.0, 1.0),
    "h": (0.0, math.inf),
    "smooth": (0.0, math.inf),
    "min_area": (0.0, math.inf),
    "tta": (0.0, 1.0),
    "foreground_threshold": (0.0, 255.0),
    "min_radius": (0.0, math.inf),
    "max_radius": (0.0, math.inf),
    "local_max_search_radius": (0.0, math.inf),
    "min_nucleus_area": (0.0, math.inf),
}


def _option_value(key: str, value: Any, kind: Any) -> Any:
    from nucleus_models.errors import ParameterError

    if isinstance(kind, tuple):
        if str(value) in kind:
            return str(value)
        want = "one of " + ", ".join(kind)
    elif kind is str:
        return str(value)
    else:
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        lo, hi = _OPTION_RANGES.get(key, (-math.inf, math.inf))
        if math.isfinite(number) and not lo <= number <= hi:
            # (fg_threshold=7 ran and found nothing, as if the model had failed)
            raise ParameterError(f"model option {key}={value}: expected {lo:g}-{hi:g}")
        if kind is int and number.is_integer():
            return int(number)
        if kind is not int and math.isfinite(number):
            return number
        want = "an integer" if kind is int else "a number"
    raise ParameterError(f"model option {key}={value}: expected {want}")


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[str]:
    """A fresh folder in ``out`` (made if need be) to write this run's outputs
    in; a run that fails takes away the folders it made for ``out``."""
    from nucleus_models.errors import ParameterError

    if out.exists() and not out.is_dir():
        raise ParameterError(f"--out {out} is a file, not a folder")
    made = [p for p in (out, *out.parents) if not p.exists()]  # innermost first
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = tempfile.TemporaryDirectory(prefix=".eval-", dir=out)
    except OSError as exc:
        raise ParameterError(f"cannot write to --out {out}: {exc.strerror}") from None
    try:
        with staging as path:
            yield path
    except BaseException:
        for folder in made:
            with contextlib.suppress(OSError):  # (not empty: another writer's)
                folder.rmdir()
        raise


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Precision, recall and F1 from counts (same empty-set rule as the metrics)."""
    precision = tp / (tp + fp) if tp + fp else float(fn == 0)
    recall = tp / (tp + fn) if tp + fn else float(fp == 0)
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    return {"precision": precision, "recall": recall, "f1": f1}


def _curve(scores: list[np.ndarray], is_tp: list[np.ndarray], n_true: int, how: str) -> dict:
    """Pooled precision-recall curve (thinned to a few hundred points) and its AP."""
    s = np.concatenate(scores) if scores else np.zeros(0)
    t = np.concatenate(is_tp) if is_tp else np.zeros(0, bool)
    precision, recall, thresholds = precision_recall_curve(s, t, n_true)
    if precision.size > _MAX_CURVE_POINTS:
        keep = np.unique(np.linspace(0, precision.size - 1, _MAX_CURVE_POINTS).round().astype(int))
        precision, recall, thresholds = precision[keep], recall[keep], thresholds[keep]
    return {
        "match": how,
        "n_true": n_true,
        "n_pred": int(s.size),
        "ap": average_precision(s, t, n_true),
        "precision": precision.round(5),
        "recall": recall.round(5),
        "thresholds": thresholds.round(5),
    }


def error_counts(truth: np.ndarray, labels: np.ndarray, mpp: float) -> dict[str, int]:
    """One image's error counts (``row["errors"]``): Kromp et al.'s object
    categories and the pixel errors within :data:`ERROR_BAND_UM` (at ``mpp``
    microns per pixel) of the true outlines or away from them."""
    cats = kromp_object_categories(truth, labels)
    errors = {k: int(cats[k]) for k in _OBJECT_COUNTS}
    errors["fp_objects"] = int(cats["fp"])
    errors.update(pixel_error_breakdown(truth, labels, band_px=ERROR_BAND_UM / mpp))
    return errors


def error_profile(errors: Sequence[Mapping[str, int]]) -> dict[str, Any]:
    """Pool per-sample error counts (``row["errors"]``) into rates.

    Object rates are over all true nuclei (``split_rate``, ``merge_rate``,
    ``fn_rate``: neither matched, split nor merged) or all predicted ones
    (``fp_rate``: neither matched, a merge nor a fragment); pixel rates
    are over the true foreground (``fp_px_rate``, ``fn_px_rate``), and
    ``*_band_share`` is the part of those pixel errors that lies near the true
    outlines (placement) rather than away from them.

    >>> e = {"n_true": 10, "split": 1, "merged": 2, "fn": 1, "n_pred": 9, "merge_objects": 1,
    ...      "split_fragments": 2, "fp_objects": 3, "true_px": 1000, "pred_px": 990,
    ...      "fp_px": 100, "fn_px": 110, "fp_band_px": 60, "fn_band_px": 99}
    >>> p = error_profile([e, e])
    >>> p["merge_rate"], p["fp_rate"], p["fn_px_rate"], p["fn_band_share"]
    (0.2, 0.3333333333333333, 0.11, 0.9)
    """

    def total(k: str) -> int:
        return int(sum(int(e[k]) for e in errors))

    counts = {k: total(k) for k in (*_OBJECT_COUNTS, "fp_objects", *_PIXEL_COUNTS)}

    def rate(num: int, den: int) -> float:
        return num / den if den else 0.0

    n_t, n_p, t_px = counts["n_true"], counts["n_pred"], counts["true_px"]
    return {
        **counts,
        "split_rate": rate(counts["split"], n_t),
        "merge_rate": rate(counts["merged"], n_t),
        "fn_rate": rate(counts["fn"], n_t),
        "fp_rate": rate(counts["fp_objects"], n_p),
        "fp_px_rate": rate(counts["fp_px"], t_px),
        "fn_px_rate": rate(counts["fn_px"], t_px),
        "fp_band_share": rate(counts["fp_band_px"], counts["fp_px"]),
        "fn_band_share": rate(counts["fn_band_px"], counts["fn_px"]),
        "band_um": ERROR_BAND_UM,
    }


def error_sentences(profile: Mapping[str, Any]) -> list[str]:
    """The pooled error profile in words, for the report and the terminal.

    >>> e = {"n_true": 10, "split": 1, "merged": 2, "fn": 1, "n_pred": 9, "merge_objects": 1,
    ...      "split_fragments": 2, "fp_objects": 3, "true_px": 1000, "pred_px": 990,
    ...      "fp_px": 100, "fn_px": 110, "fp_band_px": 60, "fn_band_px": 99}
    >>> for line in error_sentences(error_profile([e])):
    ...     print(line)
    nuclei: 10.0 % split, 20.0 % merged with a neighbour, 10.0 % neither matched, split nor merged (of 10 true); 33.3 % of the 9 predicted are neither a match, a merge nor a fragment
    pixels (as a share of the true foreground): 10.0 % predicted but not true (60 % of them within 0.75 um of a true outline), 11.0 % true but not predicted (90 % near an outline)
    """
    p = profile
    return [
        f"nuclei: {100 * p['split_rate']:.1f} % split, {100 * p['merge_rate']:.1f} % merged "
        f"with a neighbour, {100 * p['fn_rate']:.1f} % neither matched, split nor merged "
        f"(of {p['n_true']} true); {100 * p['fp_rate']:.1f} % of the {p['n_pred']} predicted "
        "are neither a match, a merge nor a fragment",
        f"pixels (as a share of the true foreground): {100 * p['fp_px_rate']:.1f} % predicted "
        f"but not true ({100 * p['fp_band_share']:.0f} % of them within {p['band_um']:g} um of "
        f"a true outline), {100 * p['fn_px_rate']:.1f} % true but not predicted "
        f"({100 * p['fn_band_share']:.0f} % near an outline)",
    ]


def _array_digest(h: Any, a: np.ndarray) -> None:
    a = np.ascontiguousarray(a)
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(memoryview(a).cast("B"))


def sample_digest(sample_id: str, image: np.ndarray, truth: np.ndarray) -> str:
    """sha256 of one scored sample as it was scored: its id, its image's pixels
    and its annotation (label map or points), each with dtype and shape.

    The dataset's ``fingerprint`` hashes file names and sizes only, so an
    annotation corrected in place (a vertex moved in an XML, a label painted
    over in a TIFF) keeps it; this hash of what was read does not.

    >>> a = np.zeros((2, 2), np.int32)
    >>> b = a.copy(); b[0, 0] = 1
    >>> img = np.zeros((2, 2, 3), np.uint8)
    >>> sample_digest("x", img, a) == sample_digest("x", img, b)
    False
    """
    h = hashlib.sha256(sample_id.encode() + b"\0")
    _array_digest(h, np.asarray(image))
    _array_digest(h, np.asarray(truth))
    return h.hexdigest()


def _sample_mpp(sample: Sample, mpp: float | None, model_mpp: float) -> tuple[float, str]:
    if sample.mpp:
        return float(sample.mpp), "sample"
    if mpp:
        return float(mpp), "--mpp"
    return float(model_mpp), "model"


def _warn_unknown_resolution(
    rows: list[dict[str, Any]], name: str, spec: Any, mpp: float | None = None
) -> None:
    """Warn when images without a resolution were read at the model's own, or
    when ``mpp`` (``--mpp``) was given and every image had its own.

    Their nuclei are then sized wrongly by the factor between the two, and
    nothing else says so; a model that sizes nuclei itself
    (``thresholds.diameter_px``, e.g. ``unet-bbbc038``) only needs it for the
    numbers in microns (point radius, error band).
    """
    n = sum(1 for r in rows if r["mpp_source"] == "model")
    if mpp is not None and all(r["mpp_source"] == "sample" for r in rows):
        logger.warning("%s: --mpp %g not used: the images carry their own resolution", name, mpp)
    if not n:
        return
    if spec.thresholds.get("diameter_px"):
        logger.info(
            "%s: %d of the %d images carry no resolution; %s sizes nuclei itself, the numbers in "
            "microns take %g um/px (--mpp sets it)",
            name,
            n,
            len(rows),
            spec.name,
            spec.mpp,
        )
        return
    logger.warning(
        "%s: %d of the %d images carry no resolution and were read at %g um/px, %s's own; "
        "if they are at another, pass --mpp (e.g. 0.25 for 40x, 0.5 for 20x)",
        name,
        n,
        len(rows),
        spec.mpp,
        spec.name,
    )


def training_image_ids(spec: Any) -> set[str] | None:
    """The ids of the images the model of ``spec`` was trained on, as its
    card (``<name>.json`` beside the weights) lists them; ``None`` for a model
    without a card or whose card lists none (the classical ones)."""
    from nucleus_models.models.weights import WEIGHTS_DIR

    card_path = WEIGHTS_DIR / f"{spec.name}.json"
    if not spec.sha256 or not card_path.is_file():
        return None
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError):
        return None
    if card.get("spec", {}).get("sha256") != spec.sha256:
        return None  # (a card of other weights than those registered)
    images = card.get("training", {}).get("images")
    return {str(i) for i in images} if images else None


def _warn_training_images(rows: list[dict[str, Any]], name: str, spec: Any) -> None:
    """Warn when some images were among those the model was trained on: its
    scores there are in-sample, higher than on images it has not seen, and
    nothing else in the numbers says so."""
    n = sum(1 for r in rows if r.get("training_image"))
    if n:
        logger.warning(
            "%s: %d of the %d images were among %s's training images (its card lists them): "
            "their scores are in-sample, not held out (the report's training_image table "
            "shows them apart; `nucleus-bench models` gives its held-out cross-validation)",
            name,
            n,
            len(rows),
            spec.name,
        )


def _warn_other_modality(rows: list[dict[str, Any]], name: str, spec: Any) -> None:
    """Warn when some images are of another kind than the model's (fluorescence
    for an H&E model, say): its scores there say little, and nothing else
    would say why they are low (the CLI warns the same way on a slide)."""
    from nucleus_models.models import get_spec, list_models

    from .report import other_modalities

    other = other_modalities(rows, spec.modality)
    if not other:
        return

    kinds = " and ".join(f"{n} {m}" for m, n in sorted(other.items()))
    fitting = [m for m in list_models() if get_spec(m).modality in other]
    logger.warning(
        "%s: %s of the %d images, and %s is a model for %s images: its nuclei there are "
        "likely wrong (the report's modality table shows them apart)%s",
        name,
        kinds,
        len(rows),
        spec.name,
        spec.modality,
        f"; for them: {', '.join(fitting)}" if fitting else "",
    )


def _score_instances(
    sample: Sample, labels: np.ndarray, xy: np.ndarray, scores: np.ndarray, mpp: float
):
    """Row metrics, hit-in-mask flags and n_true for one label-map sample.

    The row also holds the sample's error profile under ``errors``: Kromp et
    al.'s object categories (split, merged, missed, invented nuclei) and the
    pixel errors within :data:`ERROR_BAND_UM` of the true outlines or away
    from them, as counts so they can be pooled.
    """
    truth = np.asarray(sample.labels)
    row: dict[str, Any] = dict(instance_metrics(truth, labels))
    row["errors"] = error_counts(truth, labels, mpp)
    hit = hit_in_mask(xy, truth, scores=scores)
    iou = f1_at_iou(truth, labels, iou_threshold=0.5)
    row.update(precision=hit["precision"], recall=hit["recall"])
    row.update(tp=hit["tp"], fp=hit["fp"], fn=hit["fn"])
    row.update(tp_iou50=iou["tp"], fp_iou50=iou["fp"], fn_iou50=iou["fn"])
    return row, np.asarray(hit["pred_is_tp"], bool), int(hit["tp"]) + int(hit["fn"])


def _score_points(
    sample: Sample, xy: np.ndarray, scores: np.ndarray, radius_px: float, density_px: float
):
    """Row metrics, match flags, n_true and density bins for one point sample."""
    truth = np.asarray(sample.points, dtype=np.float64).reshape(-1, 2)
    m = match_points_within_radius(xy, truth, radius=radius_px, pred_scores=scores)
    row: dict[str, Any] = dict(m.as_dict())
    row["radius_px"] = radius_px
    row["mean_distance_px"] = float(m.distances.mean()) if m.distances.size else float("nan")
    bins = detection_by_density(
        xy,
        truth,
        match_radius=radius_px,
        density_radius=density_px,
        edges=DENSITY_EDGES,
        pred_scores=scores,
    )
    return row, m.pred_is_tp, len(truth), bins


def _write_points_csv(path: Path, xy: np.ndarray, scores: np.ndarray) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["x", "y", "score"])
        for (x, y), s in zip(xy, scores, strict=True):
            w.writerow([f"{x:.2f}", f"{y:.2f}", f"{s:.4f}"])


def _group_blocks(rows: Sequence[Mapping[str, Any]], metric_keys: Sequence[str]) -> dict:
    """``{group key: {group value: {n, metric means}}}`` over the keys present in rows."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r["groups"] if k not in keys]
    blocks: dict[str, Any] = {}
    for key in keys:
        flat = [{"_g": r["groups"][key], **r} for r in rows if key in r["groups"]]
        blocks[key] = summarize_by_group(flat, "_g", [*metric_keys, "n_true", "n_pred"])
    return blocks


def _pool_density(per_sample: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    """Sum per-bin counts over samples and recompute recall and precision."""
    pooled: list[dict[str, float]] = []
    for i, first in enumerate(per_sample[0] if per_sample else []):
        acc = {
            k: sum(b[i][k] for b in per_sample) for k in ("n_true", "tp_true", "n_pred", "tp_pred")
        }
        pooled.append(
            {
                "lo": first["lo"],
                "hi": first["hi"],
                **acc,
                "recall": acc["tp_true"] / acc["n_true"] if acc["n_true"] else float("nan"),
                "precision": acc["tp_pred"] / acc["n_pred"] if acc["n_pred"] else float("nan"),
            }
        )
    return pooled


def evaluate(
    dataset: Dataset,
    *,
    model: str,
    out_dir: str | Path,
    split: str | None = None,
    limit: int | None = None,
    model_options: dict[str, Any] | None = None,
    radius_um: float | None = None,
    mpp: float | None = None,
    progress: bool = True,
    report: bool = True,
    params: Mapping[str, Any] | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Segment every sample of ``dataset`` with ``model``, score it and write the results.

    Parameters
    ----------
    dataset : Dataset
        A constructed loader; ``dataset.kind`` chooses instance or point scoring.
    model : str
        Registered model name (see :func:`nucleus_models.models.list_models`).
    out_dir : str or Path
        Output folder; receives ``metrics.json``, ``predictions/`` and the report.
        An earlier run's ``metrics.json`` and ``predictions/`` there are replaced
        together once the run has finished, and left as they were if it fails.
    split : str, optional
        Evaluate only this split of the dataset.
    limit : int, optional
        Evaluate only the first ``limit`` samples (in id order).
    model_options : dict, optional
        Builder options passed to the model (thresholds, device).
    radius_um : float, optional
        Point-matching radius in microns (default :data:`DEFAULT_RADIUS_UM`).
    mpp : float, optional
        Microns per pixel for samples without one (default: the model's mpp).
    progress : bool, default True
        Show a progress bar over samples (only on a terminal).
    report : bool, default True
        Also write ``report.md`` / ``report.html`` and ``figures/``.
    params : mapping, optional
        Parameters recorded in the provenance (the CLI passes its arguments).
    command : str, optional
        Command line recorded in the provenance (default ``" ".join(sys.argv)``).

    Returns
    -------
    dict
        The content of ``metrics.json``.

    Raises
    ------
    DatasetError
        If the dataset has no samples to score or a sample lacks its image.
    nucleus_models.errors.NucleusModelsError
        If the model is unknown or its weights fail their checksum, or a
        parameter, a model option or ``out_dir`` cannot work (before anything is
        written).
    """
    from nucleus_models.detection import mpp_problem
    from nucleus_models.errors import ParameterError
    from nucleus_models.models import get_spec

    spec = get_spec(model)  # unknown model fails before any work
    if radius_um is not None and dataset.kind != "points":
        logger.warning(
            "radius_um %g is not used: %s has outlined nuclei, scored by their masks "
            "(det_f1: a prediction's centroid inside a true nucleus), not points within a radius",
            radius_um,
            dataset.name,
        )
    radius_um = DEFAULT_RADIUS_UM if radius_um is None else float(radius_um)
    if not (math.isfinite(radius_um) and radius_um > 0):
        # (nan matched nothing and inf everything, each scored as if real)
        raise DatasetError(f"radius_um must be a positive number of microns, got {radius_um}")
    if limit is not None and limit < 1:
        raise ParameterError(f"limit must be at least 1, got {limit}")
    if mpp is not None and (why := mpp_problem(mpp)):
        raise ParameterError(f"mpp {mpp:g} um/px is not a microscope's resolution: {why}")
    model_options = check_model_options(spec, model_options or {}) or None
    available = dataset.ids(split)
    ids = available[:limit]
    if not ids:
        raise DatasetError(f"{dataset.name}: {dataset.root}: no samples to evaluate")
    out = Path(out_dir)
    run_params: dict[str, Any] = dict(params or {})
    if params is None:
        run_params = {"dataset": dataset.name, "root": str(dataset.root), "model": model}
        run_params |= {"out": str(out), "split": split, "limit": limit, "radius_um": radius_um}
        run_params |= {"mpp": mpp, "model_options": model_options or {}}
    with _staging(out) as staging:
        result = _run(
            staging,
            dataset,
            ids,
            spec=spec,
            split=split,
            model_options=model_options,
            radius_um=radius_um,
            mpp=mpp,
            progress=progress,
        )
        # (how many --limit left out: a report of the first 3 images read as one of all 30)
        result["provenance"]["dataset"] |= {"n_selected": len(ids), "n_available": len(available)}
        result["provenance"] = {**provenance(spec, run_params, command), **result["provenance"]}
        result = jsonable(result)
        (Path(staging) / "metrics.json").write_text(json.dumps(result, indent=1) + "\n")
        # the run's predictions and metrics replace an earlier run's together,
        # and the earlier run's report goes with them (written again below,
        # unless --no_report: then no report describes another run)
        for name in ("predictions", "report.md", "report.html", "figures"):
            if (out / name).exists():
                (out / name).rename(Path(staging) / f"old-{name}")
        (Path(staging) / "predictions").rename(out / "predictions")
        os.replace(Path(staging) / "metrics.json", out / "metrics.json")
    logger.info("wrote %s", out / "metrics.json")
    if report:
        from .report import write_report

        write_report(out, dataset=dataset)
    return result


def _run(
    staging: str,
    dataset: Dataset,
    ids: list[str],
    *,
    spec: Any,
    split: str | None,
    model_options: dict[str, Any] | None,
    radius_um: float,
    mpp: float | None,
    progress: bool,
) -> dict[str, Any]:
    """:func:`evaluate`'s work: predictions into ``staging/predictions/``, and
    the content of ``metrics.json``, with the provenance of the run itself."""
    from nucleus_models.detection import segment_image

    model = spec.name
    points_mode = dataset.kind == "points"
    pred_dir = Path(staging) / "predictions"
    pred_dir.mkdir()
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    all_scores: list[np.ndarray] = []
    runtime: dict[str, Any] = {}  # device and precision the model ran in
    all_tp: list[np.ndarray] = []
    density: list[list[dict[str, float]]] = []
    n_true_total = 0
    trained_on = training_image_ids(spec)
    digests: list[str] = []  # of the scored samples, for the provenance's content_sha256
    t_start = time.perf_counter()
    bar = tqdm(ids, desc=f"{dataset.name}/{model}", unit="img", disable=None if progress else True)
    for sample_id in bar:
        sample = dataset.load(sample_id)
        truth = sample.points if points_mode else sample.labels
        if truth is None:
            logger.warning("%s: no annotation, skipped", sample_id)
            skipped.append({"id": sample_id, "reason": "no annotation"})
            continue
        if sample.image.size == 0:
            raise DatasetError(f"{dataset.name}: sample {sample_id!r} has no image")
        digests.append(f"{sample_id}\t{sample_digest(sample_id, sample.image, truth)}")
        s_mpp, mpp_source = _sample_mpp(sample, mpp, spec.mpp)
        seg = segment_image(sample.image, mpp=s_mpp, model=model, model_options=model_options)
        runtime = seg.runtime
        xy = seg.nuclei.centroids - 0.5  # pixel centres at integers, as the metrics
        scores = seg.nuclei.scores.astype(np.float64)
        groups = {str(k): str(v) for k, v in sample.groups.items()}
        groups.setdefault("modality", sample.modality)
        if trained_on is not None:
            # (a model's scores on its own training images are in-sample)
            groups["training_image"] = "yes" if sample_id in trained_on else "no"
        row: dict[str, Any] = {
            "id": sample_id,
            "groups": groups,
            "n_true": 0,
            "n_pred": len(seg.nuclei),
            "seconds": round(seg.seconds, 4),
            "mpp": s_mpp,
            "mpp_source": mpp_source,
            # the resolution the model ran at: its own, or the one a size-normalised
            # model (unet-bbbc038) picked for this image from its nuclei
            "analysis_mpp": round(seg.analysis_mpp, 4),
        }
        if trained_on is not None:
            row["training_image"] = sample_id in trained_on
        if points_mode:
            metrics, is_tp, n_true, bins = _score_points(
                sample, xy, scores, radius_um / s_mpp, DENSITY_RADIUS_UM / s_mpp
            )
            density.append(bins)
            _write_points_csv(pred_dir / f"{sample_id}.csv", xy, scores)
        else:
            import tifffile

            metrics, is_tp, n_true = _score_instances(sample, seg.labels, xy, scores, s_mpp)
            tifffile.imwrite(pred_dir / f"{sample_id}.tif", seg.labels, compression="zlib")
        row["n_true"] = n_true
        row.update(metrics)
        rows.append(row)
        all_scores.append(scores)
        all_tp.append(is_tp)
        n_true_total += n_true
        logger.debug("%s: %s", sample_id, {k: row[k] for k in ("n_true", "n_pred")})
    if not rows:
        raise DatasetError(f"{dataset.name}: {dataset.root}: no annotated samples to evaluate")
    _warn_unknown_resolution(rows, dataset.name, spec, mpp)
    _warn_other_modality(rows, dataset.name, spec)
    _warn_training_images(rows, dataset.name, spec)

    metric_keys = list(POINT_METRICS if points_mode else INSTANCE_METRICS)
    mean = {k: float(np.nanmean([r[k] for r in rows])) for k in metric_keys}
    mean.update(
        n_true=float(np.mean([r["n_true"] for r in rows])),
        n_pred=float(np.mean([r["n_pred"] for r in rows])),
        seconds=float(np.mean([r["seconds"] for r in rows])),
    )
    tp, fp, fn = (sum(int(r[k]) for r in rows) for k in ("tp", "fp", "fn"))
    pooled: dict[str, Any] = {"n_samples": len(rows), "tp": tp, "fp": fp, "fn": fn}
    pooled.update(n_true=sum(r["n_true"] for r in rows), n_pred=sum(r["n_pred"] for r in rows))
    prf = _prf(tp, fp, fn)
    pooled.update(prf if points_mode else {"det_f1": prf["f1"], **prf})
    if not points_mode:
        tp5, fp5, fn5 = (sum(int(r[k]) for r in rows) for k in ("tp_iou50", "fp_iou50", "fn_iou50"))
        pooled.update(tp_iou50=tp5, fp_iou50=fp5, fn_iou50=fn5)
        pooled.update({f"{k}_iou50": v for k, v in _prf(tp5, fp5, fn5).items()})
        pooled["errors"] = error_profile([r["errors"] for r in rows])
    curve = _curve(all_scores, all_tp, n_true_total, "radius" if points_mode else "hit-in-mask")
    pooled["ap"] = curve["ap"]

    result: dict[str, Any] = {
        "kind": "points" if points_mode else "instances",
        "main_metric": "f1" if points_mode else "det_f1",
        "metric_keys": metric_keys,
        "rows": rows,
        "mean": mean,
        "pooled": pooled,
        "groups": _group_blocks(rows, metric_keys),
        "pr_curve": curve,
        "skipped": skipped,
    }
    if points_mode:
        result["density"] = {
            "density_radius_um": DENSITY_RADIUS_UM,
            "match_radius_um": radius_um,
            "edges": list(DENSITY_EDGES),
            "bins": _pool_density(density),
        }
    result["provenance"] = {
        "runtime": runtime,
        "dataset": {
            "name": dataset.name,
            "root": str(dataset.root.resolve()),
            # file names and sizes of the whole dataset, and what the scored samples held
            "fingerprint": fingerprint(dataset),
            "content_sha256": hashlib.sha256("\n".join(digests).encode()).hexdigest(),
            "n_samples": len(rows),
            "split": split,
            # how many of them the model was trained on (None: its card lists none)
            "training_images": (
                None if trained_on is None else sum(bool(r["training_image"]) for r in rows)
            ),
        },
        "seconds_total": round(time.perf_counter() - t_start, 3),
    }
    return result
