"""Score finished cross-validation folds of a run on their own held-out
images (a screen for one change before training every fold, or a check of
another arithmetic; the card's numbers come from the whole CV).

    .venv/bin/python scripts/score_fold.py --config CONFIG --run RUN --fold K [K ...]
        [--precision float32|bfloat16|int8] [--at_cv_setting [--outlines]]

Without ``--at_cv_setting`` the post-processing setting is tuned on the
folds' held-out images (as the CV tunes it on all of them); with it, the
run's ``cv/cv.json`` setting is used. Prints the setting and the mean metrics.
With ``--outlines`` (U-Net, at the CV setting) the outlines a slide's
annotation would get (``nuclei_from_labels`` on the model's grid) are
scaled to each image and rasterised like the MoNuSeg XML polygons, and
those are scored instead of the label map.
With ``--blur_um S`` the held-out images are also segmented after a
Gaussian blur of sigma S microns (a defocused scan) and scored at the
setting chosen on the sharp ones, as a deployed model would run.
A torchvision detector's config (``arch`` fasterrcnn, fcos, maskrcnn) scores
its folds the same way, with its own thresholds' grid.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    from benchmark.training.common import mean_metrics
    from benchmark.training.run import (
        _images,
        cv_folds,
        fold_held_out,
        held_out_maps,
        load_config,
        truth_source,
    )
    from benchmark.training.unet import best_setting, full_setting, score_images, tune_thresholds

    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--config", required=True, help="the config the run was trained with")
    ap.add_argument("--run", required=True, help="run folder with cv/fold*/ (runs/<name>)")
    ap.add_argument(
        "--fold", type=int, nargs="+", required=True, help="the folds to score (0-based)"
    )
    ap.add_argument(
        "--precision",
        default="float32",
        choices=["float32", "bfloat16", "int8"],
        help="int8: each fold model calibrated on its own training images, then quantized",
    )
    ap.add_argument(
        "--at_cv_setting",
        action="store_true",
        help="post-process at the run's cv/cv.json setting instead of tuning it on these folds",
    )
    ap.add_argument("--outlines", action="store_true", help="score the annotation's outlines")
    ap.add_argument(
        "--blur_um",
        type=float,
        nargs="*",
        default=[],
        help="also score the images blurred with these Gaussian sigmas (microns)",
    )
    ap.add_argument(
        "--tta",
        action="store_true",
        help="average the maps of the image and its left-right and up-down flips"
        " (the models' tta=1 option)",
    )
    args = ap.parse_args()
    if args.outlines and not args.at_cv_setting:
        raise SystemExit("error: --outlines scores the run's own setting: add --at_cv_setting")
    if args.outlines and args.blur_um:
        raise SystemExit("error: --blur_um scores label maps: drop --outlines")
    cfg = load_config(args.config)
    if cfg.get("arch", "unet") != "unet":
        if args.outlines or args.blur_um:
            raise SystemExit("error: --outlines and --blur_um are for U-Net runs")
        return score_detector_folds(cfg, args)
    images = _images(cfg)
    folds = cv_folds(cfg, images)
    truth_of, _ = truth_source(cfg)
    held = fold_held_out(cfg, args.run, images, folds, args.fold)
    arithmetic = args.precision
    if args.precision == "int8":
        held = int8_folds(cfg, images, folds, held)
        arithmetic = "float32"  # (the networks are quantized: no autocast)
    if args.tta and cfg["data"].get("rescale_to_diameter"):
        raise SystemExit("error: --tta is for models run at a fixed resolution")

    def maps_of(net, image):  # type: ignore[no-untyped-def]
        out = held_out_maps(net, image, cfg, precision=arithmetic)
        if args.tta:  # as UNetModel.forward with tta: the mean of three passes
            for image_axis, maps_axis in ((1, -1), (0, -2)):  # (H, W, 3) -> (3, H, W)
                flipped = np.ascontiguousarray(np.flip(image, image_axis))
                back = np.flip(held_out_maps(net, flipped, cfg, precision=arithmetic), maps_axis)
                out = out + back
            out = out / 3
        return out

    maps = [maps_of(net, im.image) for net, im in held]
    truths = [truth_of(im) for _, im in held]
    if args.at_cv_setting:
        best = json.loads((Path(args.run) / "cv" / "cv.json").read_text())["best"]
        if args.outlines:
            at = mean_metrics(score_outlines(maps, truths, full_setting(cfg, best)))
        else:
            at = mean_metrics(score_images(maps, truths, full_setting(cfg, best)))
    else:
        grid = tune_thresholds(maps, truths, cfg)
        best, at = best_setting(grid, cfg.get("cv", {}).get("metric", "aji"))
    report(args, len(maps), best, at)
    for sigma_um in args.blur_um:
        blurred = [
            held_out_maps(
                net,
                blur(im.image, sigma_um / float(cfg["model"]["mpp"])),
                cfg,
                precision=arithmetic,
            )
            for net, im in held
        ]
        at_b = mean_metrics(score_images(blurred, truths, full_setting(cfg, best)))
        print(f"blur {sigma_um:g} um: " + "  ".join(f"{k}={at_b[k]:.4f}" for k in KEYS))
    return 0


def int8_folds(cfg: dict, images: list, folds: list, held: list) -> list:
    """``held`` with each fold model replaced by its int8 network, calibrated
    on that fold's training images (never its held-out ones)."""
    from benchmark.training.run import int8_calibration
    from nucleus_models.models.int8 import quantize
    from nucleus_models.models.unet import fuse_for_inference

    out, done = [], {}
    for net, im in held:
        if id(net) not in done:
            k = next(i for i, f in enumerate(folds) if im.id in f)
            train = [t for t in images if t.id not in folds[k]]
            calibration = int8_calibration(cfg, net, train)
            done[id(net)] = quantize(fuse_for_inference(net), calibration)
            print(f"fold {k}: int8 calibrated on {len(train)} training images", flush=True)
        out.append((done[id(net)], im))
    return out


def blur(image, sigma_px: float):  # type: ignore[no-untyped-def]
    """``image`` through a Gaussian of ``sigma_px`` pixels (reflected edges)."""
    import cv2

    return cv2.GaussianBlur(image, (0, 0), sigma_px, borderType=cv2.BORDER_REFLECT)


def score_outlines(maps: list, truths: list, params: dict) -> list[dict[str, float]]:
    """Instance metrics of the rasterised outlines of each held-out image."""
    from benchmark.metrics import instance_metrics
    from benchmark.training.common import outlines_on_grid
    from nucleus_models.models.unet import instances_from_maps

    return [
        instance_metrics(t, outlines_on_grid(instances_from_maps(*m[:3], **params).labels, t.shape))
        for m, t in zip(maps, truths, strict=True)
    ]


KEYS = ("f1_iou50", "aji", "dice", "det_f1", "sq", "pq")


def report(args: argparse.Namespace, n: int, best: dict, at: dict) -> int:
    print(json.dumps({"folds": args.fold, "images": n, "precision": args.precision}))
    print(json.dumps({"best": best}))
    print("  ".join(f"{k}={at[k]:.4f}" for k in KEYS))
    return 0


def score_detector_folds(cfg: dict, args: argparse.Namespace) -> int:
    """The same for a torchvision detector's folds (float32 only): its score,
    NMS and mask thresholds tuned on the folds' held-out images, or the run's."""
    from benchmark.training.common import mean_metrics
    from benchmark.training.detectors import (
        _grid,
        held_out_detections,
        held_out_net,
        score_detections,
    )
    from benchmark.training.run import _images, cv_folds, truth_source
    from benchmark.training.unet import best_setting

    if args.precision != "float32":
        raise SystemExit("error: detectors are scored in float32 only")
    images = [im for im in _images(cfg) if im.has_instances]  # as the detector CV
    folds = cv_folds(cfg, images)
    truth_of, _ = truth_source(cfg)
    dets, shapes, truths = [], [], []
    for k in args.fold:
        net = held_out_net(cfg, Path(args.run) / "cv" / f"fold{k}" / "checkpoint.pt")
        for im in images:
            if im.id in folds[k]:
                dets.append(held_out_detections(net, im.image))
                shapes.append(im.image.shape[:2])
                truths.append(truth_of(im))
    if args.at_cv_setting:
        best = json.loads((Path(args.run) / "cv" / "cv.json").read_text())["best"]
        at = mean_metrics(score_detections(dets, shapes, truths, best))
    else:
        grid = [(p, mean_metrics(score_detections(dets, shapes, truths, p))) for p in _grid(cfg)]
        best, at = best_setting(grid, cfg.get("cv", {}).get("metric", "aji"))
    return report(args, len(dets), best, at)


if __name__ == "__main__":
    raise SystemExit(main())
