"""How fast the tile runner goes when the network costs nothing: a stand-in
for a GPU on a machine without one.

    .venv/bin/python scripts/pipeline_ceiling.py SLIDE [--model unet-monuseg]
        [--workers 1 2] [--input_mpp 0.25] [--rounds 2]

The model's maps for every batch are computed once (on the CPU, not timed),
then each scheduler runs the slide again with a network that hands back
those maps (the tiles are still read and normalised for it, as for a
GPU): serially (what a GPU ran before the ``pipeline`` scheduler), and with
each ``--workers`` count a thread pool (``multithreading``: the watershed
in threads) and ``pipeline`` (the watershed in processes).
Prints the tiles' wall time and megapixels per second, and checks that
every run gives the same nuclei. Reading and post-processing are real; the
network's time (on a GPU: the copy to and from it too) is not counted, so
this is the bound that reading and post-processing set, not a GPU's speed.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Replay:
    """The model with its forward replaced by maps recorded for each batch
    (found by a digest of the batch's input, whatever order batches run in)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.recorded: dict[bytes, np.ndarray] = {}
        self.replaying = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def forward(self, batch: Any) -> np.ndarray:
        key = hashlib.blake2b(np.ascontiguousarray(batch.numpy()).data, digest_size=16).digest()
        if not self.replaying:
            self.recorded[key] = self.model.forward(batch)
        return self.recorded[key]


def main() -> None:
    from nucleus_models.detection import DetectionParams, detect_nuclei
    from nucleus_models.wsi import runner

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("slide")
    ap.add_argument("--model", default="unet-monuseg")
    ap.add_argument("--input_mpp", type=float, default=-1.0)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()

    def params(scheduler: str, workers: int) -> DetectionParams:
        return DetectionParams(
            inputImageFile=a.slide,
            model=a.model,
            input_mpp=a.input_mpp,
            device="cpu",
            scheduler=scheduler,
            num_workers=workers,
        )

    real = runner.shared_model(a.model, params("", 1).model_options())
    replay = Replay(real)
    runner._built_model.cache_clear()
    orig = runner._built_model
    runner._built_model = lambda name, options: replay  # type: ignore[assignment]
    try:
        ref = detect_nuclei(params("", 1))  # records the maps
        mp = ref.slide["width"] * ref.slide["height"] / 1e6
        replay.replaying = True
        print(f"{a.slide}: {len(ref.nuclei)} nuclei, {ref.tiles['analysed']} tiles")
        print("scheduler      workers  tiles wall (s)  MP/s   read / post-processing, summed (s)")
        for _ in range(a.rounds):
            runs = [("", 1)] + [(s, w) for w in a.workers for s in ("multithreading", "pipeline")]
            for sched, workers in runs:
                res = detect_nuclei(params(sched, workers))
                same = len(res.nuclei) == len(ref.nuclei) and np.array_equal(
                    res.nuclei.polygon_vertices, ref.nuclei.polygon_vertices
                )
                if not same:
                    raise SystemExit(f"{sched or 'serial'} x{workers}: other nuclei than serial")
                wall = res.timings["tiles"]
                print(
                    f"{res.tiles['scheduler']:<14} {res.tiles['workers']:>7}  {wall:>14.2f}"
                    f"  {mp / wall:>5.1f}   {res.timings['read_cpu']:.2f} /"
                    f" {res.timings['postprocess_cpu']:.2f}"
                )
    finally:
        runner._built_model = orig  # type: ignore[assignment]


if __name__ == "__main__":
    main()
