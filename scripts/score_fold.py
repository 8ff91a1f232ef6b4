"""Score one finished cross-validation fold of a U-Net run on its own held-out
images, its post-processing setting tuned on them (a screen for one change
before training every fold; the card's numbers come from the whole CV).

    .venv/bin/python scripts/score_fold.py --config CONFIG --run RUN --fold K

Prints the chosen setting and the metrics at it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    from benchmark.training.run import (
        _images,
        _load_net,
        cv_folds,
        held_out_maps,
        load_config,
        truth_source,
    )
    from benchmark.training.unet import cv_score, tune_thresholds

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--fold", type=int, required=True)
    args = ap.parse_args()
    cfg = load_config(args.config)
    images = _images(cfg)
    held = cv_folds(cfg, images)[args.fold]
    net = _load_net(Path(args.run) / "cv" / f"fold{args.fold}" / "checkpoint.pt", cfg)
    truth_of, _ = truth_source(cfg)
    ims = [im for im in images if im.id in held]
    maps = [held_out_maps(net, im.image, cfg) for im in ims]
    grid = tune_thresholds(maps, [truth_of(im) for im in ims], cfg)
    metric = cfg.get("cv", {}).get("metric", "aji")
    best, at = max(grid, key=lambda pm: cv_score(pm[1], metric))
    keys = ("f1_iou50", "aji", "dice", "det_f1", "sq", "pq")
    print(json.dumps({"fold": args.fold, "images": len(ims), "best": best}))
    print("  ".join(f"{k}={at[k]:.4f}" for k in keys))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
