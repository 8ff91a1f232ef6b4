"""The training pipeline keeps images and targets together: resampling by
resolution, patch crops, padding, scale jitter, flips/rotations and
synthetic images (found missing by a mutation test of benchmark/training/data.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from benchmark.training.data import (
    TrainImage,
    _resize,
    augment,
    load_training_images,
    sample_patch,
    synthetic_image,
)


def _item(h: int = 40, w: int = 90, labelled: bool = True) -> TrainImage:
    """A wide image whose red channel says where the nuclei are (200 in, 20 out)
    and whose green channel is the column index."""
    lab = np.zeros((h, w), np.int32)
    lab[3:9, 4:20] = 1  # wide
    lab[15:35, 30:36] = 2  # tall
    lab[25:30, 70:89] = 3  # near the right edge
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.where(lab > 0, 200, 20)
    img[..., 1] = np.arange(w)[None, :]
    return TrainImage("t", img, lab if labelled else None, lab > 0)


def _agreement(p: dict[str, np.ndarray]) -> float:
    valid = p["fg_weight"] > 0
    return float(((p["image"][..., 0] > 110) == (p["fg"] > 0))[valid].mean())


@pytest.mark.parametrize("labelled", [True, False])
def test_patches_crop_image_and_targets_at_the_same_place(labelled: bool) -> None:
    item = _item(labelled=labelled)
    cols = set()
    for seed in range(60):
        p = sample_patch(item, 32, np.random.default_rng(seed))
        assert _agreement(p) == 1.0
        cols |= set(np.unique(p["image"][..., 1]).tolist())
    # patches reach across the whole width (a 32 px crop of a 90 px wide image)
    assert min(cols) == 0 and max(cols) >= 85


def test_scale_jitter_and_padding_keep_the_targets_on_the_image() -> None:
    item = _item()
    for seed in range(30):
        p = sample_patch(item, 48, np.random.default_rng(seed), scale_range=(0.7, 1.4))
        assert _agreement(p) > 0.95
    p = sample_patch(item, 48, np.random.default_rng(0))  # 40 rows: 8 rows of padding
    assert p["fg_weight"][40:].max() == 0 and p["fg_weight"][:40].min() == 1
    assert _agreement(p) == 1.0


def test_flips_and_rotations_move_image_and_targets_together() -> None:
    item = _item(48, 48)
    item.image[..., 1] = 0
    for seed in range(16):
        p = sample_patch(item, 48, np.random.default_rng(0))
        out = augment(p, np.random.default_rng(seed), {})
        assert _agreement(out) == 1.0
        for key in ("boundary", "dist", "inst_weight"):
            assert out[key].shape == out["fg"].shape


def test_training_images_are_resampled_by_their_own_resolution(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 5, (30, 50)).astype(np.int32)  # a checkerboard-like label map
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "fg").mkdir()
    rgb = np.zeros((30, 50, 3), np.uint8)
    rgb[..., 0] = lab * 40
    Image.fromarray(rgb).save(tmp_path / "images" / "a.png")
    tifffile.imwrite(tmp_path / "masks" / "a.tif", lab)
    Image.fromarray(rgb).save(tmp_path / "images" / "b.png")  # foreground mask only
    Image.fromarray(((lab > 0) * 255).astype(np.uint8)).save(tmp_path / "fg" / "b.png")
    (tmp_path / "mpp.txt").write_text("0.5\n")
    modes = ("area", "corner", "nearest")
    assert len({_resize(lab, 0.5, m).tobytes() for m in modes}) == 3  # the modes differ here
    for mode in modes:
        items = load_training_images(
            "folder",
            tmp_path,
            mpp=1.0,
            default_mpp=2.0,  # the images' own 0.5 um/px wins
            label_resize=mode,
            foreground_only_masks=tmp_path / "fg",
        )
        a, b = {t.id: t for t in items}["a"], {t.id: t for t in items}["b"]
        assert a.image.shape == (15, 25, 3)
        np.testing.assert_array_equal(a.labels, _resize(lab, 0.5, mode))
        # without a resolution of its own, the mask-only image is at default_mpp
        assert b.labels is None and b.image.shape == (60, 100, 3)
        assert b.foreground.shape == (60, 100)


def test_synthetic_images_paste_each_nucleus_with_its_own_pixels() -> None:
    h, w = 64, 96
    lab = np.zeros((h, w), np.int32)
    lab[4:8, 60:69] = 1  # wide nuclei, kept to the top right
    lab[10:19, 80:84] = 2
    lab[2:6, 75:90] = 3
    img = np.full((h, w, 3), 220, np.uint8)
    img[lab > 0] = 40
    item = TrainImage("src", img, lab, lab > 0)
    for seed in range(8):
        s = synthetic_image([item], np.random.default_rng(seed), size=32, n_nuclei=4)
        assert s.labels is not None and s.labels.max() > 0
        assert s.image[s.labels > 0].max() < 100  # nuclei carry nucleus pixels
        assert s.image[s.labels == 0].min() > 150  # a nucleus-free background
