"""torchvision detectors (Faster R-CNN, FCOS, Mask R-CNN): training, checked loading, registry."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from benchmark.training.data import TrainImage
from nucleus_models.errors import ModelError
from nucleus_models.models.base import TileInstances

ARCHS = ["fasterrcnn", "fcos", "maskrcnn"]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One torch thread: deterministic losses, and the CPU is shared."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _synthetic_image(seed: int, size: int = 96, radius: float = 6.0) -> TrainImage:
    """Hematoxylin disks on eosin with their instance map."""
    from conftest import draw_disks

    rng = np.random.default_rng(seed)
    centres: list[np.ndarray] = []
    while len(centres) < 8:
        p = rng.uniform(radius + 3, size - radius - 3, 2)
        if all(np.hypot(*(p - q)) > 2 * radius + 4 for q in centres):
            centres.append(p)
    img = draw_disks(size, size, np.array(centres), radius)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    lab = np.zeros((size, size), np.int32)
    for k, (cx, cy) in enumerate(centres, start=1):
        lab[(xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2] = k
    return TrainImage(f"synth{seed}", img, lab, lab > 0)


def _images() -> list[TrainImage]:
    imgs = [_synthetic_image(i) for i in range(3)]
    blank = np.full((96, 96, 3), 230, np.uint8)  # foreground-only: must be skipped
    imgs.append(TrainImage("fg-only", blank, None, np.zeros((96, 96), bool)))
    return imgs


def _cfg(arch: str) -> dict:
    return {
        "name": f"{arch}-test",
        "arch": arch,
        "seed": 5,
        "data": {"dataset": "synthetic", "root": "."},
        "model": {"mpp": 0.5, "fpn_channels": 32, "score_threshold": 0.05, "min_area": 4},
        "train": {
            "steps": 8,
            "batch_size": 2,
            "patch_size": 64,
            "lr": 0.001,
            "log_every": 2,
            "checkpoint_every": 4,
            "scale_range": [0.9, 1.1],
        },
        "augment": {"noise": 0.02, "brightness": 0.05},
        "_config_path": "test",
    }


def _check_instances(inst: TileInstances, shape: tuple[int, int], threshold: float) -> None:
    assert inst.labels.shape == shape and inst.labels.dtype == np.int32
    n = int(inst.labels.max(initial=0))
    assert len(inst.scores) == len(inst.classes) == n + 1
    # ids are 1..n, each painted, highest score first
    assert set(np.unique(inst.labels)) - {0} == set(range(1, n + 1))
    assert np.all(inst.scores[1:] >= threshold - 1e-6)
    assert np.all(np.diff(inst.scores[1:]) <= 1e-6)
    assert np.all(inst.classes == 0)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_resume_export_and_registry(arch: str, tmp_path: Path) -> None:
    import torch

    from benchmark.training.detectors import export, train_detector
    from nucleus_models.models import get_model, registry
    from nucleus_models.models.torchvision_detectors import DetectorModel
    from nucleus_models.models.weights import register_shipped

    cfg = _cfg(arch)
    imgs = _images()
    ckpt = train_detector(cfg, imgs, tmp_path / "run", progress=False)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    hist = state["history"]
    assert state["step"] == 8 and state["arch"] == arch and len(hist) == 4
    assert all(np.isfinite(h["loss"]) for h in hist)
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert (tmp_path / "run" / "train.log").read_text().count("step ") == 4
    # resume continues from step 8
    ckpt = train_detector(cfg, imgs, tmp_path / "run", steps=10, resume=True, progress=False)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["step"] == 10
    # each invocation that trained is recorded for the model card
    assert [(s["from_step"], s["to_step"]) for s in state["sessions"]] == [(0, 8), (8, 10)]

    meta = {"command": "test", "steps": 10, "seconds": 1.0, "hardware": "cpu", "parameters": 1}
    pt = export(cfg, ckpt, tmp_path / "weights", meta)
    card = json.loads((tmp_path / "weights" / f"{arch}-test.json").read_text())
    assert card["arch"] == arch and card["spec"]["thresholds"]["fpn_channels"] == 32
    assert {"score_threshold", "nms_iou"} <= set(card["spec"]["thresholds"])
    assert (tmp_path / "weights" / f"{arch}-test.md").is_file()
    name = f"{arch}-test"
    try:
        assert register_shipped(tmp_path / "weights") == [name]
        model = get_model(name, device="cpu")
        assert isinstance(model, DetectorModel) and model.spec.sha256 == card["spec"]["sha256"]
        tile = imgs[0].image
        res = model.predict_batch([tile, tile[:50, :70]], {})
        assert len(res) == 2
        _check_instances(res[0], (96, 96), 0.05)
        _check_instances(res[1], (50, 70), 0.05)
        # a corrupted weights file is refused before torch.load
        pt.write_bytes(pt.read_bytes()[:-10] + b"0123456789")
        with pytest.raises(ModelError, match="sha256 mismatch"):
            get_model(name)
    finally:
        registry._REGISTRY.pop(name, None)


@pytest.mark.parametrize("arch", ARCHS)
def test_untrained_model_predicts_valid_instances(arch: str, tmp_path: Path) -> None:
    import torch

    from nucleus_models.models.base import ModelSpec, sha256_of_file
    from nucleus_models.models.torchvision_detectors import DetectorModel, build_detector

    torch.manual_seed(0)
    net = build_detector(arch, fpn_channels=32)
    # an empty target (patch without nuclei) trains too
    x = [torch.rand(3, 64, 64)]
    y = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    if arch == "maskrcnn":
        y[0]["masks"] = torch.zeros(0, 64, 64, dtype=torch.uint8)
    losses = net(x, y)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()

    pt = tmp_path / "w.pt"
    torch.save(net.state_dict(), pt)
    spec = ModelSpec(
        name=f"{arch}-untrained",
        mpp=0.5,
        sha256=sha256_of_file(pt),
        thresholds={"score_threshold": 0.0, "nms_iou": 0.3, "fpn_channels": 32, "min_area": 1},
    )
    model = DetectorModel(spec, str(pt), arch=arch, device="cpu")
    tile = _synthetic_image(7, size=128).image
    (inst,) = model.predict_batch([tile])
    _check_instances(inst, (128, 128), 0.0)
    assert int(inst.labels.max()) > 0  # random boxes at threshold 0 paint something


def test_targets_and_painting_round_trip() -> None:
    """Boxes (ellipses) and masks from exact targets give back the instances."""
    import torch

    from benchmark.metrics import aggregated_jaccard_index
    from benchmark.training.detectors import instance_targets
    from nucleus_models.models.torchvision_detectors import paint_instances

    lab = _synthetic_image(3, size=128).labels
    t = instance_targets(lab, masks=True)
    n = int(lab.max())
    assert t["boxes"].shape == (n, 4) and t["masks"].shape == (n, 128, 128)
    boxes, scores = t["boxes"].numpy(), np.linspace(0.9, 0.5, n)
    ell = paint_instances(lab.shape, boxes, scores, np.zeros(n, int))
    assert ell.labels.max() == n and aggregated_jaccard_index(lab, ell.labels) > 0.85
    # box-local 28x28 masks as Mask R-CNN predicts them
    from torchvision.ops import roi_align

    rois = torch.cat([torch.arange(n, dtype=torch.float32)[:, None], t["boxes"]], 1)
    local = roi_align(t["masks"][:, None].float(), rois, (28, 28), 1.0, 2, aligned=True)
    msk = paint_instances(lab.shape, boxes, scores, np.zeros(n, int), local[:, 0].numpy())
    assert aggregated_jaccard_index(lab, msk.labels) > 0.9
    assert instance_targets(np.zeros((32, 32), np.int32))["boxes"].shape == (0, 4)


def _perfect_detections(imgs: list[TrainImage]):  # type: ignore[no-untyped-def]
    """A stand-in for the fold network: every nucleus of the held-out image
    found with score 0.9 and its exact box (Faster R-CNN paints the ellipse
    inscribed in it)."""
    from benchmark.training.detectors import instance_targets

    truth = {id(im.image): im.labels for im in imgs}

    def detect(net: object, image: np.ndarray) -> dict[str, np.ndarray]:
        t = instance_targets(truth[id(image)])
        n = len(t["boxes"])
        return {
            "boxes": t["boxes"].numpy(),
            "scores": np.full(n, 0.9, np.float32),
            "labels": np.ones(n, np.float32),
        }

    return detect


def test_detector_cross_validation_scores_held_out_images_and_picks_thresholds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same folds as the U-Net's, scored against the truth: with detections
    that reproduce the truth, the score threshold that keeps them wins and
    scores ~1; one above their scores keeps nothing and scores 0."""
    from benchmark.training import detectors
    from benchmark.training.run import cv_folds

    imgs = [_synthetic_image(i) for i in range(6)]
    monkeypatch.setattr(detectors, "held_out_detections", _perfect_detections(imgs))
    cfg = _cfg("fasterrcnn")
    cfg["data"] = {
        "dataset": "monuseg",
        "root": str(tmp_path),
    }  # no such dataset there: score on the images' labels
    cfg["train"]["steps"] = 2
    cfg["cv"] = {
        "folds": 3,
        "score_thresholds": [0.5, 0.95],
        "nms_ious": [0.3],
        "report_groups": ["set"],
    }
    for i, im in enumerate(imgs):
        im.groups = {"set": "a" if i < 2 else "b"}
    cv = detectors.cross_validate(cfg, imgs, tmp_path / "cv", resume=False)
    assert cv["folds"] == cv_folds(cfg, imgs) and cv["n_images"] == 6
    assert sorted(p.name for p in (tmp_path / "cv").iterdir()) == [
        "cv.json",
        "fold0",
        "fold1",
        "fold2",
    ]
    by_threshold = {row["score_threshold"]: row for row in cv["grid"]}
    assert set(by_threshold) == {0.5, 0.95}
    assert by_threshold[0.95]["aji"] == 0.0 and by_threshold[0.95]["det_f1"] == 0.0
    assert cv["best"]["score_threshold"] == 0.5
    assert cv["metrics_at_best"]["f1_iou50"] == 1.0 and cv["metrics_at_best"]["aji"] > 0.85
    assert {k: g["n"] for k, g in cv["by_group"].items()} == {"set=a": 2, "set=b": 4}
    assert json.loads((tmp_path / "cv" / "cv.json").read_text())["best"] == cv["best"]


def test_detector_folds_train_alone_and_the_export_ships_the_chosen_thresholds(
    tmp_path: Path,
) -> None:
    """``--fold K`` trains fold K only; the full run resumes it, evaluates all
    folds, trains the final model and exports the thresholds the CV chose
    with the CV table in the card."""
    import torch

    from benchmark.training import detectors

    imgs = [_synthetic_image(i) for i in range(3)]
    cfg = _cfg("maskrcnn")
    cfg["data"] = {"dataset": "monuseg", "root": str(tmp_path)}
    cfg["train"]["steps"] = 2
    cfg["cv"] = {"folds": 3, "score_thresholds": [0.05, 0.1], "nms_ious": [0.3, 0.5]}
    cfg["cv"]["mask_thresholds"] = [0.5]
    out = tmp_path / "cv"
    one = detectors.cross_validate(cfg, imgs, out, resume=True, only_fold=2)
    assert one == {"folds": one["folds"], "trained_fold": 2}
    assert sorted(p.name for p in out.iterdir()) == ["fold2"]
    stamp = (out / "fold2" / "checkpoint.pt").stat().st_mtime_ns
    cv = detectors.cross_validate(cfg, imgs, out, resume=True)
    assert (out / "fold2" / "checkpoint.pt").stat().st_mtime_ns == stamp  # not retrained
    assert len(cv["grid"]) == 4 and cv["n_images"] == 3
    for row in cv["grid"]:
        assert 0.0 <= row["aji"] <= 1.0 and 0.0 <= row["det_f1"] <= 1.0

    final = detectors.train_detector(cfg, imgs, tmp_path / "final", progress=False)
    state = torch.load(final, map_location="cpu", weights_only=True)
    meta = {
        "command": "test",
        "steps": 2,
        "seconds": 1.0,
        "cv_seconds": 3.0,
        "hardware": "cpu",
        "parameters": 1,
        "sessions": state["sessions"],
    }
    detectors.export(cfg, final, tmp_path / "weights", meta, cv)
    card = json.loads((tmp_path / "weights" / "maskrcnn-test.json").read_text())
    th = card["spec"]["thresholds"]
    assert {k: th[k] for k in cv["best"]} == cv["best"] and card["cv"]["best"] == cv["best"]
    md = (tmp_path / "weights" / "maskrcnn-test.md").read_text()
    assert "## 3-fold cross-validation (3 held-out images" in md
    assert "were chosen by cross-validation" in md and "not tuned" not in md
    assert f"mask > {th['mask_threshold']}" in md


def test_detector_cross_validation_from_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``nucleus-bench train --cv_only`` cross-validates a detector config (it
    used to be refused); ``--cv_only --export`` is a one-line error."""
    from benchmark.__main__ import main
    from benchmark.training import run

    monkeypatch.setattr(run, "_images", lambda cfg: [_synthetic_image(i) for i in range(3)])
    cfg = tmp_path / "fcos-test.toml"
    cfg.write_text(
        "\n".join(
            [
                'arch = "fcos"',
                "[data]",
                'dataset = "monuseg"',
                f'root = "{tmp_path}"',
                "[model]",
                "mpp = 0.5",
                "fpn_channels = 32",
                "[train]",
                "steps = 2",
                "batch_size = 2",
                "patch_size = 64",
                "[cv]",
                "score_thresholds = [0.05]",
                "nms_ious = [0.3]",
            ]
        )
    )
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(out), "--cv_only"]) == 0
    cv = json.loads((out / "cv" / "cv.json").read_text())
    assert cv["n_images"] == 3 and len(cv["grid"]) == 1
    assert not (out / "final").exists()
    assert main(["train", "--config", str(cfg), "--out", str(out), "--cv_only", "--export"]) == 2

    # scripts/score_fold.py scores a detector's folds as the CV did
    import importlib.util
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "score_fold.py"
    spec = importlib.util.spec_from_file_location("score_fold", script)
    assert spec is not None and spec.loader is not None
    score_fold = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(score_fold)
    import contextlib
    import io

    argv = ["score_fold.py", "--config", str(cfg), "--run", str(out), "--fold", "0", "1", "2"]
    for extra in ([], ["--at_cv_setting"]):
        monkeypatch.setattr(sys, "argv", argv + extra)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert score_fold.main() == 0
        lines = buf.getvalue().splitlines()
        assert json.loads(lines[0])["images"] == 3
        assert json.loads(lines[1])["best"] == cv["best"]
        printed = dict(kv.split("=") for kv in lines[2].split())
        assert float(printed["aji"]) == pytest.approx(cv["metrics_at_best"]["aji"], abs=1e-4)


@pytest.mark.parametrize("arch", ["fasterrcnn", "maskrcnn"])
def test_cross_validation_predicts_as_the_served_model_does(arch: str, tmp_path: Path) -> None:
    """Held-out detections + :func:`detections_to_instances` at a setting give
    the labels the registered model gives with that setting as thresholds."""
    import torch

    from benchmark.training.detectors import held_out_detections
    from nucleus_models.models.base import ModelSpec, sha256_of_file
    from nucleus_models.models.torchvision_detectors import (
        DetectorModel,
        build_detector,
        detections_to_instances,
    )

    torch.manual_seed(1)
    pt = tmp_path / "w.pt"
    torch.save(build_detector(arch, fpn_channels=32).state_dict(), pt)
    setting = {"score_threshold": 0.1, "nms_iou": 0.3, "mask_threshold": 0.5, "min_area": 2}
    spec = ModelSpec(
        name=f"{arch}-cv",
        mpp=0.5,
        sha256=sha256_of_file(pt),
        thresholds=setting | {"fpn_channels": 32},
    )
    model = DetectorModel(spec, str(pt), arch=arch, device="cpu")
    image = _synthetic_image(4, size=128).image
    (served,) = model.predict_batch([image])
    cv_net = build_detector(arch, fpn_channels=32, score_thresh=0.05, nms_iou=0.5)
    cv_net.load_state_dict(torch.load(pt, weights_only=True))
    cv = detections_to_instances(held_out_detections(cv_net, image), image.shape[:2], **setting)
    assert int(served.labels.max()) > 0
    np.testing.assert_array_equal(cv.labels, served.labels)
    np.testing.assert_allclose(cv.scores, served.scores)


def test_a_detector_config_with_stain_normalisation_is_refused(tmp_path: Path) -> None:
    """Served detectors read tiles as they are, so training one on
    Reinhard-normalised images would serve it other inputs: refused."""
    from benchmark.training import detectors

    cfg = _cfg("fcos")
    cfg["data"] = {"dataset": "monuseg", "root": str(tmp_path)}
    cfg["model"]["stain_normalisation"] = "reinhard"
    with pytest.raises(ValueError, match="stain_normalisation is for U-Nets"):
        detectors.train_from_config(cfg, out_dir=tmp_path / "out")


def test_a_detector_config_with_rotation_or_elastic_augmentation_is_refused(
    tmp_path: Path,
) -> None:
    """Detector patches replay sample_patch's plain crop to get their
    instance map, which a warped patch does not have: refused up front."""
    from benchmark.training import detectors

    for aug in ({"rotate": True}, {"elastic": 2.0}):
        cfg = _cfg("fcos")
        cfg["data"] = {"dataset": "monuseg", "root": str(tmp_path)}
        cfg["augment"] = aug
        with pytest.raises(ValueError, match="are for U-Nets"):
            detectors.train_from_config(cfg, out_dir=tmp_path / "out")


def test_an_unknown_arch_is_refused_when_the_config_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A misspelt ``arch`` is one line and exit 2 before any image loads or
    the run folder is made (it used to load every image, make ``OUT/final``
    and only then fail in the detector builder)."""
    from benchmark.__main__ import main
    from benchmark.training import run
    from nucleus_models.models.torchvision_detectors import ARCHS as DETECTORS

    def no_images(cfg: dict) -> list:
        raise AssertionError("images loaded for a config that cannot train")

    monkeypatch.setattr(run, "_images", no_images)
    for arch in ('"fasterrcn"', '"MaskRCNN"', "3"):
        cfg = tmp_path / "bad.toml"
        cfg.write_text(
            f'arch = {arch}\n[data]\ndataset = "monuseg"\nroot = "{tmp_path}"\n'
            "[model]\nmpp = 0.5\n[train]\nsteps = 2\nbatch_size = 2\npatch_size = 64\n"
        )
        out = tmp_path / "run"
        assert main(["train", "--config", str(cfg), "--out", str(out), "--skip_cv"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "arch = " in err[0], err
        assert "fasterrcnn, fcos, maskrcnn" in err[0]
        assert not out.exists()
    assert set(run.ARCHS) == {"unet", *DETECTORS}


def test_resuming_with_fewer_steps_than_trained_is_refused(tmp_path: Path) -> None:
    """``--resume`` with fewer steps than the checkpoint has trained (the
    config's 6 after a ``--steps 9`` run, or a lowered ``cv.steps``) used to
    go on silently, and the card said 6 steps of a 9-step model (the
    cross-validation record, the folds' lowered step count): one line
    naming both counts, nothing written."""
    from benchmark.training.detectors import cross_validate, train_detector

    cfg = _cfg("fcos")
    imgs = _images()
    out = tmp_path / "run"
    ckpt = train_detector(cfg, imgs, out, steps=4, progress=False)
    before, log = ckpt.read_bytes(), (out / "train.log").read_text()
    with pytest.raises(ValueError, match=r"has trained 4 steps, more than the 2 asked for"):
        train_detector(cfg, imgs, out, steps=2, resume=True, progress=False)
    assert ckpt.read_bytes() == before and (out / "train.log").read_text() == log
    # the same checkpoint and step count go on as before (nothing left to train)
    assert train_detector(cfg, imgs, out, steps=4, resume=True, progress=False) == ckpt

    cfg["data"] = {"dataset": "monuseg", "root": str(tmp_path)}
    cfg["cv"] = {"folds": 3, "steps": 4, "score_thresholds": [0.05], "nms_ious": [0.3]}
    cross_validate(cfg, imgs, tmp_path / "cv", resume=False, only_fold=0)
    cfg["cv"]["steps"] = 2
    with pytest.raises(ValueError, match=r"fold0.*has trained 4 steps, more than the 2"):
        cross_validate(cfg, imgs, tmp_path / "cv", resume=True)


@pytest.mark.parametrize("arch", ["unet", "fasterrcnn"])
def test_a_config_without_training_images_makes_no_run_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], arch: str
) -> None:
    """No labelled image under ``data.root``: one line, exit 2, and no run
    folder (it used to be made, empty, before the images were looked for)."""
    from benchmark.__main__ import main

    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "annotations").mkdir()
    shipped = Path(__file__).resolve().parents[1] / "configs" / f"{arch}-monuseg.toml"
    lines = shipped.read_text().splitlines()
    kept = [ln for ln in lines if not ln.startswith(("root =", "foreground_only_masks ="))]
    cfg = tmp_path / "c.toml"
    cfg.write_text("\n".join(kept).replace("[data]", f'[data]\nroot = "{empty}"', 1) + "\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(out), "--skip_cv"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not out.exists()


@pytest.mark.parametrize(
    ("arch", "extra", "says"),
    [
        (
            "fasterrcnn",
            "[train]\ninit_from = 'x.pt'\nprecision = 'bfloat16'",
            "train.init_from, train.precision: for U-Nets",
        ),
        ("maskrcnn", "[model]\nbase = 16", "model.base: for U-Nets"),
        ("fcos", "[cv]\nmin_scores = [0.5]", "cv.min_scores: for U-Nets"),
        ("unet", "[model]\nfpn_channels = 32", "model.fpn_channels: for the detectors"),
        ("unet", "[cv]\nscore_thresholds = [0.5]", "cv.score_thresholds: for the detectors"),
        # the U-Net trainer reads neither: AdamW, unclipped, silently
        ("unet", "[train]\noptimizer = 'sgd'\nclip_grad = 1.0", "train.clip_grad, train.optimizer"),
    ],
)
def test_a_setting_of_the_other_kind_of_model_is_refused(
    tmp_path: Path, arch: str, extra: str, says: str
) -> None:
    """A U-Net's setting in a detector's config (``train.precision =
    "bfloat16"`` trained in float32, silently) or a detector's in a U-Net's:
    one line when the config is read."""
    from benchmark.training.run import load_config

    shipped = Path(__file__).resolve().parents[1] / "configs" / f"{arch}-monuseg.toml"
    text = shipped.read_text()
    table, _, line = extra.partition("\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text(text.replace(table, f"{table}\n{line}", 1))
    with pytest.raises(ValueError, match=says.replace(".", r"\.")):
        load_config(cfg)
    load_config(shipped)  # the shipped config itself is fine


def test_score_fold_help_says_what_it_does_and_each_option() -> None:
    """``scripts/score_fold.py --help`` (the README's command for scoring
    folds) cut its description mid-sentence ("... on their own held-out")
    and left --config, --run, --fold and --at_cv_setting unexplained."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "score_fold.py"
    res = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())
    assert "on their own held-out images" in text, text
    for words in ("the config the run was trained with", "run folder", "0-based", "cv/cv.json"):
        assert words in text, (words, text)
