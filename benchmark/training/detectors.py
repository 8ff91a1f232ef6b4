"""Training torchvision detectors (Faster R-CNN, FCOS, Mask R-CNN) from the U-Net's loaders.

``nucleus-bench train --config configs/<arch>-<data>.toml`` lands here when
the config's ``arch`` is not ``unet``.  Patches come from the same
:class:`~benchmark.training.data.TrainImage` list, :func:`sample_patch` and
:func:`augment` as the U-Net's; each patch's instance map gives the targets
(boxes ``x0, y0, x1, y1`` and, for Mask R-CNN, one binary mask per nucleus).
Images with only a foreground mask are skipped; patches without nuclei are
kept with empty targets (they teach the background).  Training is seeded and
resumable (``out_dir/checkpoint.pt``); the export writes ``<name>.pt``
(``state_dict``), ``<name>.json`` (card) and ``<name>.md`` (model card).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from .common import (
    cv_fingerprint,
    invocation_text,
    restore_checkpoint,
    train_loop,
    trained_on,
    training_lines,
    training_record,
    training_settings,
    warmup_cosine,
    write_weights,
)
from .data import (
    TrainImage,
    augment,
    label_resize_of,
    sample_patch,
    stain_normalisation_of,
    warps,
)

__all__ = ["instance_targets", "train_detector", "export", "train_from_config"]

log = logging.getLogger(__name__)


def _net_options(cfg: dict[str, Any]) -> dict[str, int]:
    m = cfg.get("model", {})
    return {
        "fpn_channels": int(m.get("fpn_channels", 64)),
        "detections_per_img": int(m.get("detections_per_img", 1000)),
    }


def build_from_config(cfg: dict[str, Any]) -> Any:
    """The (untrained) detector a config describes."""
    from nucleus_models.models.torchvision_detectors import build_detector

    return build_detector(cfg["arch"], **_net_options(cfg))


def instance_targets(
    labels: np.ndarray, *, min_area: int = 4, masks: bool = False
) -> dict[str, Any]:
    """torchvision targets from an instance label map.

    Instances smaller than ``min_area`` pixels (slivers cut by the patch edge)
    are dropped; with none left the target is empty (boxes ``(0, 4)``).

    >>> lab = np.zeros((10, 10), np.int32); lab[2:5, 3:7] = 7; lab[8, 8] = 2
    >>> t = instance_targets(lab, masks=True)
    >>> t["boxes"].tolist(), t["labels"].tolist(), tuple(t["masks"].shape)
    ([[3.0, 2.0, 7.0, 5.0]], [1], (1, 10, 10))
    """
    import torch
    from scipy import ndimage as ndi
    from skimage.segmentation import relabel_sequential

    lab = relabel_sequential(np.asarray(labels, np.int32))[0]
    n = int(lab.max(initial=0))
    area = np.bincount(lab.ravel(), minlength=n + 1)
    boxes, ids = [], []
    for k, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is None or area[k] < min_area:
            continue
        boxes.append((sl[1].start, sl[0].start, sl[1].stop, sl[0].stop))
        ids.append(k)
    t: dict[str, Any] = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.ones(len(ids), dtype=torch.int64),
    }
    if masks:
        m = lab[None] == np.asarray(ids, np.int32).reshape(-1, 1, 1)
        t["masks"] = torch.from_numpy(m.astype(np.uint8))
    return t


def _patch(
    item: TrainImage,
    size: int,
    rng: np.random.Generator,
    tr: dict[str, Any],
    aug: dict[str, Any],
    label_resize: str,
) -> tuple[np.ndarray, np.ndarray]:
    """An augmented ``(image, labels)`` patch drawn with :func:`sample_patch`.

    ``sample_patch`` returns targets maps, not the instance map; the crop is
    replayed on a copy of the generator (same draws: scale, then y0, x0) and
    checked against the patch's foreground, so drift is an error, not noise.
    """
    from .data import _resize

    scale_range = tuple(tr.get("scale_range", (1.0, 1.0)))
    probe = copy.deepcopy(rng)
    p = sample_patch(item, size, rng, scale_range=scale_range, label_resize=label_resize)
    s = float(probe.uniform(*scale_range)) if scale_range != (1.0, 1.0) else 1.0
    crop = int(np.ceil(size / s))
    h, w = item.labels.shape
    y0 = int(probe.integers(0, max(h - crop, 0) + 1))
    x0 = int(probe.integers(0, max(w - crop, 0) + 1))
    lab = item.labels[y0 : y0 + crop, x0 : x0 + crop]
    lab = _resize(lab, s, nearest=label_resize) if s != 1.0 else lab
    lab = np.pad(lab, ((0, max(size - lab.shape[0], 0)), (0, max(size - lab.shape[1], 0))))
    lab = np.ascontiguousarray(lab[:size, :size], dtype=np.int32)
    if not np.array_equal(lab > 0, p["fg"] > 0):
        raise RuntimeError("instance crop does not match sample_patch (its draws changed?)")
    img = p["image"].copy()
    pad = p["fg_weight"] == 0
    if pad.any():  # reflected nuclei would be unlabelled: fill with the mean colour
        img[pad] = img[~pad].reshape(-1, 3).mean(0).astype(np.uint8)
    out = augment({"image": img, "labels": lab}, rng, aug)
    return out["image"], out["labels"]


def _batch(
    items: list[TrainImage], cfg: dict[str, Any], rng: np.random.Generator
) -> tuple[list[Any], list[dict[str, Any]]]:
    import torch

    tr = cfg["train"]
    size = int(tr["patch_size"])
    masks = cfg["arch"] == "maskrcnn"
    images, targets = [], []
    for i in rng.choice(len(items), size=int(tr["batch_size"])):
        img, lab = _patch(
            items[int(i)],
            size,
            rng,
            tr,
            cfg.get("augment", {}),
            label_resize_of(cfg),
        )
        images.append(torch.from_numpy(img.transpose(2, 0, 1).copy()).float() / 255.0)
        targets.append(
            instance_targets(lab, min_area=int(tr.get("min_instance_area", 4)), masks=masks)
        )
    return images, targets


def train_detector(
    cfg: dict[str, Any],
    images: list[TrainImage],
    out_dir: str | Path,
    *,
    steps: int | None = None,
    resume: bool = False,
    progress: bool = True,
) -> Path:
    """Train ``cfg["arch"]`` on the images with instances; returns ``out_dir/checkpoint.pt``.

    Resuming restores model, optimiser, schedule, step and random state.
    ``cfg["train"]["device"]`` (``cpu`` by default, or ``auto``/``cuda``) picks
    where the network runs; patches are always made on the CPU.
    """
    import torch

    from .unet import seed_everything

    items = [im for im in images if im.has_instances]
    if not items:
        raise ValueError("no training images with nucleus instances")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tr = cfg["train"]
    total = int(steps if steps is not None else tr["steps"])
    rng = seed_everything(int(cfg.get("seed", 0)))
    if tr.get("threads"):
        torch.set_num_threads(int(tr["threads"]))
    from nucleus_models.models.unet import pick_device

    device = pick_device(tr.get("device", "cpu"))
    net = build_from_config(cfg).to(device)
    params = [p for p in net.parameters() if p.requires_grad]
    lr, wd = float(tr.get("lr", 5e-4)), float(tr.get("weight_decay", 1e-4))
    if tr.get("optimizer", "adamw").lower() == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    sched = warmup_cosine(opt, total, warmup_fraction=0.05)
    ckpt = out / "checkpoint.pt"
    step, history, sessions = 0, [], []
    if resume and ckpt.exists():
        step, history, state = restore_checkpoint(
            ckpt,
            net=net,
            opt=opt,
            sched=sched,
            rng=rng,
            expect={"arch": cfg["arch"]},
            settings=training_settings(cfg),
        )
        sessions = list(state.get("sessions", []))
    net.train()

    def one_step() -> dict[str, float]:
        x, y = _batch(items, cfg, rng)
        x = [im.to(device) for im in x]
        y = [{k: v.to(device) for k, v in t.items()} for t in y]
        parts = net(x, y)
        loss = sum(parts.values())
        opt.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, float(tr.get("clip_grad", 10.0)))
            opt.step()
        else:
            log.warning("step %d: non-finite loss %s, update skipped", sched.last_epoch + 1, parts)
        return {k: float(v.detach()) for k, v in parts.items()} | {"loss": float(loss.detach())}

    return train_loop(
        one_step,
        net=net,
        opt=opt,
        sched=sched,
        rng=rng,
        out=out,
        step=step,
        total=total,
        history=history,
        desc=f"train {cfg.get('name', cfg['arch'])}",
        progress=progress,
        log_every=int(tr.get("log_every", 25)),
        checkpoint_every=int(tr.get("checkpoint_every", 250)),
        sessions=sessions,
        arch=cfg["arch"],
        net_options=_net_options(cfg),
        training_settings=training_settings(cfg),
    )


_ARCH_TEXT = {
    "fasterrcnn": "Faster R-CNN",
    "fcos": "FCOS",
    "maskrcnn": "Mask R-CNN",
}


def export(
    cfg: dict[str, Any],
    ckpt: Path,
    weights_dir: Path,
    meta: dict[str, Any],
    cv: dict[str, Any] | None = None,
) -> Path:
    """Write ``<name>.pt`` (state_dict), ``<name>.json`` (card) and ``<name>.md``
    (model card); the thresholds are those ``cv`` chose, else the config's."""
    m = cfg["model"]
    thresholds: dict[str, float] = {
        "score_threshold": float(m.get("score_threshold", 0.5)),
        "nms_iou": float(m.get("nms_iou", 0.3)),
        "mask_threshold": float(m.get("mask_threshold", 0.5)),
        "min_area": int(m.get("min_area", 8)),
        **_net_options(cfg),
    }
    if cv:
        thresholds.update(cv["best"])
    return write_weights(
        cfg,
        ckpt,
        weights_dir,
        arch=cfg["arch"],
        thresholds=thresholds,
        card={"training": meta, "cv": cv},
        markdown=lambda spec: _card_markdown(cfg, spec, meta, cv),
    )


def _card_markdown(
    cfg: dict[str, Any], spec: dict[str, Any], meta: dict[str, Any], cv: dict[str, Any] | None
) -> str:
    from .run import cv_card_lines

    th = spec["thresholds"]
    arch = cfg["arch"]
    shape = (
        f"mask > {th['mask_threshold']} pasted into its box"
        if arch == "maskrcnn"
        else "the ellipse inscribed in each box (box models have no outline)"
    )
    tr = cfg["train"]
    return "\n".join(
        [
            f"# Model card: {spec['name']}",
            "",
            spec["description"],
            "",
            f"- Architecture: torchvision {_ARCH_TEXT[arch]}, ResNet-18 FPN (strides 4/8/16, "
            f"{th['fpn_channels']} channels), random initialisation; {meta['parameters']:,} parameters",
            f"- Instances: detections with score >= {th['score_threshold']} after NMS "
            f"(IoU {th['nms_iou']}), painted by descending score; shape: {shape}; min_area {th['min_area']} px",
            f"- Resolution: {spec['mpp']} um/px (inputs are resampled to it); modality: {spec['modality']}",
            f"- Training data: {cfg.get('card', {}).get('data', cfg['data']['dataset'])}; "
            "only images with nucleus instances",
            *training_lines(meta, cfg),
            f"- Training: {meta['steps']} steps, batch {tr['batch_size']}, patch {tr['patch_size']} px, "
            f"{tr.get('optimizer', 'adamw')} lr {tr.get('lr', 5e-4)}, "
            f"{meta['seconds'] / 60:.1f} min on {meta['hardware']}"
            + (
                f" (cross-validation folds: {meta['cv_seconds'] / 60:.1f} min more)"
                if meta.get("cv_seconds")
                else ""
            ),
            f"- Weights: `{spec['weights']}`, sha256 `{spec['sha256']}` (loaded with weights_only=True after a checksum check)",
            f"- License: {spec['license']}",
            "- Thresholds (score, NMS IoU"
            + (", mask" if arch == "maskrcnn" else "")
            + ") were chosen by cross-validation (below)."
            if cv
            else "- Thresholds are the config's, not tuned by cross-validation.",
            "",
            *(cv_card_lines(cfg, spec, cv) if cv else []),
        ]
    )


def _grid(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The post-processing settings cross-validation scores: ``cv.score_thresholds``
    x ``cv.nms_ious`` (x ``cv.mask_thresholds`` for Mask R-CNN)."""
    cv, m = cfg.get("cv", {}), cfg["model"]
    masks = cv.get("mask_thresholds", [0.4, 0.5, 0.6]) if cfg["arch"] == "maskrcnn" else [0.5]
    return [
        {
            "score_threshold": float(st),
            "nms_iou": float(nms),
            "mask_threshold": float(mt),
            "min_area": int(m.get("min_area", 8)),
        }
        for st in cv.get("score_thresholds", [0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
        for nms in cv.get("nms_ious", [0.2, 0.3, 0.4])
        for mt in masks
    ]


def held_out_net(cfg: dict[str, Any], ckpt: Path) -> Any:
    """A fold's trained detector, keeping every detection that some setting
    of :func:`_grid` may keep (lowest score threshold, loosest NMS)."""
    import torch

    from nucleus_models.models.torchvision_detectors import build_detector

    from .common import shipped_state

    grid_params = _grid(cfg)
    net = build_detector(
        cfg["arch"],
        score_thresh=min(0.05, *(p["score_threshold"] for p in grid_params)),
        nms_iou=max(0.5, *(p["nms_iou"] for p in grid_params)),
        **_net_options(cfg),
    )
    net.load_state_dict(shipped_state(torch.load(ckpt, map_location="cpu", weights_only=True)))
    return net


def held_out_detections(net: Any, image: np.ndarray) -> dict[str, np.ndarray]:
    """Raw detections of one held-out image (at the model's resolution), as
    :class:`DetectorModel` makes them for a tile (same tensors, same call)."""
    from nucleus_models.models.torchvision_detectors import detect, to_tensors

    return detect(net, to_tensors([image]))[0]


def score_detections(
    dets: list[dict[str, np.ndarray]],
    shapes: list[tuple[int, int]],
    truths: list[np.ndarray],
    params: dict[str, Any],
) -> list[dict[str, float]]:
    """The harness's metrics of each held-out image's detections (at the
    model's resolution, :func:`held_out_detections`) turned into instances
    with one post-processing setting of :func:`_grid`."""
    from nucleus_models.models.torchvision_detectors import detections_to_instances

    from .common import score_on_truth

    return [
        score_on_truth(detections_to_instances(d, shape, **params).labels, t)
        for d, shape, t in zip(dets, shapes, truths, strict=True)
    ]


def cross_validate(
    cfg: dict[str, Any],
    images: list[TrainImage],
    out: Path,
    *,
    resume: bool,
    only_fold: int | None = None,
) -> dict[str, Any]:
    """k-fold CV of a detector on the same folds as the U-Net's
    (:func:`.run.cv_folds`), scored the same way (:func:`.common.score_on_truth`);
    the score, NMS and mask thresholds are chosen on the held-out images
    (``cv.metric``) from :func:`_grid`.

    ``only_fold``: train that fold's model only (folds can train in parallel
    processes; a later run with ``resume`` finds them finished and evaluates).
    """
    from .common import mean_metrics
    from .run import cv_folds, fold_training_images, group_metrics, truth_source
    from .unet import best_setting

    cv = cfg.get("cv", {})
    folds = cv_folds(cfg, images, only_fold)
    truth_of, at_native = truth_source(cfg)
    grid_params = _grid(cfg)
    dets, shapes, truths, ids, groups = [], [], [], [], []
    for i, held in enumerate(folds):
        if only_fold is not None and i != only_fold:
            continue
        train = [im for im in fold_training_images(cfg, images, held, i) if im.has_instances]
        ckpt = train_detector(
            cfg,
            train,
            out / f"fold{i}",
            steps=int(cv.get("steps", cfg["train"]["steps"])),
            resume=resume,
        )
        if only_fold is not None:
            return {"folds": folds, "trained_fold": only_fold}
        net = held_out_net(cfg, ckpt)
        for im in images:
            if im.id in held:
                dets.append(held_out_detections(net, im.image))
                shapes.append(im.image.shape[:2])
                truths.append(truth_of(im))
                ids.append(im.id)
                groups.append(dict(im.groups))

    metric = cv.get("metric", "aji")
    grid = [
        (params, mean_metrics(score_detections(dets, shapes, truths, params)))
        for params in grid_params
    ]
    best, at_best = best_setting(grid, metric)
    report = list(cv.get("report_groups", []))
    result = {
        "folds": folds,
        "config_sha256": cv_fingerprint(cfg),
        "metric": metric,
        "tuned_on": "all",
        "scored_at": "image resolution" if all(at_native(i) for i in ids) else "model resolution",
        "best": best,
        "metrics_at_best": at_best,
        "by_group": group_metrics(
            score_detections(dets, shapes, truths, best) if report else [], groups, report
        ),
        "grid": [{**p, **m} for p, m in grid],
        "n_images": len(ids),
    }
    (out / "cv.json").write_text(json.dumps(result, indent=2))
    return result


def train_from_config(
    cfg: dict[str, Any],
    *,
    out_dir: str | Path,
    resume: bool = False,
    skip_cv: bool = False,
    cv_only: bool = False,
    fold: int | None = None,
    steps: int | None = None,
    export_to: str | Path | None = None,
    cv_from: str | Path | None = None,
    cv_config: str | Path | None = None,
) -> dict[str, Any]:
    """Cross-validate the detector a loaded config describes (unless
    ``skip_cv``; one fold only with ``fold``; taken from an earlier run of
    the same config with ``cv_from``, :func:`.run.carried_cv`), train it on
    all images with instances (unless ``cv_only``), optionally export it
    with the thresholds the cross-validation chose (else the config's).

    Returns
    -------
    dict
        ``checkpoint``, ``cv`` (None when skipped), ``meta`` and, when
        exporting, ``weights``.
    """
    import torch

    from .run import _images, _training_set, cv_stage

    if warps(cfg.get("augment")):
        # _patch replays sample_patch's crop to recover the instance map
        raise ValueError(
            f"augment.rotate and augment.elastic are for U-Nets; {cfg.get('arch')} does not take them"
        )
    if stain_normalisation_of(cfg) != "none":
        # served detectors read tiles as they are
        raise ValueError(
            f"model.stain_normalisation is for U-Nets; {cfg.get('arch')} does not take it"
        )
    out = Path(out_dir)
    images = [im for im in _images(cfg) if im.has_instances]
    if not images:
        raise ValueError(f"no training images with instances under {cfg['data']['root']}")
    out.mkdir(parents=True, exist_ok=True)  # (after the data: a run without any makes none)
    cv, t_cv = cv_stage(
        cross_validate,
        cfg,
        images,
        out,
        resume=resume,
        skip_cv=skip_cv,
        fold=fold,
        cv_from=cv_from,
        cv_config=cv_config,
    )
    if fold is not None:
        return {"checkpoint": str(out / "cv" / f"fold{fold}" / "checkpoint.pt"), "cv": None}
    if cv_only:
        return {"checkpoint": None, "cv": cv, "meta": {}}
    train = [im for im in _training_set(cfg, images) if im.has_instances]
    ckpt = train_detector(cfg, train, out / "final", steps=steps, resume=resume)
    seconds, sessions = training_record(ckpt)
    meta = {
        "command": invocation_text(f"nucleus-bench train --config {cfg.get('_config_path')}"),
        "sessions": sessions,
        "config": cfg.get("_config_path"),
        "arch": cfg["arch"],
        "backbone": "resnet18-fpn (layer1-3), weights=None",
        "steps": int(steps if steps is not None else cfg["train"]["steps"]),
        "seconds": round(seconds, 1),
        "cv_seconds": round(t_cv, 1),
        "hardware": trained_on(sessions),
        "torch": torch.__version__,
        "images": [im.id for im in images],
        "parameters": sum(p.numel() for p in build_from_config(cfg).parameters()),
        "seed": int(cfg.get("seed", 0)),
    }
    result: dict[str, Any] = {"checkpoint": str(ckpt), "cv": cv, "meta": meta}
    if export_to is not None:
        result["weights"] = str(export(cfg, ckpt, Path(export_to), meta, cv))
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    return result
