"""How much better could a U-Net's instances be? Oracle bounds on held-out images.

A U-Net's instances come from two things: its foreground mask and the seeds
of the watershed that splits it. Replacing either by the annotation's, on the
held-out images of a finished cross-validation, says which one limits the
scores (Kumar et al. 2017 and HoVer-Net-style studies separate detection
from segmentation the same way):

* ``model``: the cross-validation's own instances (its chosen setting);
* ``true_seeds``: one seed per annotated nucleus (its innermost pixel), the
  model's mask and watershed height: perfect splitting;
* ``true_mask``: the annotated foreground as the mask, the model's seeds and
  height: a perfect foreground;
* ``true_mask_and_seeds``: both (what is left is the model grid's resolution
  and the watershed's lines between touching nuclei).

Each is scored as cross-validation scores (:func:`.common.score_on_truth`, at
the images' own resolution); the model's own instances also get the error
profile ``nucleus-bench eval`` reports (:func:`benchmark.evaluate.error_profile`). ``nucleus-bench oracle --config C --run RUN``
writes ``RUN/cv/oracle.json``.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .common import mean_metrics, score_on_truth
from .data import TrainImage, input_normalisation

__all__ = ["VARIANTS", "true_markers", "oracle_instances", "oracle_scores", "oracle_cv"]

#: The four ways of making instances, in the order they are reported.
VARIANTS = ("model", "true_seeds", "true_mask", "true_mask_and_seeds")


def true_markers(labels: np.ndarray) -> np.ndarray:
    """One seed pixel per instance of ``labels``, at its innermost pixel (the
    largest distance to its outline), labelled with the instance's id.

    >>> lab = np.zeros((7, 12), np.int32); lab[1:6, 1:6] = 3; lab[1:6, 6:11] = 8
    >>> m = true_markers(lab)
    >>> [(int(y), int(x), int(m[y, x])) for y, x in np.argwhere(m)]
    [(3, 3, 3), (3, 8, 8)]
    """
    from scipy import ndimage as ndi

    lab = np.asarray(labels, np.int32)
    out = np.zeros(lab.shape, np.int32)
    ids = np.unique(lab)
    ids = ids[ids > 0]
    if not ids.size:
        return out
    # distance to the outline of each instance, touching neighbours included
    inner = lab * (ndi.grey_erosion(lab, size=3) == lab) * (ndi.grey_dilation(lab, size=3) == lab)
    edt = ndi.distance_transform_edt(inner > 0)
    for i, pos in zip(ids, ndi.maximum_position(edt + (lab > 0), lab, ids), strict=True):
        out[pos] = i
    return out


def oracle_scores(
    maps: np.ndarray, grid_labels: np.ndarray, truth: np.ndarray, params: dict[str, Any]
) -> dict[str, dict[str, float]]:
    """Instance metrics of one image for each of :data:`VARIANTS`.

    ``maps``: the network's ``(3, h, w)`` maps on the model's grid;
    ``grid_labels``: the annotation on that grid (the training labels);
    ``truth``: the annotation the metrics score against (the image's own
    grid); ``params``: the post-processing setting
    (:func:`nucleus_models.models.unet.instances_from_maps` keywords).
    """
    return _scored(oracle_instances(maps, grid_labels, params), truth)


def _scored(made: dict[str, np.ndarray], truth: np.ndarray) -> dict[str, dict[str, float]]:
    return {k: score_on_truth(made[k], truth) for k in VARIANTS}


def oracle_instances(
    maps: np.ndarray, grid_labels: np.ndarray, params: dict[str, Any]
) -> dict[str, np.ndarray]:
    """The instance label maps (model grid) of :func:`oracle_scores`, by variant."""
    from nucleus_models.models.unet import instances_from_maps

    fg, bd, dist = maps[0], maps[1], maps[2]
    seeds = true_markers(grid_labels)
    true_fg = (np.asarray(grid_labels) > 0).astype(np.float32)
    # a perfect mask scores 1 everywhere inside: the mean-probability filter
    # keeps every instance of it
    masked = {**params, "fg_threshold": 0.5, "min_score": 0.0}
    made = {
        "model": instances_from_maps(fg, bd, dist, **params),
        "true_seeds": instances_from_maps(fg, bd, dist, **params, markers=seeds),
        "true_mask": instances_from_maps(true_fg, bd, dist, **masked),
        "true_mask_and_seeds": instances_from_maps(true_fg, bd, dist, **masked, markers=seeds),
    }
    return {k: made[k].labels for k in VARIANTS}


def oracle_cv(
    cfg: dict[str, Any],
    run: str | Path,
    images: list[TrainImage] | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """:func:`oracle_scores` on every held-out image of a finished U-Net
    cross-validation in ``run`` (its fold models and chosen setting), averaged
    over the images; written to ``run/cv/oracle.json`` with its provenance
    (package and library versions, the config's name and fingerprint, each
    fold model's sha256, ``command``: default ``" ".join(sys.argv)``).
    ``images``: the training images (default: the config's data, as
    ``train`` loads them).

    Raises
    ------
    ValueError
        If the run has no finished cross-validation of this config, or the
        config is not a U-Net at a fixed resolution (size-normalised models
        pick their scale per image, where the annotation has no grid).
    """
    from benchmark.evaluate import error_counts, error_profile
    from nucleus_models import __version__
    from nucleus_models.detection import library_versions
    from nucleus_models.instances import resize_labels
    from nucleus_models.models.base import sha256_of_file

    from .common import cv_fingerprint
    from .run import _images, _load_net, cv_folds, truth_source
    from .unet import full_setting, predict_maps

    if cfg.get("arch", "unet") != "unet":
        raise ValueError(f"oracle: only U-Net configs, not arch {cfg.get('arch')!r}")
    if cfg["data"].get("rescale_to_diameter"):
        raise ValueError("oracle: not for size-normalised configs (data.rescale_to_diameter)")
    cv_dir = Path(run) / "cv"
    record = cv_dir / "cv.json"
    if not record.is_file():
        raise ValueError(f"oracle: {record}: no finished cross-validation (train --resume first)")
    try:
        cv = json.loads(record.read_text())
        cv["folds"], cv["best"]  # noqa: B018 (what the oracle reads)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"oracle: {record}: not a cross-validation record ({exc})") from None
    images = _images(cfg) if images is None else images
    folds = cv_folds(cfg, images)
    if cv["folds"] != folds:
        raise ValueError(f"oracle: {record}: its folds are not this config's")
    truth_of, _ = truth_source(cfg)
    params = full_setting(cfg, cv["best"])
    norm = input_normalisation(cfg)
    per_image: list[dict[str, Any]] = []
    fold_sha256: list[str] = []
    for i, held in enumerate(folds):
        ckpt = cv_dir / f"fold{i}" / "checkpoint.pt"
        if not ckpt.is_file():
            raise ValueError(f"oracle: {ckpt} is missing")
        fold_sha256.append(sha256_of_file(ckpt))
        net = _load_net(ckpt, cfg)
        for im in images:
            if im.id not in held:
                continue
            maps = predict_maps(net, im.image, normalisation=norm)
            made = oracle_instances(maps, im.labels, params)
            truth = truth_of(im)
            scores = _scored(made, truth)
            # the model's own errors, as `nucleus-bench eval` profiles them; the
            # truth's resolution from the two grids' sizes
            truth_mpp = float(cfg["model"]["mpp"]) * im.labels.shape[0] / truth.shape[0]
            model = resize_labels(made["model"], (truth.shape[1], truth.shape[0]))
            errors = error_counts(truth, model, truth_mpp)
            per_image.append({"id": im.id, "fold": i, **scores, "errors": errors})
    result = {
        "setting": cv["best"],
        "n_images": len(per_image),
        "mean": {k: mean_metrics([r[k] for r in per_image]) for k in VARIANTS},
        "errors": error_profile([r["errors"] for r in per_image]),
        "images": per_image,
        "provenance": {
            "package_version": __version__,
            "libraries": library_versions(),
            "config": cfg.get("name"),
            "config_sha256": cv_fingerprint(cfg),
            "fold_checkpoints_sha256": fold_sha256,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": command if command is not None else " ".join(sys.argv),
        },
    }
    (cv_dir / "oracle.json").write_text(json.dumps(result, indent=1) + "\n")
    return result
