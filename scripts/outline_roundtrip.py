"""The MoNuSeg outlines' own round trip through a model's grid: how much of
AJI / Dice the way a segmentation reaches the image grid and the slide costs,
before any model error.

    .venv/bin/python scripts/outline_roundtrip.py [--root ../shared/data/monuseg2018/train]
        [--mpp 0.4] [--simplify 0.5]

Each outlined image's labels are shrunk to ``--mpp`` by area
(``resize_labels``), then brought back to the image grid three ways and
scored against the originals: labels grown by nearest pixel centre
(``labels_to_grid``), labels grown as the outlines draw them
(``resize_labels``, what ``segment_image`` does), and the outlines of
``nuclei_from_labels`` (what the slide's annotation gets) scaled back and
rasterised like the MoNuSeg XML polygons.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    from benchmark.datasets import get_dataset
    from benchmark.metrics import instance_metrics
    from benchmark.training.common import outlines_on_grid
    from nucleus_models.instances import labels_to_grid, resize_labels

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="../shared/data/monuseg2018/train")
    ap.add_argument("--mpp", type=float, default=0.4, help="the model grid (um/px)")
    ap.add_argument("--simplify", type=float, default=0.5, help="outline tolerance (model px)")
    args = ap.parse_args()
    ds = get_dataset("monuseg", args.root)
    rows: dict[str, list[dict[str, float]]] = {"nearest": [], "resize_labels": [], "outlines": []}
    for sid in ds.ids():
        s = ds.load(sid)
        if s.labels is None:
            continue
        truth = np.asarray(s.labels, np.int32)
        h, w = truth.shape
        f = float(s.mpp or 0.25) / args.mpp
        small = resize_labels(truth, (round(w * f), round(h * f)))
        rows["nearest"].append(instance_metrics(truth, labels_to_grid(small, truth.shape)))
        rows["resize_labels"].append(instance_metrics(truth, resize_labels(small, (w, h))))
        drawn = outlines_on_grid(small, truth.shape, simplify=args.simplify)
        rows["outlines"].append(instance_metrics(truth, drawn))
    keys = ("aji", "dice", "f1_iou50")
    print(f"{len(rows['nearest'])} images, model grid {args.mpp} um/px")
    for name, r in rows.items():
        print(f"{name:14s}", "  ".join(f"{k}={np.nanmean([x[k] for x in r]):.4f}" for k in keys))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
