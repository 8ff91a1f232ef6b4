"""Oracle bounds: the annotation's seeds or foreground in place of the model's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


def _two_touching_disks() -> np.ndarray:
    yy, xx = np.mgrid[:40, :60]
    lab = np.zeros((40, 60), np.int32)
    lab[(yy - 20) ** 2 + (xx - 20) ** 2 < 100] = 1
    lab[((yy - 20) ** 2 + (xx - 37) ** 2 < 100) & (lab == 0)] = 2
    return lab


def test_each_oracle_mends_its_own_error() -> None:
    """Maps whose mask is too small and whose two peaks are too shallowly
    separated for the setting's h (one seed for two nuclei): true seeds split
    them, the true mask restores their area, both together give back the
    annotation."""
    from scipy import ndimage as ndi

    from benchmark.training.oracle import VARIANTS, oracle_scores, true_markers

    lab = _two_touching_disks()
    fg = ndi.binary_erosion(lab > 0, iterations=2).astype(np.float32)
    yy, xx = np.mgrid[:40, :60]
    cone1 = 1 - np.hypot(yy - 20, xx - 20) / 12
    cone2 = 0.85 * (1 - np.hypot(yy - 20, xx - 37) / 12)
    dist = np.clip(np.maximum(cone1, cone2), 0, 1).astype(np.float32) * (lab > 0)
    maps = np.stack([fg, np.zeros_like(fg), dist])
    # the lower peak rises 0.5 above the saddle: h 0.8 keeps only the higher one
    params = {"seed_mode": "hmax", "h": 0.8, "smooth": 0.0, "min_area": 4}
    s = oracle_scores(maps, lab, lab, params)
    assert list(s) == list(VARIANTS)
    aji = {k: s[k]["aji"] for k in VARIANTS}
    assert aji["model"] < 0.5  # one instance for two nuclei
    assert s["true_seeds"]["f1_iou50"] == 1.0 and aji["true_seeds"] < 0.9  # split, too small
    assert s["true_mask"]["dice"] == 1.0 and aji["true_mask"] < 0.6  # full area, still merged
    assert aji["true_mask_and_seeds"] > 0.95
    # one seed per nucleus, inside it
    m = true_markers(lab)
    assert sorted(np.unique(m[m > 0]).tolist()) == [1, 2]
    assert all(lab[tuple(p)] == m[tuple(p)] for p in np.argwhere(m))


def test_oracle_of_a_cross_validation_starts_from_its_own_scores(
    shared_data: Path, tmp_path: Path
) -> None:
    """On a finished (tiny) cross-validation the ``model`` row is the CV's own
    score at its chosen setting, the oracle rows are no worse, and bad runs
    are one-line errors."""
    from benchmark.training.oracle import oracle_cv
    from benchmark.training.run import cross_validate
    from tests.test_unet import _cfg, _tiny_images

    imgs = _tiny_images(shared_data)
    cfg = _cfg()
    cfg["train"]["steps"] = 20
    cfg["cv"] = {"folds": 3, "fg_thresholds": [0.5], "seed_thresholds": [0.3, 0.5]}
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="no finished cross-validation"):
        oracle_cv(cfg, run, images=imgs)
    cv = cross_validate(cfg, imgs, run / "cv", resume=False)
    res = oracle_cv(cfg, run, images=imgs, command="nucleus-bench oracle --config c.toml")
    assert res["n_images"] == 3 and res["setting"] == cv["best"]
    prov = json.loads((run / "cv" / "oracle.json").read_text())["provenance"]
    from benchmark.training.common import cv_fingerprint
    from nucleus_models import __version__
    from nucleus_models.models.base import sha256_of_file

    assert prov["package_version"] == __version__ and prov["libraries"]["torch"]
    assert prov["config_sha256"] == cv_fingerprint(cfg)
    assert prov["command"] == "nucleus-bench oracle --config c.toml" and prov["created"]
    assert prov["fold_checkpoints_sha256"] == [
        sha256_of_file(run / "cv" / f"fold{i}" / "checkpoint.pt") for i in range(3)
    ]
    for k, v in cv["metrics_at_best"].items():
        assert res["mean"]["model"][k] == pytest.approx(v, nan_ok=True), k
    both = res["mean"]["true_mask_and_seeds"]
    assert both["aji"] >= res["mean"]["model"]["aji"]
    assert both["dice"] > 0.95  # the annotation's own foreground, back on its grid
    assert json.loads((run / "cv" / "oracle.json").read_text())["n_images"] == 3
    # the model's error profile counts every held-out nucleus once
    errors = res["errors"]
    assert errors["n_true"] == sum(len(np.unique(im.labels)) - 1 for im in imgs)
    assert errors["n_true"] == sum(r["errors"]["n_true"] for r in res["images"])
    assert 0 <= errors["merge_rate"] <= 1 and errors["true_px"] == sum(
        int((im.labels > 0).sum()) for im in imgs
    )
    with pytest.raises(ValueError, match="size-normalised"):
        oracle_cv({**cfg, "data": {**cfg["data"], "rescale_to_diameter": 20}}, run, images=imgs)


def test_oracle_without_a_finished_run_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmark.__main__ import main

    repo = Path(__file__).resolve().parents[1]
    argv = ["oracle", "--config", str(repo / "configs" / "unet-monuseg.toml")]
    assert main([*argv, "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: oracle: ") and "cv.json" in err[0]
    det = ["oracle", "--config", str(repo / "configs" / "maskrcnn-monuseg.toml")]
    assert main([*det, "--run", str(tmp_path)]) == 2
    assert "only U-Net configs" in capsys.readouterr().err
