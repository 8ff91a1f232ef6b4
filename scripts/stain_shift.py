"""Held-out quality of U-Net fold models when the held-out images are
re-stained (a robustness check for slides from other laboratories).

    .venv/bin/python scripts/stain_shift.py --fold K [K ...]
        --model CONFIG RUN [--model CONFIG RUN ...]

Each held-out image of the folds is read raw, shifted in HED space (as
``skimage.color.rgb2hed`` separates it: haematoxylin or eosin scaled, or
the whole image darkened) and only then prepared as the model's config says
(a ``stain_normalisation = "reinhard"`` model normalises the shifted image
with its own statistics, as serving would). The post-processing setting of
each model is tuned once on the unshifted images and kept for the shifts.
Prints one line per model and shift.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# name -> (haematoxylin, eosin, DAB) scale in HED optical density
SHIFTS = {
    "none": (1.0, 1.0, 1.0),
    "haematoxylin x0.6": (0.6, 1.0, 1.0),
    "haematoxylin x1.5": (1.5, 1.0, 1.0),
    "eosin x1.6": (1.0, 1.6, 1.0),
    "all stains x1.4": (1.4, 1.4, 1.4),
}


def shifted(rgb: np.ndarray, scale: tuple[float, float, float]) -> np.ndarray:
    """``rgb`` with each HED channel's optical density scaled."""
    from skimage.color import hed2rgb, rgb2hed

    if scale == (1.0, 1.0, 1.0):
        return rgb
    hed = rgb2hed(np.clip(rgb / 255.0, 1e-6, 1))
    return np.clip(hed2rgb(hed * np.asarray(scale)) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def main() -> int:
    from dataclasses import replace

    from benchmark.training.common import mean_metrics
    from benchmark.training.data import stain_normalisation_of, stain_normalise_images
    from benchmark.training.run import (
        _images,
        cv_folds,
        fold_held_out,
        held_out_maps,
        load_config,
        modality_of,
        truth_source,
    )
    from benchmark.training.unet import best_setting, full_setting, score_images, tune_thresholds

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fold", type=int, nargs="+", required=True)
    ap.add_argument("--model", nargs=2, action="append", metavar=("CONFIG", "RUN"), required=True)
    args = ap.parse_args()
    keys = ("f1_iou50", "aji", "dice", "det_f1")
    for config, run in args.model:
        cfg = load_config(config)
        # raw images: the shift comes before the model's own normalisation
        images = _images({**cfg, "model": {**cfg["model"], "stain_normalisation": "none"}})
        reinhard = stain_normalisation_of(cfg) == "reinhard"
        held = fold_held_out(cfg, run, images, cv_folds(cfg, images), args.fold)
        truth_of, _ = truth_source(cfg)
        truths = [truth_of(im) for _, im in held]
        setting = None
        for name, scale in SHIFTS.items():
            maps = []
            for net, im in held:
                im = replace(im, image=shifted(im.image, scale))
                if reinhard:
                    im = stain_normalise_images([im], modality_of(cfg))[0]
                maps.append(held_out_maps(net, im.image, cfg))
            if setting is None:  # tuned on the unshifted images, kept for the shifts
                grid = tune_thresholds(maps, truths, cfg)
                setting, _ = best_setting(grid, cfg.get("cv", {}).get("metric", "aji"))
            at = mean_metrics(score_images(maps, truths, full_setting(cfg, setting)))
            row = {"model": config, "shift": name, "images": len(maps)}
            print(json.dumps(row | {k: round(float(at[k]), 4) for k in keys}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
