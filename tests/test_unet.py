"""The learned U-Net: training smoke test, checked weight loading, registration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nucleus_models.errors import ModelError


def _tiny_images(shared_data: Path) -> list:
    from benchmark.training.data import load_training_images

    ds_root = shared_data / "dsb2018_bbbc038"
    from benchmark.datasets import get_dataset

    ids = get_dataset("bbbc038", ds_root).ids()[:3]
    imgs = load_training_images("bbbc038", ds_root, mpp=0.5, ids=ids)
    for im in imgs:  # tiny crops keep the test fast
        im.image, im.labels, im.foreground = (
            im.image[:96, :96],
            im.labels[:96, :96],
            im.foreground[:96, :96],
        )
    return imgs


def _cfg() -> dict:
    return {
        "name": "unet-test",
        "seed": 3,
        "data": {"dataset": "bbbc038", "root": "."},
        "model": {
            "mpp": 0.5,
            "modality": "fluorescence",
            "normalisation": "percentile",
            "base": 8,
            "depth": 3,
        },
        "train": {
            "steps": 30,
            "batch_size": 4,
            "patch_size": 64,
            "lr": 0.01,
            "checkpoint_every": 10,
        },
        "augment": {"noise": 0.02},
        "cv": {"fg_thresholds": [0.5], "seed_thresholds": [0.5]},
        "_config_path": "test",
    }


def test_training_lowers_the_loss_and_checkpoints_are_loadable(
    shared_data: Path, tmp_path: Path
) -> None:
    import torch

    from benchmark.training.run import export
    from benchmark.training.unet import train_unet
    from nucleus_models.models import get_model, registry
    from nucleus_models.models.weights import register_shipped

    imgs = _tiny_images(shared_data)
    ckpt = train_unet(_cfg(), imgs, tmp_path / "run", progress=False)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    hist = state["history"]
    assert state["step"] == 30 and len(hist) >= 2
    assert hist[-1]["loss"] < hist[0]["loss"]
    # resume: continuing to 40 steps starts from step 30
    ckpt = train_unet(_cfg(), imgs, tmp_path / "run", steps=40, resume=True, progress=False)
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["step"] == 40
    # export + register + build + predict
    meta = {"command": "test", "steps": 40, "seconds": 1.0, "hardware": "cpu", "parameters": 1}
    pt = export(_cfg(), ckpt, None, tmp_path / "weights", meta, imgs)
    card = json.loads((tmp_path / "weights" / "unet-test.json").read_text())
    assert card["spec"]["sha256"] and card["arch"] == "unet"
    # the export calibrates the int8 network on the training images
    assert card["int8"]["images"] == len(imgs) and "cpu_int8" not in card["spec"]["thresholds"]
    try:
        assert register_shipped(tmp_path / "weights") == ["unet-test"]
        for precision in ("float32", "int8"):
            model = get_model("unet-test", device="cpu", precision=precision)
            assert model.precision == precision
            res = model.predict_batch([imgs[0].image, imgs[1].image[:50, :70]], {})
            assert len(res) == 2 and res[1].labels.shape == (50, 70)
            assert res[0].labels.dtype == np.int32
            assert len(res[0].scores) == res[0].labels.max() + 1
        # a corrupted weights file is refused before torch.load
        pt.write_bytes(pt.read_bytes()[:-10] + b"0123456789")
        with pytest.raises(ModelError, match="sha256 mismatch"):
            get_model("unet-test")
    finally:
        registry._REGISTRY.pop("unet-test", None)


def test_a_config_can_set_each_levels_channels_and_serving_builds_the_same_net(
    shared_data: Path, tmp_path: Path
) -> None:
    """``model.channels`` (one count per level, finest first) trains, exports
    into the spec and is served with the same shape; a bad list is a one-line
    ValueError."""
    from benchmark.training.run import export
    from benchmark.training.unet import train_unet, unet_arch
    from nucleus_models.models import get_model, registry
    from nucleus_models.models.weights import register_shipped

    cfg = _cfg()
    cfg["name"] = "unet-chans"
    cfg["model"]["channels"] = [4, 8, 12]
    cfg["train"]["steps"] = 10
    imgs = _tiny_images(shared_data)
    ckpt = train_unet(cfg, imgs, tmp_path / "run", progress=False)
    meta = {"command": "test", "steps": 10, "seconds": 1.0, "hardware": "cpu", "parameters": 1}
    export(cfg, ckpt, None, tmp_path / "weights", meta)
    spec = json.loads((tmp_path / "weights" / "unet-chans.json").read_text())["spec"]
    assert spec["thresholds"]["channels"] == [4, 8, 12] and spec["thresholds"]["depth"] == 3
    try:
        assert register_shipped(tmp_path / "weights") == ["unet-chans"]
        model = get_model("unet-chans", device="cpu")
        widths = [b[0].out_channels for b in model.net.down]
        assert widths == [4, 8, 12] and model.net.stride == 4
        res = model.predict_batch([imgs[0].image], {})
        assert res[0].labels.shape == imgs[0].image.shape[:2]
    finally:
        registry._REGISTRY.pop("unet-chans", None)
    for bad in ([8], [8, 0], "8,16", [8, 16.5], [True, 8]):
        with pytest.raises(ValueError, match="U-Net channels must be a list") as e:
            unet_arch({"channels": bad})
        assert "\n" not in str(e.value)
    # a spec with a bad list is a model error naming the model (one CLI line)
    from nucleus_models.models.base import ModelSpec
    from nucleus_models.models.unet import UNetModel

    w = tmp_path / "weights" / "unet-chans.pt"
    bad_spec = ModelSpec(name="unet-bad", mpp=0.5, sha256="0", thresholds={"channels": [8]})
    with pytest.raises(ModelError, match="model unet-bad: U-Net channels must be a list"):
        UNetModel(bad_spec, str(w), device="cpu")


def test_bfloat16_training_lowers_the_loss_and_bad_precisions_are_refused(
    shared_data: Path, tmp_path: Path
) -> None:
    import torch

    from benchmark.training.run import _load_net
    from benchmark.training.unet import train_unet

    imgs = _tiny_images(shared_data)
    cfg = _cfg()
    cfg["train"]["precision"] = "bfloat16"
    ckpt = train_unet(cfg, imgs, tmp_path / "bf16", progress=False)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    hist = state["history"]
    assert state["step"] == 30 and hist[-1]["loss"] < hist[0]["loss"]
    # float32 weights, loadable into a plain network
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())
    net = _load_net(ckpt, cfg)
    with torch.inference_mode():
        out = net(torch.rand(1, 3, 64, 64))
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
    cfg["train"]["precision"] = "float16"
    with pytest.raises(ValueError, match="train.precision must be float32 or bfloat16"):
        train_unet(cfg, imgs, tmp_path / "fp16", progress=False)


def test_weight_averaging_is_checkpointed_resumed_and_shipped(
    shared_data: Path, tmp_path: Path
) -> None:
    import torch

    from benchmark.training.run import _load_net, export
    from benchmark.training.unet import train_unet

    imgs = _tiny_images(shared_data)
    cfg = _cfg()
    cfg["train"]["ema"] = 0.9
    ckpt = train_unet(cfg, imgs, tmp_path / "run", steps=20, progress=False)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["ema_n"] == 20 and state["ema_decay"] == 0.9
    raw, avg = state["model"], state["ema_model"]
    assert raw.keys() == avg.keys()
    # the average trails the trained weights
    assert any(not torch.equal(raw[k], avg[k]) for k in raw if raw[k].is_floating_point())
    # resuming continues the average (it is not restarted from the weights)
    ckpt = train_unet(cfg, imgs, tmp_path / "run", steps=25, resume=True, progress=False)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["ema_n"] == 25
    # evaluation and export use the average
    net = _load_net(ckpt, cfg)
    for k, v in net.state_dict().items():
        assert torch.equal(v, state["ema_model"][k]), k
    meta = {"command": "test", "steps": 25, "seconds": 1.0, "hardware": "cpu", "parameters": 1}
    pt = export(cfg, ckpt, None, tmp_path / "weights", meta)
    shipped = torch.load(pt, map_location="cpu", weights_only=True)
    assert all(torch.equal(shipped[k], state["ema_model"][k]) for k in shipped)
    assert (
        "moving average of the trained ones (decay 0.9)"
        in (tmp_path / "weights" / "unet-test.md").read_text()
    )


def test_cross_validation_reports_the_chosen_setting_per_group(
    shared_data: Path, tmp_path: Path
) -> None:
    from benchmark.training.run import cross_validate

    imgs = _tiny_images(shared_data)
    cfg = _cfg()
    cfg["train"]["steps"] = 10
    cfg["cv"] = {"folds": 3, "fg_thresholds": [0.5], "seed_thresholds": [0.3, 0.5]}
    cfg["cv"]["report_groups"] = ["modality"]
    cv = cross_validate(cfg, imgs, tmp_path / "cv", resume=False)
    assert cv["n_images"] == 3 and len(cv["grid"]) == 2
    groups = cv["by_group"]
    assert sum(g["n"] for g in groups.values()) == 3
    assert set(groups) == {f"modality={im.groups['modality']}" for im in imgs}
    overall = sum(g["n"] * g["aji"] for g in groups.values()) / 3
    assert overall == pytest.approx(cv["metrics_at_best"]["aji"])


def test_folds_train_one_at_a_time_and_resume_evaluates_them(
    shared_data: Path, tmp_path: Path
) -> None:
    """``--fold K`` trains only fold K (no evaluation); a resumed full run keeps it."""
    from benchmark.training.run import cross_validate

    imgs = _tiny_images(shared_data)
    cfg = _cfg()
    cfg["train"]["steps"] = 10
    cfg["cv"] = {"folds": 3, "fg_thresholds": [0.5], "seed_thresholds": [0.5]}
    out = tmp_path / "cv"
    one = cross_validate(cfg, imgs, out, resume=True, only_fold=1)
    assert one["trained_fold"] == 1 and "best" not in one
    assert sorted(p.name for p in out.iterdir()) == ["fold1"]
    stamp = (out / "fold1" / "checkpoint.pt").stat().st_mtime_ns
    cv = cross_validate(cfg, imgs, out, resume=True)
    assert cv["n_images"] == 3 and (out / "cv.json").is_file()
    assert (out / "fold1" / "checkpoint.pt").stat().st_mtime_ns == stamp  # not retrained
    with pytest.raises(ValueError, match="folds 0..2"):
        cross_validate(cfg, imgs, out, resume=True, only_fold=3)


def test_train_option_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from benchmark.__main__ import main

    cfg = Path(__file__).resolve().parents[1] / "configs" / "unet-monuseg.toml"
    out = str(tmp_path / "run")
    assert main(["train", "--config", str(cfg), "--out", out, "--fold", "0", "--export"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --fold trains one cross-validation fold: no --skip_cv or --export"


def test_cross_validation_of_a_size_normalised_model_searches_the_scale_twice(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """First with the foreground map, then on the final instances of the
    setting that pass chose (as inference measures), and the setting is re-tuned."""
    from benchmark.training import run

    calls: list = []
    original = run.held_out_maps

    def spy(net, image, cfg, params=None):  # type: ignore[no-untyped-def]
        calls.append(params)
        return original(net, image, cfg, params)

    monkeypatch.setattr(run, "held_out_maps", spy)
    imgs = _tiny_images(shared_data)
    cfg = _cfg()
    cfg["data"]["rescale_to_diameter"] = 16.0
    cfg["train"]["steps"] = 10
    cfg["cv"] = {"folds": 3, "fg_thresholds": [0.5], "seed_thresholds": [0.3, 0.5]}
    cv = run.cross_validate(cfg, imgs, tmp_path / "cv", resume=False)
    assert calls[:3] == [None] * 3
    passes = cv["size_passes"]
    assert 2 <= passes <= 1 + run.MAX_SIZE_PASSES and len(calls) == 3 * passes
    assert all(c is not None and c["fg_threshold"] == 0.5 for c in calls[3:])
    assert cv["size_measured_on"] == "final instances of the chosen setting"
    # the sizes of the reported numbers were measured with the reported setting
    assert calls[-1] == cv["best"]
    assert cv["best"] in [{k: v for k, v in r.items() if k in cv["best"]} for r in cv["grid"]]


def test_size_search_stops_at_the_setting_it_was_measured_with() -> None:
    """Scale search and tuning alternate until the setting chosen is the one the
    sizes were measured with; without such a fixed point the last measured
    setting is reported with its own scores."""
    from benchmark.training.run import settle_size_setting

    a, b, c = {"fg_threshold": 0.5}, {"fg_threshold": 0.6}, {"fg_threshold": 0.7}
    measured: list = []

    def remeasure_with(choose):  # type: ignore[no-untyped-def]
        def remeasure(setting):  # type: ignore[no-untyped-def]
            measured.append(setting)
            winner = choose(setting)
            return [setting], [
                (p, {"aji": 0.9 if p == winner else 0.1 * i}) for i, p in enumerate((a, b, c))
            ]

        return remeasure

    # measured with a, b wins; measured with b, b wins: settled in 3 passes
    out = settle_size_setting(a, remeasure_with(lambda s: b), "aji", max_passes=3)
    assert measured == [a, b] and out[2:] == (b, {"aji": 0.9}, 3) and out[0] == [b]
    # already settled: one more pass
    measured.clear()
    assert settle_size_setting(b, remeasure_with(lambda s: b), "aji")[2:] == (b, {"aji": 0.9}, 2)
    # a -> b -> a -> ...: no fixed point; the last measured setting with its own score
    measured.clear()
    flip = remeasure_with(lambda s: b if s == a else a)
    maps, _, setting, metrics, passes = settle_size_setting(a, flip, "aji", max_passes=3)
    assert measured == [a, b, a] and passes == 4
    assert setting == a and maps == [a] and metrics == {"aji": 0.0}
    # no fixed point, and the grid on the last maps no longer holds the setting
    # kept (its filters were searched around other seeds): scored on those maps
    d = {"fg_threshold": 0.5, "min_area": 48}
    grids = {
        str(d): [(b, {"aji": 0.9}), (c, {"aji": 0.1})],
        str(b): [(c, {"aji": 0.9}), (d, {"aji": 0.1})],
    }

    def drift(setting):  # type: ignore[no-untyped-def]
        return [setting], grids[str(setting)]

    scored: list = []

    def score(maps, setting):  # type: ignore[no-untyped-def]
        scored.append((maps, setting))
        return {"aji": 0.42}

    out = settle_size_setting(d, drift, "aji", max_passes=2, score=score)
    assert out[2:] == (b, {"aji": 0.42}, 3) and scored == [([b], b)]
    with pytest.raises(ValueError, match="pass score"):
        settle_size_setting(d, drift, "aji", max_passes=2)


def test_cross_validation_can_choose_the_setting_on_one_group(
    shared_data: Path, tmp_path: Path
) -> None:
    """cv.tune_on: the setting is the best on that group's held-out images;
    the headline metrics are still those of every held-out image."""
    from benchmark.training.run import cross_validate

    imgs = _tiny_images(shared_data)
    for im, part in zip(imgs, "abb", strict=True):
        im.groups["part"] = part
    cfg = _cfg()
    cfg["train"]["steps"] = 10
    cfg["cv"] = {
        "folds": 3,
        "metric": "aji",
        "fg_thresholds": [0.3, 0.5, 0.7],
        "seed_thresholds": [0.1, 0.3, 0.5],
        "report_groups": ["part"],
        "tune_on": "part=a",
    }
    cv = cross_validate(cfg, imgs, tmp_path / "cv", resume=False)
    assert cv["tuned_on"] == "part=a" and len(cv["grid"]) == 9
    g = cv["by_group"]
    assert g["part=a"]["n"] == 1 and g["part=b"]["n"] == 2
    # the grid scores the tuned group only, and the chosen setting is its best
    assert max(r["aji"] for r in cv["grid"]) == pytest.approx(g["part=a"]["aji"])
    overall = (g["part=a"]["aji"] + 2 * g["part=b"]["aji"]) / 3
    assert cv["metrics_at_best"]["aji"] == pytest.approx(overall)
    # a group no image is in: refused before any fold trains (it was refused
    # once every fold had, hours into a real run)
    cfg["cv"]["tune_on"] = "part=c"
    with pytest.raises(ValueError, match=r"no cross-validated image .*theirs: .*part=a, part=b"):
        cross_validate(cfg, imgs, tmp_path / "cv2", resume=False)
    assert not (tmp_path / "cv2").exists()
    # a misspelt group key: no group reported, silently, once every fold had trained
    cfg["cv"]["tune_on"] = "part=a"
    cfg["cv"]["report_groups"] = ["prat"]
    with pytest.raises(ValueError, match=r"report_groups: .*'prat'; theirs: .*part"):
        cross_validate(cfg, imgs, tmp_path / "cv3", resume=False)
    assert not (tmp_path / "cv3").exists()


def test_wrong_sha256_is_rejected(tmp_path: Path) -> None:
    import torch

    from nucleus_models.models.weights import load_state_dict

    p = tmp_path / "w.pt"
    torch.save({"a": torch.zeros(3)}, p)
    with pytest.raises(ModelError, match="sha256 mismatch"):
        load_state_dict(p, "0" * 64)
    with pytest.raises(ModelError, match="not found"):
        load_state_dict(tmp_path / "missing.pt", "0" * 64)
    from nucleus_models.models.base import sha256_of_file

    assert float(load_state_dict(p, sha256_of_file(p))["a"].sum()) == 0.0


def test_targets_and_watershed_roundtrip() -> None:
    """Perfect maps from a label image give back the same instances."""
    from benchmark.training.data import make_targets
    from nucleus_models.models.unet import instances_from_maps

    lab = np.zeros((60, 60), np.int32)
    yy, xx = np.mgrid[0:60, 0:60]
    for k, (cy, cx, r) in enumerate([(15, 15, 8), (15, 30, 7), (40, 40, 10)], start=1):
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
    fg, bd, dist = make_targets(lab)
    inst = instances_from_maps(fg, bd, dist, fg_threshold=0.5, seed_threshold=0.5)
    assert inst.labels.max() == 3  # the two touching disks stay apart
    from benchmark.metrics import aggregated_jaccard_index

    assert aggregated_jaccard_index(lab, inst.labels) > 0.95


def test_a_settings_instances_of_a_batch_are_cropped_to_each_tiles_shape() -> None:
    """A slide's last column and row of tiles are narrower or shorter than the
    batch the network ran on: each tile's maps are cropped to its own
    (height, width) before the watershed, so its nuclei stay where they are."""
    from benchmark.training.data import make_targets
    from nucleus_models.models.unet import WatershedSetting

    lab = np.zeros((40, 64), np.int32)
    yy, xx = np.mgrid[0:40, 0:64]
    lab[(yy - 10) ** 2 + (xx - 40) ** 2 <= 36] = 1  # inside a 20 x 48 tile
    raw = np.zeros((2, 3, 40, 64), np.float32)
    raw[:] = np.stack(make_targets(lab))
    wide, tall = WatershedSetting()(raw, [(20, 48), (40, 24)])
    assert wide.labels.shape == (20, 48) and tall.labels.shape == (40, 24)
    assert np.array_equal(wide.labels > 0, lab[:20, :48] > 0)
    assert tall.labels.max() == 0


def _three_disks(scale: int = 1) -> np.ndarray:
    n = 60 * scale
    lab = np.zeros((n, n), np.int32)
    yy, xx = np.mgrid[0:n, 0:n]
    for k, (cy, cx, r) in enumerate([(15, 15, 8), (15, 30, 7), (40, 40, 10)], start=1):
        lab[(yy - cy * scale) ** 2 + (xx - cx * scale) ** 2 <= (r * scale) ** 2] = k
    return lab


def test_thin_boundary_target_and_hmax_seeds() -> None:
    """The thin boundary is 1 px (a strict subset of the thick one); h-maxima
    seeding also keeps touching nuclei apart from perfect maps."""
    from benchmark.metrics import aggregated_jaccard_index
    from benchmark.training.data import make_targets
    from nucleus_models.models.unet import instances_from_maps

    lab = _three_disks()
    _, thick, _ = make_targets(lab)
    fg, thin, dist = make_targets(lab, boundary="thin")
    assert thin.sum() < thick.sum() and np.all(thick[thin > 0] > 0)
    assert thin[15, 15] == 0 and thin[15, 15 - 8] == 1  # centre vs edge of disk 1
    for bd in (thin, np.zeros_like(thin)):
        inst = instances_from_maps(fg, bd, dist, seed_mode="hmax", h=0.1, smooth=1.0)
        assert inst.labels.max() == 3
        assert aggregated_jaccard_index(lab, inst.labels) > 0.95
    with pytest.raises(ValueError, match="seed_mode"):
        instances_from_maps(fg, thin, dist, seed_mode="peaks")
    with pytest.raises(ValueError, match="boundary"):
        make_targets(lab, boundary="wide")


def test_threshold_tuning_scores_at_the_truths_resolution() -> None:
    """Maps at the model grid, truths at twice that grid: the labels are resized
    to the truths (as segment_image does), so perfect maps score ~1; every grid
    setting is reported with its parameters."""
    from benchmark.training.data import make_targets
    from benchmark.training.unet import tune_thresholds

    maps = [np.stack(make_targets(_three_disks(1), boundary="thin"))]
    truths = [_three_disks(2)]
    cfg = {
        "model": {"min_area": 4},
        "cv": {
            "fg_thresholds": [0.5],
            "seed_thresholds": [0.3, 1.5],
            "hmax_h": [0.1],
            "hmax_smooth": [1.0],
        },
    }
    grid = tune_thresholds(maps, truths, cfg)
    modes = [p["seed_mode"] for p, _ in grid]
    assert modes == ["threshold", "threshold", "hmax"]
    best, metrics = max(grid, key=lambda pm: pm[1]["aji"])
    assert metrics["aji"] > 0.9 and metrics["f1_iou50"] == 1.0
    # a seed threshold above every peak finds no seed: all foreground blobs
    # still come back (as seedless instances) but the touching pair merges
    assert grid[1][1]["f1_iou50"] < 1.0


def test_filters_drop_small_and_faint_instances_and_are_tuned_after_the_seeds() -> None:
    from benchmark.training.data import make_targets
    from benchmark.training.unet import cv_score, tune_thresholds
    from nucleus_models.models.unet import instances_from_maps

    truth = _three_disks(1)
    fg, bd, dist = make_targets(truth, boundary="thin")
    # two spurious blobs: a faint big one (mean fg 0.55) and a small confident one
    fg[2:14, 40:52], dist[2:14, 40:52] = 0.55, 0.5
    fg[50:53, 4:7], dist[50:53, 4:7] = 1.0, 0.5
    n_all = instances_from_maps(fg, bd, dist, seed_threshold=0.3, min_area=4).labels.max()
    faint = instances_from_maps(fg, bd, dist, seed_threshold=0.3, min_area=4, min_score=0.6)
    small = instances_from_maps(fg, bd, dist, seed_threshold=0.3, min_area=12)
    assert (n_all, faint.labels.max(), small.labels.max()) == (5, 4, 4)
    # min_area is the least area kept: the 3 x 3 blob stays at 9, goes at 10
    for least, n in ((9, 5), (10, 4)):
        kept = instances_from_maps(fg, bd, dist, seed_threshold=0.3, min_area=least)
        assert kept.labels.max() == n, least
    assert faint.scores[1:].min() >= 0.6
    cfg = {
        "model": {"min_area": 4},
        "cv": {
            "fg_thresholds": [0.5],
            "seed_thresholds": [0.3],
            "min_areas": [4, 12],
            "min_scores": [0.0, 0.6],
            "metric": ["aji", "f1_iou50"],
        },
    }
    grid = tune_thresholds([np.stack([fg, bd, dist])], [truth], cfg)
    assert len(grid) == 4  # the seed setting, then 3 new filter settings on top of it
    best, metrics = max(grid, key=lambda pm: cv_score(pm[1], cfg["cv"]["metric"]))
    assert best["min_area"] == 12 and best["min_score"] == 0.6
    assert metrics["f1_iou50"] == 1.0 and grid[0][1]["f1_iou50"] < 1.0


def test_unknown_seed_mode_in_a_model_spec_is_a_model_error(tmp_path: Path) -> None:
    import torch

    from nucleus_models.models.base import ModelSpec, sha256_of_file
    from nucleus_models.models.unet import UNetModel, build_unet

    p = tmp_path / "w.pt"
    torch.save(build_unet(base=8, depth=3).state_dict(), p)
    spec = ModelSpec(
        name="unet-x",
        mpp=0.5,
        sha256=sha256_of_file(p),
        thresholds={"base": 8, "depth": 3, "seed_mode": "peaks"},
    )
    with pytest.raises(ModelError, match="seed_mode"):
        UNetModel(spec, str(p), device="cpu")


def test_a_served_model_prepares_its_input_as_its_spec_says(tmp_path: Path) -> None:
    """The exported spec names the network's input normalisation and serving
    uses it (before, serving took the modality's default whatever the model
    was trained on); an unknown one is a model error."""
    import torch

    from benchmark.training.data import input_normalisation
    from nucleus_models.models.base import ModelSpec, sha256_of_file
    from nucleus_models.models.unet import UNetModel, build_unet, normalise_tile

    p = tmp_path / "w.pt"
    torch.save(build_unet(base=8, depth=3).state_dict(), p)

    def served(modality: str, **thresholds: object) -> UNetModel:
        spec = ModelSpec(
            name="unet-x",
            mpp=0.5,
            modality=modality,
            sha256=sha256_of_file(p),
            thresholds={"base": 8, "depth": 3, **thresholds},
        )
        return UNetModel(spec, str(p), device="cpu")

    assert served("brightfield").norm == "rgb"
    assert served("fluorescence").norm == "percentile"
    od_model = served("brightfield", normalisation="od")
    tile = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    batch = od_model.preprocess([tile], {}).numpy()[0]
    assert np.allclose(batch, normalise_tile(tile, "od"))
    assert not np.allclose(batch, normalise_tile(tile, "rgb"))
    with pytest.raises(ModelError, match="normalisation must be one of rgb, percentile, od"):
        served("brightfield", normalisation="zscore")
    # training's default is serving's
    assert input_normalisation({"model": {"modality": "fluorescence"}}) == "percentile"
    with pytest.raises(ValueError, match="model.normalisation"):
        input_normalisation({"model": {"normalisation": "zscore"}})
    # optical density: white is -0.5, darker is higher, every channel alike
    tile = np.full((4, 4, 3), 255, np.uint8)
    tile[1, 1] = (30, 120, 200)
    od = normalise_tile(tile, "od")
    assert od.shape == (3, 4, 4) and np.allclose(od[:, 0, 0], -0.5)
    assert od[0, 1, 1] > od[1, 1, 1] > od[2, 1, 1] > -0.5


def test_a_reinhard_model_maps_every_tile_of_a_slide_with_the_slides_statistics(
    tmp_path: Path, shared_data: Path
) -> None:
    """``stain_normalisation = "reinhard"``: training maps each image with its
    own tissue statistics, a served model takes the slide's from ``prepare``
    and maps every tile with them, so a tile is fed to the network as it was
    trained; an unknown mode is a one-line error in training and serving."""
    import torch
    from skimage.io import imread

    from benchmark.training.data import TrainImage, stain_normalisation_of, stain_normalise_images
    from nucleus_models.models.base import ModelSpec, sha256_of_file
    from nucleus_models.models.unet import UNetModel, build_unet, normalise_tile
    from nucleus_models.stain import REFERENCE_MU_LAB, reinhard_stats
    from nucleus_models.wsi.tissue import tissue_mask

    rgb = imread(sorted((shared_data / "monuseg2018/train/images").glob("*.tif"))[0])[
        :400, :400, :3
    ]
    pale = np.clip(rgb.astype(np.int32) + 40, 0, 255).astype(np.uint8)
    # the training side: two stainings of one field come out alike, and near the reference
    a, b = stain_normalise_images(
        [
            TrainImage(id=i, image=x, labels=None, foreground=np.zeros(x.shape[:2], bool))
            for i, x in (("a", rgb), ("b", pale))
        ],
        "brightfield",
    )
    assert np.abs(rgb.astype(int) - pale).mean() > 30
    assert np.abs(a.image.astype(int) - b.image).mean() < 8
    mu = reinhard_stats(a.image, tissue_mask(a.image))["src_mu_lab"]
    assert np.allclose(mu, REFERENCE_MU_LAB, atol=0.05)

    p = tmp_path / "w.pt"
    torch.save(build_unet(base=8, depth=3).state_dict(), p)

    def served(mode: str) -> UNetModel:
        spec = ModelSpec(
            name="unet-x",
            mpp=0.5,
            sha256=sha256_of_file(p),
            thresholds={"base": 8, "depth": 3, "stain_normalisation": mode},
        )
        return UNetModel(spec, str(p), device="cpu")

    model = served("reinhard")
    context = model.prepare(pale, tissue_mask(pale))
    tile = pale[:128, :128]
    batch = model.preprocess([tile], context).numpy()[0]
    assert np.allclose(batch, normalise_tile(b.image[:128, :128], "rgb"))
    # a tile on its own takes its own statistics; the plain model leaves it alone
    assert not np.allclose(model.preprocess([tile], {}).numpy()[0], batch)
    assert served("none").prepare(pale, tissue_mask(pale)) == {}
    assert np.allclose(
        served("none").preprocess([tile], {}).numpy()[0], normalise_tile(tile, "rgb")
    )
    with pytest.raises(ModelError, match="stain_normalisation must be one of none, reinhard"):
        served("macenko")
    assert stain_normalisation_of({}) == "none"
    with pytest.raises(ValueError, match="model.stain_normalisation"):
        stain_normalisation_of({"model": {"stain_normalisation": "macenko"}})


def test_size_normalisation_and_synthetic_images() -> None:
    from benchmark.training.data import (
        TrainImage,
        median_nucleus_diameter,
        rescale_to_diameter,
        synthetic_image,
    )
    from nucleus_models.models.unet import mask_diameter

    lab = np.zeros((80, 80), np.int32)
    for k, (y, x) in enumerate([(10, 10), (10, 50), (50, 30)], start=1):
        lab[y : y + 20, x : x + 20] = k  # 20x20 squares: diameter 22.57 px
    img = np.full((80, 80, 3), 30, np.uint8)
    img[lab > 0] = 200
    item = TrainImage("a", img, lab, lab > 0)
    assert median_nucleus_diameter(lab) == pytest.approx(2 * np.sqrt(400 / np.pi))
    # sizes are measured as inference measures them (inscribed circle of the mask)
    assert mask_diameter(lab > 0) == pytest.approx(20.0, abs=1.0)
    (small,) = rescale_to_diameter([item], 10.0)
    assert small.image.shape[:2] == (40, 40)
    assert mask_diameter(small.labels > 0) == pytest.approx(10.0, abs=1.0)
    assert median_nucleus_diameter(small.labels) == pytest.approx(11.28, rel=0.1)
    syn = synthetic_image([item], np.random.default_rng(0), size=96, n_nuclei=5, max_overlap=0.0)
    assert syn.labels.max() >= 3
    assert (syn.image[syn.labels > 0] == 200).all()  # nuclei pasted with their pixels
    counts = np.bincount(syn.labels.ravel())[1:]
    assert (counts == 400).all()  # no overlap allowed: every nucleus whole
    # the 80 px image has no nucleus-free 96 px window: median colour + noise
    assert abs(float(np.median(syn.image[syn.labels == 0])) - 30) <= 2


def test_synthetic_images_take_a_real_background_and_one_modality() -> None:
    """Background: a nucleus-free window of a real image; nuclei: only from
    images of the background's modality (Kromp et al. 2020)."""
    from benchmark.training.data import TrainImage, synthetic_image

    def item(name: str, modality: str, bg: int, fg: int) -> TrainImage:
        lab = np.zeros((200, 200), np.int32)
        lab[10:30, 10:30], lab[10:30, 160:180] = 1, 2  # a free 120 px band below
        rng = np.random.default_rng(len(name))
        img = rng.integers(bg, bg + 20, (200, 200, 3)).astype(np.uint8)  # textured
        img[lab > 0] = fg
        return TrainImage(name, img, lab, lab > 0, {"modality": modality})

    fluo, bright = item("f", "fluorescence", 0, 250), item("b", "brightfield", 200, 60)
    rng = np.random.default_rng(1)
    for _ in range(6):
        syn = synthetic_image([fluo, bright], rng, size=96, n_nuclei=4, max_overlap=0.0)
        modality = syn.groups["modality"]
        assert syn.groups["synthetic"] == "1"
        bg, fg = (0, 250) if modality == "fluorescence" else (200, 60)
        nuclei = syn.image[syn.labels > 0]
        assert syn.labels.max() >= 1 and (nuclei == fg).all()  # one modality's nuclei
        back = syn.image[syn.labels == 0].astype(int)
        assert back.min() >= bg and back.max() < bg + 20  # the real texture, not noise
    assert {
        synthetic_image([fluo, bright], np.random.default_rng(s), size=96).groups["modality"]
        for s in range(8)
    } == {"fluorescence", "brightfield"}


def test_percentile_normalisation_treats_single_channel_fluorescence_as_grey() -> None:
    """A DAPI-only (blue) tile gives the same network input as the grey image."""
    from nucleus_models.models.unet import normalise_tile

    rng = np.random.default_rng(0)
    blue = np.zeros((40, 40, 3), np.uint8)
    blue[..., 2] = rng.integers(0, 200, (40, 40))
    blue[..., 0] = rng.integers(0, 3, (40, 40))  # sensor noise in an empty channel
    grey = np.repeat(blue[..., 2:3], 3, axis=2)
    np.testing.assert_allclose(
        normalise_tile(blue, "percentile"), normalise_tile(grey, "percentile")
    )
    rgb = normalise_tile(grey, "rgb")
    assert rgb.shape == (3, 40, 40) and rgb.min() >= -0.5 and rgb.max() <= 0.5


def test_whole_image_maps_pad_to_the_network_depth() -> None:
    from benchmark.training.unet import predict_maps
    from nucleus_models.models.unet import build_unet

    img = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    for depth in (3, 5):  # strides 4 and 16: 50 x 70 pads to 52 x 72 and 64 x 80
        net = build_unet(base=4, depth=depth)
        assert predict_maps(net, img, normalisation="rgb").shape == (3, 50, 70)


def test_inference_fusion_keeps_the_outputs() -> None:
    """Conv+BN folding and channels-last memory change speed, not results."""
    import copy

    import torch

    from nucleus_models.models.unet import build_unet, fuse_for_inference

    torch.manual_seed(0)
    net = build_unet(base=8, depth=3)
    with torch.no_grad():  # non-trivial BN statistics
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    net.eval()
    fused = fuse_for_inference(copy.deepcopy(net)).to(memory_format=torch.channels_last)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(2, 3, 64, 48)
    with torch.inference_mode():
        torch.testing.assert_close(
            fused(x.to(memory_format=torch.channels_last)), net(x), atol=1e-4, rtol=1e-4
        )


def test_pseudo_instances_from_a_foreground_mask_match_the_outlines(shared_data: Path) -> None:
    """Splitting MoNuSeg's binary mask recovers the outlined nuclei of the same
    image far better than its connected components (which merge touching ones)."""
    from PIL import Image
    from scipy import ndimage as ndi

    from benchmark.datasets import get_dataset
    from benchmark.metrics import aggregated_jaccard_index
    from benchmark.training.data import split_foreground_mask

    root = shared_data / "monuseg2018" / "train"
    sid = "TCGA-21-5786-01Z-00-DX1"
    truth = get_dataset("monuseg", root).load(sid).labels.astype(np.int32)
    mask = np.asarray(Image.open(root / "binary_masks_png" / f"{sid}.png").convert("L")) > 127
    split = aggregated_jaccard_index(truth, split_foreground_mask(mask))
    components = aggregated_jaccard_index(truth, ndi.label(mask)[0])
    assert split > 0.75 and split > components + 0.3


def test_eroded_foreground_masks_match_the_scored_outlines(shared_data: Path) -> None:
    """MoNuSeg's binary masks are larger than the outlines the harness scores
    (boundary pixels drawn); the 2x2 erosion brings them to the same pixels,
    and the training loader applies it when the config asks."""
    from PIL import Image

    from benchmark.datasets import get_dataset
    from benchmark.training.data import erode_foreground_mask, load_training_images

    root = shared_data / "monuseg2018" / "train"
    sid = "TCGA-AR-A1AK-01Z-00-DX1"
    truth = get_dataset("monuseg", root).load(sid).labels > 0
    mask = np.asarray(Image.open(root / "binary_masks_png" / f"{sid}.png").convert("L")) > 127

    def iou(a: np.ndarray) -> float:
        return float((a & truth).sum() / (a | truth).sum())

    eroded = erode_foreground_mask(mask)
    assert mask.sum() > 1.05 * truth.sum()  # the raw mask is the larger one
    assert abs(eroded.sum() / truth.sum() - 1) < 0.05
    assert iou(eroded) > iou(mask) + 0.02 and iou(eroded) > 0.95

    # the loader: a foreground-only image gets the eroded mask (at 0.25 um/px, no resampling)
    kw = dict(mpp=0.25, ids=[], foreground_only_masks=root / "binary_masks_png", default_mpp=0.25)
    fg_id = "TCGA-18-5592-01Z-00-DX1"  # one of the images without outlines
    raw = {t.id: t for t in load_training_images("monuseg", root, **kw)}[fg_id]
    ero = {t.id: t for t in load_training_images("monuseg", root, foreground_mask_erosion=2, **kw)}[
        fg_id
    ]
    assert np.array_equal(ero.foreground, erode_foreground_mask(raw.foreground))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_h_maxima_equals_scikit_image_with_a_low_background(seed: int) -> None:
    from scipy import ndimage as ndi
    from skimage.morphology import h_maxima

    from nucleus_models.models.unet import masked_h_maxima

    rng = np.random.default_rng(seed)
    img = ndi.gaussian_filter(rng.normal(size=(160, 200)), 3).astype(np.float32)
    img /= np.abs(img).max()
    mask = img > -0.1
    h = 0.1
    low = float(img[mask].min()) - 2 * h - 1
    ref = (h_maxima(np.where(mask, img, low).astype(np.float32), h) > 0) & mask
    ours = masked_h_maxima(img, mask, h)
    assert ours.sum() > 5 and np.array_equal(ours, ref)
    assert not masked_h_maxima(img, np.zeros_like(mask), h).any()


def test_boxes_packed_on_a_canvas_lie_apart_and_inside_it() -> None:
    from nucleus_models.canvas import pack_boxes

    rng = np.random.default_rng(0)
    for _ in range(50):
        sizes = rng.integers(1, 40, (int(rng.integers(1, 60)), 2))
        width = int(rng.integers(10, 120))
        corners, (ch, cw) = pack_boxes(sizes, width)
        assert cw == max(width, int(sizes[:, 1].max()) + 2)
        used = np.zeros((ch, cw), np.int32)
        for (y, x), (h, w) in zip(corners, sizes, strict=True):
            assert y >= 1 and x >= 1 and y + h + 1 <= ch and x + w + 1 <= cw
            # the box and a one-pixel margin around it are free of other boxes
            assert not used[y - 1 : y + h + 1, x - 1 : x + w + 1].any()
            used[y : y + h, x : x + w] = 1
        assert used.sum() == int(np.prod(sizes, axis=1).sum())


def _h_maxima_reference(img: np.ndarray, mask: np.ndarray, h: float) -> np.ndarray:
    """scikit-image's h-maxima with everything outside the mask set low."""
    from skimage.morphology import h_maxima

    low = float(img[mask].min()) - 2 * h - 1
    return (h_maxima(np.where(mask, img, low).astype(np.float32), h) > 0) & mask


def test_masked_h_maxima_moves_the_slow_parts_to_a_canvas_without_changing_the_result(
    shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a few steps over the whole tile, the parts of the mask still
    changing are reconstructed on a canvas of their own: the h-maxima are
    still scikit-image's, on parts that need many steps (long ridges, parts
    touching only at a corner, which the 3 x 3 dilation joins, parts at the
    image's edge) and on the shipped H&E model's maps."""
    import cv2
    import tifffile
    from scipy import ndimage as ndi

    from nucleus_models.models import get_model, unet
    from nucleus_models.models.unet import gaussian_smooth, masked_h_maxima

    canvases: list[tuple[int, int]] = []
    real = unet.parts_on_canvas

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = real(*args, **kwargs)
        canvases.append(out[2])
        return out

    monkeypatch.setattr(unet, "parts_on_canvas", spy)

    # a ramp along a 1-px snake (1.0 down to 0.64 at its end, ~36 steps for
    # its reconstruction to settle); a bar touches the snake's end only at a
    # corner, which the 3 x 3 dilation joins. The snake's end rises above
    # the bar's own level (0.6 = its peak - h) only after ~14 steps, when
    # both have moved to the canvas: the bar's peak (0.7 on 0.65) is then
    # less than h above its way to the snake's higher peak, and is no
    # h-maximum (as a part of its own, or if the two parts were apart on the
    # canvas, it would be)
    img = np.zeros((50, 60), np.float32)
    mask = np.zeros_like(img, bool)
    path = (
        [(2, x) for x in range(58)]
        + [(y, 57) for y in range(3, 20)]
        + [(19, x) for x in range(56, -1, -1)]
        + [(20, 0)]
    )
    rows, cols = np.array(path).T
    mask[rows, cols] = True
    img[rows, cols] = np.linspace(1.0, 0.64, len(path))
    mask[21:46, 1:3] = True  # (21, 1) meets the snake's end (20, 0) at a corner
    img[21:46, 1:3] = 0.65
    img[40, 2] = 0.7
    ours = masked_h_maxima(img, mask, 0.1)
    assert np.array_equal(ours, _h_maxima_reference(img, mask, 0.1))
    assert ours[2, 0] and not ours[40, 2]
    alone = mask.copy()
    alone[:21] = False
    assert masked_h_maxima(img, alone, 0.1)[40, 2]
    assert canvases, "the slow parts were not moved to a canvas"

    rng = np.random.default_rng(1)
    for _ in range(30):
        h_, w_ = (int(v) for v in rng.integers(20, 140, 2))
        img = ndi.gaussian_filter(rng.normal(size=(h_, w_)), rng.uniform(1, 6)).astype(np.float32)
        img /= np.abs(img).max()
        mask = img > rng.uniform(-0.3, 0.2)
        if not mask.any():
            continue
        hh = float(rng.uniform(0.01, 0.2))
        assert np.array_equal(masked_h_maxima(img, mask, hh), _h_maxima_reference(img, mask, hh))

    path = sorted((shared_data / "monuseg2018/train/images").glob("*.tif"))[1]
    image = cv2.resize(tifffile.imread(path)[..., :3], (625, 625), interpolation=cv2.INTER_AREA)
    model = get_model("unet-monuseg", precision="float32")
    fg, bd, dist = model.forward(model.preprocess([image], {}))[0][:, :625, :625]
    canvases.clear()
    for fg_t, h, smooth in [(0.5, 0.3, 1.2), (0.4, 0.05, 0.6)]:
        height = gaussian_smooth(dist - bd, smooth)
        mask = fg > fg_t
        ours = masked_h_maxima(height, mask, h)
        assert np.array_equal(ours, _h_maxima_reference(height, mask, h))
        assert ndi.label(ours)[1] > 100
    assert canvases and all(ch * cw < 625 * 625 for ch, cw in canvases)


def test_model_card_lists_every_training_session_of_a_continued_run(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run trained in several invocations (interrupted, continued to more
    steps) says in its card which command trained which steps."""
    import sys

    import torch

    from benchmark.__main__ import main
    from benchmark.training import run

    imgs = _tiny_images(shared_data)
    monkeypatch.setattr(run, "_images", lambda cfg: imgs)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(
        'name = "unet-sessions"\narch = "unet"\nseed = 1\n'
        '[data]\ndataset = "bbbc038"\nroot = "."\n'
        '[model]\nmpp = 0.5\nmodality = "fluorescence"\nnormalisation = "percentile"\n'
        "base = 8\ndepth = 3\n"
        "[train]\nsteps = 20\nbatch_size = 2\npatch_size = 64\nlr = 0.01\ncheckpoint_every = 5\n"
    )
    out, weights = str(tmp_path / "run"), str(tmp_path / "weights")

    def train(*args: str) -> None:
        argv = ["train", "--config", str(cfg), "--out", out, "--skip_cv", *args]
        monkeypatch.setattr(sys, "argv", ["nucleus-bench", *argv])  # as the console script sees it
        assert main(argv) == 0

    train("--steps", "10")
    train("--resume")  # the config's 20 steps
    # the export runs in a process of its own: the card's machine is the training's
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    train("--resume", "--export", weights)  # nothing left to train: no new session
    state = torch.load(tmp_path / "run" / "final" / "checkpoint.pt", weights_only=True)
    sessions = state["sessions"]
    assert [(s["from_step"], s["to_step"]) for s in sessions] == [(0, 10), (10, 20)]
    assert sessions[0]["command"].endswith("--skip_cv --steps 10")
    assert sessions[1]["command"].endswith("--skip_cv --resume")
    assert all(s["seconds"] > 0 and "CPU thread" in s["hardware"] for s in sessions)
    card = (tmp_path / "weights" / "unet-sessions.md").read_text()
    line = next(x for x in card.splitlines() if x.startswith("- Training sessions: "))
    assert line.count(" min on ") == 2 and "steps 0-10 `nucleus-bench train --config" in line
    assert "steps 10-20 `nucleus-bench train --config" in line
    assert (
        f"- Exported with: `nucleus-bench train --config {cfg} --out {out} --skip_cv --resume --export {weights}`"
        in card
    )
    assert "Training command:" not in card
    trained = next(x for x in card.splitlines() if x.startswith("- Training: "))
    assert f"min on {sessions[0]['hardware']}" in trained and "7 CPU threads" not in card
    # the config sets no data.label_resize: the default, area, is what the card names
    assert "; label maps resampled to the model's grid by area (outlines kept in place)" in card


def test_train_without_out_writes_runs_of_the_config_name(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``nucleus-bench train`` without ``--out`` trains into ``runs/<name>``
    of the working directory."""
    from benchmark.__main__ import main
    from benchmark.training import run

    imgs = _tiny_images(shared_data)
    monkeypatch.setattr(run, "_images", lambda cfg: imgs)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.toml").write_text(
        'name = "unet-default-out"\narch = "unet"\nseed = 1\n'
        '[data]\ndataset = "bbbc038"\nroot = "."\n'
        '[model]\nmpp = 0.5\nmodality = "fluorescence"\nbase = 8\ndepth = 3\n'
        "[train]\nsteps = 2\nbatch_size = 2\npatch_size = 64\nlr = 0.01\n"
    )
    assert main(["train", "--config", "tiny.toml", "--skip_cv"]) == 0
    assert (tmp_path / "runs" / "unet-default-out" / "final" / "checkpoint.pt").is_file()


def test_training_configs_read_as_toml_or_yaml_with_one_line_errors(tmp_path: Path) -> None:
    """A YAML config with the same tables loads to the same config as the
    shipped TOML; an unparsable file or an unknown suffix is a ValueError
    naming the file (the CLI prints it as one line)."""
    import tomllib
    import yaml

    from benchmark.training.run import load_config

    toml_path = Path(__file__).resolve().parents[1] / "configs" / "unet-monuseg.toml"
    raw = tomllib.loads(toml_path.read_text())
    yml = tmp_path / "unet-monuseg.yaml"
    yml.write_text(yaml.safe_dump(raw))
    a, b = load_config(toml_path), load_config(yml)
    assert a.pop("_config_path") != b.pop("_config_path")
    assert a == b and a["data"]["root"].endswith("shared/data/monuseg2018/train")

    bad = tmp_path / "bad.yml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match=r"bad\.yml: not a valid YAML config: "):
        load_config(bad)
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(ValueError, match=r"bad\.toml: not a valid TOML config: "):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="a table of sections, not list"):
        load_config(listy)
    with pytest.raises(ValueError, match=r"\.toml, \.yaml or \.yml, not '\.json'"):
        load_config(tmp_path / "x.json")
    # PyYAML reads 1e-4 as text (TOML as a number): the message says how to write it
    text = yml.read_text()
    assert "lr: 0.002\n" in text
    yml.write_text(text.replace("lr: 0.002\n", "lr: 2e-3\n"))
    with pytest.raises(ValueError, match=r"train\.lr = '2e-3': expected a number \(YAML reads"):
        load_config(yml)


def test_a_quoted_number_in_a_config_is_called_so(tmp_path: Path) -> None:
    """``steps = "5500"`` in a TOML config was answered "(YAML reads 5500 as
    text: write it with a point, e.g. 1.0e-4)": neither YAML nor a point has
    to do with it (a quoted number is text in both formats); the hint says
    to drop the quotes. YAML's own ``2e-3`` keeps its hint, with that value."""
    from benchmark.training.run import load_config

    text = (Path(__file__).resolve().parents[1] / "configs" / "unet-monuseg.toml").read_text()
    assert "\nsteps = 5500\n" in text
    bad = tmp_path / "quoted.toml"
    bad.write_text(text.replace("\nsteps = 5500\n", '\nsteps = "5500"\n', 1))
    with pytest.raises(ValueError) as info:
        load_config(bad)
    msg = str(info.value)
    assert "train.steps = '5500': expected a whole number" in msg, msg
    assert "quotes" in msg and "YAML" not in msg and "1.0e-4" not in msg, msg
    yml = tmp_path / "c.yaml"
    yml.write_text("arch: unet\ndata: {dataset: monuseg, root: x}\nmodel: {mpp: 0.4}\n"
                   "train: {steps: 10, lr: 2e-3}\n")  # fmt: skip
    with pytest.raises(
        ValueError, match=r"YAML reads 2e-3 as text: write it with a point, 2\.0e-3"
    ):
        load_config(yml)
    yml.write_text(yml.read_text().replace("lr: 2e-3", "lr: '0.002'"))
    with pytest.raises(ValueError, match=r"train\.lr = '0\.002': expected a number \(in quotes"):
        load_config(yml)
    short = tmp_path / "c.yml"  # (the other suffix of YAML configs: the same hint)
    short.write_text(yml.read_text().replace("lr: '0.002'", "lr: 2e-3"))
    with pytest.raises(ValueError, match=r"YAML reads 2e-3 as text: write it with a point"):
        load_config(short)


def test_a_broken_config_is_a_one_line_error_from_the_command_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from benchmark.__main__ import main

    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nmpp = 0.5\n")
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad}: not a valid TOML config: ") and "\n" not in err


def test_an_export_can_carry_over_the_cross_validation_of_the_same_config(
    shared_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--cv_from``: a final model trained longer is exported with the
    cross-validation of an earlier run of the same config, without training
    the folds again; any other change of the config is refused in one line."""
    from benchmark.__main__ import main
    from benchmark.training import run

    imgs = _tiny_images(shared_data)
    monkeypatch.setattr(run, "_images", lambda cfg: imgs)

    def config(name: str, *, steps: int = 10, noise: float = 0.02, tile: int = 512) -> str:
        path = tmp_path / f"{name}.toml"
        path.write_text(
            'name = "unet-carry"\narch = "unet"\nseed = 2\n'
            '[data]\ndataset = "bbbc038"\nroot = "."\n'
            '[model]\nmpp = 0.5\nmodality = "fluorescence"\nnormalisation = "percentile"\n'
            f"base = 8\ndepth = 3\ntile_size = {tile}\n"
            f"[train]\nsteps = {steps}\nbatch_size = 2\npatch_size = 64\nlr = 0.01\n"
            f"[augment]\nnoise = {noise}\n"
            "[cv]\nfolds = 3\nsteps = 6\nfg_thresholds = [0.5]\nseed_thresholds = [0.3, 0.5]\n"
        )
        return str(path)

    def train(cfg: str, out: str, *args: str) -> int:
        return main(["train", "--config", cfg, "--out", str(tmp_path / out), *args])

    first = config("first")
    assert train(first, "run1", "--export", str(tmp_path / "w1")) == 0
    record = tmp_path / "w1" / "unet-carry.json"
    before = json.loads(record.read_text())
    assert len(before["cv"]["config_sha256"]) == 64
    assert before["spec"]["thresholds"]["normalisation"] == "percentile"

    # the final model trained longer and served with larger tiles: same cross-validation
    longer = config("longer", steps=16, tile=1024)
    assert train(longer, "run2", "--cv_from", str(record), "--export", str(tmp_path / "w2")) == 0
    assert not (tmp_path / "run2" / "cv").exists()  # no fold trained
    after = json.loads((tmp_path / "w2" / "unet-carry.json").read_text())
    assert after["cv"]["metrics_at_best"] == before["cv"]["metrics_at_best"]
    assert after["spec"]["thresholds"] == before["spec"]["thresholds"]
    assert after["training"]["steps"] == 16 and after["spec"]["tile_size"] == 1024
    assert after["training"]["cv_seconds"] == before["training"]["cv_seconds"] > 0
    assert after["cv"]["carried_over_from"]["weights_sha256"] == before["spec"]["sha256"]
    card = (tmp_path / "w2" / "unet-carry.md").read_text()
    assert f"Cross-validation carried over from the record `{record}`" in card
    capsys.readouterr()

    # another augmentation is another experiment: refused, nothing trained
    other = config("other", noise=0.05)
    assert train(other, "run3", "--cv_from", str(record), "--export", str(tmp_path / "w3")) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith(f"error: --cv_from {record}: made with another config") and "\n" not in err
    )
    assert not (tmp_path / "run3" / "final").exists() and not (tmp_path / "w3").exists()

    # a record from before fingerprints: only with the config it was made with
    legacy = tmp_path / "legacy.json"
    old = json.loads(record.read_text())
    del old["cv"]["config_sha256"]
    legacy.write_text(json.dumps(old))
    assert train(longer, "run4", "--cv_from", str(legacy)) == 2
    assert "records no config fingerprint" in capsys.readouterr().err
    assert train(longer, "run4", "--cv_from", str(legacy), "--cv_config", other) == 2
    assert "made with another config" in capsys.readouterr().err
    assert train(longer, "run4", "--cv_from", str(legacy), "--cv_config", first) == 0

    # it replaces the cross-validation: not with the options that skip or split it
    assert train(longer, "run5", "--cv_from", str(record), "--skip_cv") == 2
    assert "--cv_from replaces the cross-validation" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name", ["unet-monuseg", "unet-monuseg-reinhard", "unet-monuseg-fast", "unet-bbbc038"]
)
def test_each_shipped_card_cross_validated_its_config(name: str) -> None:
    """The CV on a shipped model's card was made with ``configs/<name>.toml``
    as it is now (apart from the final model's steps and inference settings):
    a config edited without cross-validating again fails here."""
    from benchmark.training.common import cv_fingerprint
    from benchmark.training.run import load_config

    root = Path(__file__).resolve().parents[1]
    shipped = json.loads((root / "nucleus_models" / "weights" / f"{name}.json").read_text())
    cfg = load_config(root / "configs" / f"{name}.toml")
    assert shipped["cv"]["config_sha256"] == cv_fingerprint(cfg)
    assert shipped["training"]["steps"] == cfg["train"]["steps"]
    assert shipped["spec"]["mpp"] == cfg["model"]["mpp"]
    assert shipped["spec"]["tile_size"] == cfg["model"]["tile_size"]
    th = shipped["spec"]["thresholds"]
    assert th.get("cpu_bfloat16", 0) == cfg["model"].get("cpu_bfloat16", 0)
    assert th.get("cpu_int8", 0) == cfg["model"].get("cpu_int8", 0)
    assert th.get("stain_normalisation", "none") == cfg["model"].get("stain_normalisation", "none")
    assert th.get("channels") == cfg["model"].get("channels")


def test_precision_auto_follows_the_cpu_and_bad_values_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    from nucleus_models.errors import ParameterError
    from nucleus_models.models import unet

    monkeypatch.setattr(unet, "cpu_has_native_bf16", lambda cpuinfo=None: False)
    assert unet.pick_precision("auto", "cpu") == "float32"
    monkeypatch.setattr(unet, "cpu_has_native_bf16", lambda cpuinfo=None: True)
    onednn_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert unet.pick_precision("auto", "cpu") == ("bfloat16" if onednn_bf16 else "float32")
    # a model whose spec does not allow it stays in float32 under auto
    assert unet.pick_precision("auto", "cpu", cpu_bfloat16=False) == "float32"
    assert unet.pick_precision("bfloat16", "cpu", cpu_bfloat16=False) == "bfloat16"
    assert unet.pick_precision(None, "cuda") == "float32"  # GPUs: not measured, float32
    assert unet.pick_precision("bfloat16", "cpu") == "bfloat16"
    assert unet.pick_precision("float32", "cpu") == "float32"
    with pytest.raises(ParameterError, match="precision must be one of auto, float32, bfloat16"):
        unet.pick_precision("float16", "cpu")


@pytest.mark.parametrize(("precision", "index"), [("bfloat16", 0), ("int8", 1)])
def test_lower_precision_segments_a_shared_image_as_float32_does(
    shared_data: Path, precision: str, index: int
) -> None:
    """The shipped H&E U-Net in bfloat16 or int8 finds the same nuclei as in
    float32 (scored against each other and against the outlines), and says
    which arithmetic it ran (int8: with its calibration's sha256)."""
    from benchmark.datasets import get_dataset
    from benchmark.metrics import instance_metrics
    from nucleus_models.detection import segment_image
    from nucleus_models.models.int8 import calibration_sha256

    ds = get_dataset("monuseg", shared_data / "monuseg2018" / "train")
    sample = ds.load(ds.ids()[index])
    segs = {
        p: segment_image(
            sample.image,
            mpp=0.25,
            model="unet-monuseg",
            model_options={"device": "cpu", "precision": p},
        )
        for p in ("float32", precision)
    }
    assert segs["float32"].runtime == {"device": "cpu", "precision": "float32"}
    expected = {"device": "cpu", "precision": precision}
    if precision == "int8":
        shipped = Path(__file__).resolve().parents[1] / "nucleus_models" / "weights"
        card = json.loads((shipped / "unet-monuseg.json").read_text())
        expected["int8_calibration"] = calibration_sha256(card["int8"])
    assert segs[precision].runtime == expected
    assert len(segs[precision].nuclei) > 300
    agree = instance_metrics(segs["float32"].labels, segs[precision].labels)
    assert agree["f1_iou50"] > 0.97 and agree["aji"] > 0.9, agree
    m32, mlow = (instance_metrics(sample.labels, segs[p].labels) for p in ("float32", precision))
    assert abs(m32["aji"] - mlow["aji"]) < 0.01
    assert abs(m32["f1_iou50"] - mlow["f1_iou50"]) < 0.01


def test_outline_weight_counts_the_pixels_near_the_outlines_more(shared_data: Path) -> None:
    """``train.outline_weight`` w: the foreground BCE is the mean over pixels
    weighted 1 + w in the outline band, 1 elsewhere; w = 0 is the plain loss."""
    import torch
    import torch.nn.functional as F

    from benchmark.training.unet import _batch, loss_fn, outline_band

    imgs = _tiny_images(shared_data)
    cfg = _cfg()
    cfg["train"]["outline_weight"] = 3.0
    b = _batch(imgs, cfg, np.random.default_rng(0))
    fg = b["fg"][:, 0].numpy() > 0.5
    want = np.stack([outline_band(f, 1.5) for f in fg])
    assert np.array_equal(b["outline"][:, 0].numpy() > 0, want) and want.any()
    pred = torch.randn(b["fg"].shape[0], 3, *b["fg"].shape[2:])
    zero = {**b, "fg_weight": torch.ones_like(b["fg"]), "inst_weight": torch.zeros_like(b["fg"])}
    bce = F.binary_cross_entropy_with_logits(pred[:, 0:1], b["fg"], reduction="none")
    p = pred[:, 0:1].sigmoid()
    dice = 1 - (2 * (p * b["fg"]).sum() + 1) / (p.sum() + b["fg"].sum() + 1)
    w = 1 + 3.0 * b["outline"]
    got = loss_fn(pred, zero, outline_weight=3.0)
    assert float(got) == pytest.approx(float((bce * w).sum() / w.sum() + dice), rel=1e-5)
    assert float(loss_fn(pred, zero)) == pytest.approx(float(bce.mean() + dice), rel=1e-5)
    # weighting the band changes the loss
    assert float(got) != pytest.approx(float(loss_fn(pred, zero)), rel=1e-4)


def test_focal_gamma_counts_missed_foreground_more_than_easy_pixels() -> None:
    """``train.focal_gamma`` g: each foreground BCE term is multiplied by
    (1 - p_true) ** g, so a confidently right pixel's gradient shrinks far
    more than a missed one's; g = 0 is the plain loss."""
    import torch
    import torch.nn.functional as F

    from benchmark.training.unet import loss_fn

    fg = torch.zeros(1, 1, 8, 8)
    fg[..., 2:6, 2:6] = 1
    logit = torch.where(fg > 0, torch.tensor(3.0), torch.tensor(-3.0))
    logit[..., 2:4, 2:6] = -2.0  # half the nucleus missed (a pale one)
    zeros = torch.zeros_like(fg)
    b = {
        "fg": fg,
        "boundary": zeros,
        "dist": zeros,
        "fg_weight": torch.ones_like(fg),
        "inst_weight": zeros,
    }

    def grads(gamma: float) -> torch.Tensor:
        pred = torch.cat([logit, zeros, zeros], 1).requires_grad_(True)
        loss_fn(pred, b, focal_gamma=gamma).backward()
        assert pred.grad is not None
        return pred.grad[0, 0].abs()

    plain, focal = grads(0.0), grads(2.0)
    missed, easy = (slice(2, 4), slice(2, 6)), (slice(4, 6), slice(2, 6))
    ratio_plain = float(plain[missed].mean() / plain[easy].mean())
    ratio_focal = float(focal[missed].mean() / focal[easy].mean())
    # the soft Dice term (unchanged) pulls on every foreground pixel alike
    assert ratio_focal > 1.4 * ratio_plain, (ratio_plain, ratio_focal)
    pred = torch.cat([logit, zeros, zeros], 1)
    bce = F.binary_cross_entropy_with_logits(logit, fg, reduction="none")
    p = logit.sigmoid()
    p_true = torch.where(fg > 0, p, 1 - p)
    dice = 1 - (2 * (p * fg).sum() + 1) / (p.sum() + fg.sum() + 1)
    focal = (bce * (1 - p_true) ** 2).mean()
    assert float(loss_fn(pred, b, focal_gamma=2.0)) == pytest.approx(float(focal + dice), rel=1e-5)
    # g = 0 is the plain BCE + Dice
    assert float(loss_fn(pred, b)) == pytest.approx(float(bce.mean() + dice), rel=1e-5)


def test_labelled_fraction_trains_each_fold_on_a_subset_of_its_outlined_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cv.labelled_fraction``: the U-Net and detector CVs train each fold on
    that fraction of its outlined training images, keep every pseudo-labelled
    one, and hold out the same folds as the full CV."""
    import numpy as np

    from benchmark.training import detectors, unet
    from benchmark.training.data import TrainImage
    from benchmark.training.run import cross_validate, cv_folds

    z = np.zeros((8, 8, 3), np.uint8)
    lab = np.ones((8, 8), np.int32)
    ims = [TrainImage(f"o{i}", z, lab, lab > 0) for i in range(9)]
    ims += [TrainImage(f"p{i}", z, lab, lab > 0, pseudo=True) for i in range(2)]
    cfg = {**_cfg(), "cv": {"folds": 3, "labelled_fraction": 0.5}}
    assert cv_folds(cfg, ims) == cv_folds(_cfg(), ims)
    held = cv_folds(cfg, ims)[1]

    class Trained(Exception):
        pass

    seen: list[list[str]] = []

    def fake_train(cfg, images, out, **kw):  # type: ignore[no-untyped-def]
        seen.append(sorted(im.id for im in images))
        raise Trained

    monkeypatch.setattr(unet, "train_unet", fake_train)
    monkeypatch.setattr(detectors, "train_detector", fake_train)
    with pytest.raises(Trained):
        cross_validate(cfg, ims, tmp_path, resume=False, only_fold=1)
    with pytest.raises(Trained):
        detectors.cross_validate(
            {**cfg, "arch": "maskrcnn"}, ims, tmp_path, resume=False, only_fold=1
        )
    assert seen[0] == seen[1]
    outlined = [i for i in seen[0] if i.startswith("o")]
    assert len(outlined) == 3 and not set(outlined) & set(
        held
    )  # 6 outlined train images, half kept
    assert {"p0", "p1"} <= set(seen[0])


def test_extra_images_train_every_fold_at_the_training_nuclei_size_and_are_never_held_out(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``[[data.extra]]``: BBBC038's brightfield images join each fold's
    training set (never its held-out images), resampled so their nuclei are
    as large as the training images' median and weighted by their area; the
    root is read relative to the repository, as the dataset's own; a bad
    entry or an empty selection is a one-line ValueError."""
    import os

    from benchmark.training import unet
    from benchmark.training.common import REPO
    from benchmark.training.data import TrainImage
    from benchmark.training.run import (
        cross_validate,
        cv_folds,
        extra_training_images,
        load_config,
    )
    from nucleus_models.models.unet import mask_diameter

    yy, xx = np.mgrid[:200, :200]
    lab = np.zeros((200, 200), np.int32)
    for i, (cy, cx) in enumerate([(40, 40), (40, 120), (120, 60), (150, 150)], 1):
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= 36] = i  # 13 px across
    img = np.full((200, 200, 3), 220, np.uint8)
    img[lab > 0] = (70, 45, 130)
    ims = [TrainImage(f"o{i}", img, lab, lab > 0) for i in range(6)]
    rel_root = Path(os.path.relpath(shared_data / "dsb2018_bbbc038", REPO))
    cfg_path = tmp_path / "extra.toml"
    cfg_path.write_text(
        '[data]\ndataset = "monuseg"\nroot = "."\n'
        f'[[data.extra]]\ndataset = "bbbc038"\nroot = "{rel_root.as_posix()}"\n'
        'modality = "brightfield"\nweight = 2.0\n'
        "[model]\nmpp = 0.4\n[train]\nsteps = 1\n[cv]\nfolds = 3\n"
    )
    cfg = {**_cfg(), "data": load_config(cfg_path)["data"], "cv": {"folds": 3}}
    assert Path(cfg["data"]["extra"][0]["root"]) == (shared_data / "dsb2018_bbbc038").resolve()
    assert cv_folds(cfg, ims) == cv_folds({**cfg, "data": {}}, ims)

    class Trained(Exception):
        pass

    seen: list[list[TrainImage]] = []

    def fake_train(cfg, images, out, **kw):  # type: ignore[no-untyped-def]
        seen.append(list(images))
        raise Trained

    monkeypatch.setattr(unet, "train_unet", fake_train)
    with pytest.raises(Trained):
        cross_validate(cfg, ims, tmp_path, resume=False, only_fold=0)
    held = set(cv_folds(cfg, ims)[0])
    extra = [im for im in seen[0] if im.id.startswith("bbbc038:")]
    assert len(extra) == 8 and not {im.id for im in seen[0]} & held
    assert {im.groups["modality"] for im in extra} == {"brightfield"}
    target = mask_diameter(lab > 0)
    assert target is not None
    for im in extra:
        d = mask_diameter(im.foreground)
        assert d is not None and abs(d - target) <= 0.2 * target, (im.id, d, target)
        assert im.labels is not None and im.labels.shape == im.image.shape[:2]
        assert im.weight == pytest.approx(2.0 * min(1.0, im.foreground.size / img[..., 0].size))

    bad = tmp_path / "bad.toml"
    bad.write_text('[data]\ndataset = "monuseg"\nroot = "."\nextra = "bbbc038"\n')
    with pytest.raises(ValueError, match=r"data\.extra must be a list of tables"):
        load_config(bad)
    none = {**cfg, "data": {"extra": [{**cfg["data"]["extra"][0], "modality": "x-ray"}]}}
    with pytest.raises(ValueError, match="no x-ray images in bbbc038"):
        extra_training_images(none, ims)


def test_patches_are_drawn_in_proportion_to_each_images_weight() -> None:
    """``TrainImage.weight`` scales how often ``_batch`` draws an image."""
    from benchmark.training.data import TrainImage
    from benchmark.training.unet import _batch

    lab = np.zeros((64, 64), np.int32)
    lab[20:30, 20:30] = 1
    light = np.full((64, 64, 3), 200, np.uint8)
    dark = np.full((64, 64, 3), 20, np.uint8)
    cfg = {**_cfg(), "model": {**_cfg()["model"], "normalisation": "rgb"}}
    cfg["train"] = {**cfg["train"], "batch_size": 400, "patch_size": 32}
    rng = np.random.default_rng(0)
    b = _batch(
        [TrainImage("a", light, lab, lab > 0), TrainImage("b", dark, lab, lab > 0, weight=0.25)],
        {**cfg, "augment": {}},
        rng,
    )
    share_dark = float((b["image"].float().mean(dim=(1, 2, 3)) < 0).float().mean())
    assert 0.12 < share_dark < 0.28  # 0.25 / 1.25 = 0.2


def test_blur_augmentation_softens_half_the_patches_and_leaves_the_targets() -> None:
    """``augment.blur``: about half the patches lose high-frequency detail
    (Gaussian of sigma up to that many pixels), no target changes, and a
    config without it draws the same random numbers as before it existed."""
    from benchmark.training.data import augment

    rng0 = np.random.default_rng(5)
    img = rng0.integers(0, 256, (48, 48, 3)).astype(np.uint8)
    fg = (rng0.uniform(size=(48, 48)) > 0.5).astype(np.float32)
    patch = {"image": img, "fg": fg}

    def detail(x: np.ndarray) -> float:
        return float(np.abs(np.diff(x.astype(np.float32), axis=1)).mean())

    blurred = 0
    for seed in range(40):
        a = augment(patch, np.random.default_rng(seed), {"blur": 2.0})
        b = augment(patch, np.random.default_rng(seed), {})
        assert np.array_equal(a["fg"], b["fg"])  # same flips, targets untouched
        if not np.array_equal(a["image"], b["image"]):
            assert detail(a["image"]) < detail(b["image"])
            blurred += 1
    assert 10 <= blurred <= 30
    r1, r2 = np.random.default_rng(1), np.random.default_rng(1)
    augment(patch, r1, {"noise": 0.02})
    augment(patch, r2, {"noise": 0.02, "blur": 0})
    assert r1.uniform() == r2.uniform()


def test_vesicular_augmentation_pales_nuclear_interiors_and_leaves_the_rest() -> None:
    """``augment.vesicular``: in that share of the patches some nuclei get
    paler interiors (never darker), their rims, the background and the
    targets stay; a config without it draws the same random numbers."""
    from benchmark.training.data import augment, make_targets

    lab = np.zeros((64, 64), np.int32)
    for i, (y, x) in enumerate([(12, 12), (12, 44), (44, 12), (44, 44)], start=1):
        yy, xx = np.ogrid[:64, :64]
        lab[(yy - y) ** 2 + (xx - x) ** 2 <= 81] = i
    fg, bd, dist = make_targets(lab, boundary="thin")
    img = np.full((64, 64, 3), (230, 190, 215), np.uint8)
    img[lab > 0] = (70, 50, 120)
    patch = {"image": img, "fg": fg, "boundary": bd, "dist": dist}
    changed = 0
    for seed in range(40):
        a = augment(patch, np.random.default_rng(seed), {"vesicular": 0.5})
        b = augment(patch, np.random.default_rng(seed), {})
        for key in ("fg", "boundary", "dist"):
            assert np.array_equal(a[key], b[key])
        diff = a["image"].astype(int) - b["image"].astype(int)
        m = b["fg"] == 0
        assert np.abs(diff[m]).max() == 0  # the background is untouched
        # (the patch is flipped and rotated: the masks come from its own targets)
        centre, rim = a["dist"] > 0.8, (a["dist"] > 0) & (a["dist"] < 0.2)
        if diff.any():
            changed += 1
            assert diff.min() >= 0 and diff[..., 0][centre].max() > 60  # paler, not darker
        assert np.abs(diff[..., 0][rim]).max() < 40  # the rim stays dark
    assert 10 <= changed <= 30
    r1, r2 = np.random.default_rng(1), np.random.default_rng(1)
    augment(patch, r1, {"noise": 0.02})
    augment(patch, r2, {"noise": 0.02, "vesicular": 0})
    assert r1.uniform() == r2.uniform()


def _bar_image() -> tuple[np.ndarray, np.ndarray]:
    """A 96 x 96 image with two dark bars (instances 1 and 2) on a light background."""
    lab = np.zeros((96, 96), np.int32)
    lab[30:40, 20:76] = 1
    lab[56:64, 30:60] = 2
    img = np.full((96, 96, 3), 210, np.uint8)
    img[lab > 0] = (70, 40, 110)
    return img, lab


def test_warped_patches_rotate_by_any_angle_and_keep_the_targets_on_the_nuclei() -> None:
    """``augment.rotate`` / ``augment.elastic`` (warp_patch): the patch's
    foreground covers the dark pixels wherever the warp takes them, instance
    ids come from the source, angles are not only multiples of 90 degrees,
    pixels from outside the image carry no weight, and a config without
    them draws the same patch as before."""
    from benchmark.training.data import TrainImage, sample_patch

    img, lab = _bar_image()
    item = TrainImage("bars", img, lab, lab > 0)
    angles = []
    for seed in range(12):
        for warp in ({"rotate": True}, {"rotate": True, "elastic": 2.0}, {"elastic": 3.0}):
            p = sample_patch(item, 48, np.random.default_rng(seed), boundary="thin", warp=warp)
            w = p["fg_weight"] > 0
            dark = p["image"][..., 0] < 140
            assert (dark == (p["fg"] > 0))[w].mean() > 0.97
            assert not p["fg"][~w].any() and np.array_equal(p["inst_weight"], p["fg_weight"])
            assert set(np.unique(p["dist"][p["fg"] > 0] > 0)) <= {True}
            if warp == {"rotate": True} and (p["fg"] > 0).sum() > 150:
                ys, xs = np.nonzero(p["fg"] > 0)
                cov = np.cov(np.stack([xs, ys]))
                ev, evec = np.linalg.eigh(cov)
                ang = np.degrees(np.arctan2(evec[1, 1], evec[0, 1])) % 90
                angles.append(min(ang, 90 - ang))
    assert max(angles) > 15  # a 90-degree rotation alone leaves the bars at 0
    # the image's corners: a patch larger than the image has unweighted pixels
    p = sample_patch(item, 160, np.random.default_rng(0), warp={"rotate": True})
    assert 0 < p["fg_weight"].mean() < 1
    # without rotate/elastic the draws and the patch are sample_patch's own
    a = sample_patch(item, 48, np.random.default_rng(4), scale_range=(0.9, 1.1))
    b = sample_patch(
        item, 48, np.random.default_rng(4), scale_range=(0.9, 1.1), warp={"noise": 0.1}
    )
    for key in a:
        assert np.array_equal(a[key], b[key])


def test_elastic_warp_moves_outlines_by_at_most_its_shift() -> None:
    """An elastic warp of at most 2 px keeps each bar's area within the
    perimeter band of 2 px, and the same seed with and without it differs."""
    from benchmark.training.data import TrainImage, warp_patch

    img, lab = _bar_image()
    item = TrainImage("bars", img, lab, lab > 0)
    changed = 0
    for seed in range(10):
        a = warp_patch(item, 64, np.random.default_rng(seed), rotate=False, elastic=2.0)
        b = warp_patch(item, 64, np.random.default_rng(seed), rotate=False, elastic=0.0)
        changed += not np.array_equal(a["fg"], b["fg"])
        band = float(np.abs(a["fg"] - b["fg"]).sum())
        perimeter = 2 * (56 + 10) + 2 * (30 + 8)
        assert band <= 2.0 * perimeter
    assert changed >= 8


def test_grayscale_augmentation_greys_that_share_of_the_patches() -> None:
    """``augment.grayscale``: about that fraction of patches comes out with
    three equal channels, targets untouched; a config without it draws the
    same random numbers."""
    from benchmark.training.data import augment

    img, lab = _bar_image()
    patch = {"image": img, "fg": (lab > 0).astype(np.float32)}
    grey = 0
    for seed in range(60):
        a = augment(patch, np.random.default_rng(seed), {"grayscale": 0.25, "hue_shift": 0.05})
        b = augment(patch, np.random.default_rng(seed), {"hue_shift": 0.05})
        assert np.array_equal(a["fg"], b["fg"])
        im = a["image"].astype(int)
        if np.array_equal(im[..., 0], im[..., 1]) and np.array_equal(im[..., 1], im[..., 2]):
            grey += 1
    assert 6 <= grey <= 26  # 15 expected
    r1, r2 = np.random.default_rng(1), np.random.default_rng(1)
    augment(patch, r1, {"noise": 0.02})
    augment(patch, r2, {"noise": 0.02, "grayscale": 0})
    assert r1.uniform() == r2.uniform()


def _flood_whole_image(image: np.ndarray, markers: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The reference: one watershed over the whole image, then the mask's
    unseeded parts numbered after the largest label (instances_from_maps
    until 2026-12-03)."""
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    labels = watershed(image, markers, mask=mask)
    rest, n_rest = ndi.label(mask & (labels == 0))
    if n_rest:
        labels = np.where(rest > 0, rest + labels.max(), labels)
    return labels


def test_watershed_per_connected_part_gives_the_whole_images_labels(shared_data: Path) -> None:
    """watershed_in_components floods only the parts of the mask with two
    or more seeds, each in its own box: the same labels as one flood of the
    whole image, on random maps (markers inside and outside the mask) and on
    the shipped H&E model's maps of a MoNuSeg image under several settings."""
    import cv2
    import tifffile
    from scipy import ndimage as ndi

    from nucleus_models.models import get_model
    from nucleus_models.models.unet import (
        gaussian_smooth,
        masked_h_maxima,
        watershed_in_components,
    )

    rng = np.random.default_rng(0)
    for t in range(200):
        h, w = (int(v) for v in rng.integers(1, 80, 2))
        img = ndi.gaussian_filter(rng.random((h, w)), rng.uniform(0, 3)).astype(np.float32)
        mask = ndi.gaussian_filter(rng.random((h, w)), 1.5) > rng.uniform(0.4, 0.6)
        mk, _ = ndi.label(rng.random((h, w)) > rng.uniform(0.9, 1.0))
        mk = np.where(mask, mk, 0) if t % 2 else mk
        np.testing.assert_array_equal(
            watershed_in_components(img, mk, mask), _flood_whole_image(img, mk, mask)
        )
    path = sorted((shared_data / "monuseg2018/train/images").glob("*.tif"))[0]
    image = cv2.resize(tifffile.imread(path)[..., :3], (625, 625), interpolation=cv2.INTER_AREA)
    model = get_model("unet-monuseg", precision="float32")
    fg, bd, dist = model.forward(model.preprocess([image], {}))[0][:, :625, :625]
    several = 0
    for fg_t, h_or_t, smooth in [(0.5, 0.3, 1.2), (0.5, 0.05, 0.6), (0.6, 0.1, 0.0)]:
        mask = fg > fg_t
        height = dist - bd
        if smooth:
            height = gaussian_smooth(height, smooth)
            mk, _ = ndi.label(masked_h_maxima(height, mask, h_or_t))
        else:
            mk, _ = ndi.label((height > h_or_t) & mask)
        comp, _ = ndi.label(mask)
        pairs = np.unique(np.stack([comp[mk > 0], mk[mk > 0]]), axis=1)
        several += int((np.bincount(pairs[0]) > 1).sum())  # parts with 2+ seeds
        np.testing.assert_array_equal(
            watershed_in_components(-height, mk, mask), _flood_whole_image(-height, mk, mask)
        )
    assert several > 50  # touching nuclei were split, not only single-seed parts copied


def test_the_training_device_is_chosen_recorded_and_not_part_of_the_fingerprint(
    shared_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``train.device`` / ``nucleus-bench train --device``: the U-Net trains
    where it is told (here the CPU) and the checkpoint's session says so;
    ``cuda`` without a GPU is a one-line error before anything is written;
    the device and thread count do not change the config's fingerprint; a
    GPU run is recorded with the GPU's name."""
    import torch

    from benchmark.__main__ import main
    from benchmark.training import common
    from benchmark.training.common import cv_fingerprint
    from benchmark.training.unet import train_unet

    cfg = _cfg()
    cfg["train"] = {**cfg["train"], "steps": 4, "device": "cpu"}
    ckpt = train_unet(cfg, _tiny_images(shared_data), tmp_path / "run", progress=False)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["step"] == 4 and "CUDA" not in state["sessions"][-1]["hardware"]
    assert all(t.device.type == "cpu" for t in state["model"].values())

    base = {k: dict(v) if isinstance(v, dict) else v for k, v in _cfg().items()}
    moved = {**base, "train": {**base["train"], "device": "cuda", "threads": 8}}
    assert cv_fingerprint(moved) == cv_fingerprint(base)
    assert cv_fingerprint({**base, "train": {**base["train"], "lr": 0.5}}) != cv_fingerprint(base)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = tmp_path / "c.toml"
    config.write_text(
        'name = "unet-dev"\n[data]\ndataset = "bbbc038"\nroot = "."\n'
        "[model]\nmpp = 0.5\n[train]\nsteps = 2\nbatch_size = 2\npatch_size = 32\nlr = 0.01\n"
    )
    out = tmp_path / "never"
    assert main(["train", "--config", str(config), "--device", "cuda", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: device 'cuda' requested but no CUDA GPU is available"
    assert not out.exists()

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Test GPU")
    assert common.hardware_text("cuda").startswith("Test GPU (CUDA), ")
    assert "GPU" not in common.hardware_text("cpu")


def test_test_time_flips_run_the_network_on_each_tile_and_its_two_flips(
    shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``test_time_flips`` reaches the U-Net (three passes a batch), is
    recorded in the runtime, and changes the nuclei a little; a model
    without a network ignores it with a warning."""
    from nucleus_models.detection import DetectionParams, detect_nuclei
    from nucleus_models.models.unet import UNetModel

    passes: list[int] = []
    maps = UNetModel._maps

    def counting(self, x):  # type: ignore[no-untyped-def]
        passes.append(1)
        return maps(self, x)

    monkeypatch.setattr(UNetModel, "_maps", counting)
    image = sorted((shared_data / "monuseg2018" / "train" / "images").glob("*.tif"))[0]
    kw = {"inputImageFile": str(image), "input_mpp": 0.25, "device": "cpu", "num_workers": 1}
    plain = detect_nuclei(DetectionParams(**kw, precision="float32"))  # type: ignore[arg-type]
    once = len(passes)
    passes.clear()
    flips = detect_nuclei(DetectionParams(**kw, precision="float32", test_time_flips=True))  # type: ignore[arg-type]
    assert once >= 1 and len(passes) == 3 * once
    assert flips.runtime.get("test_time_flips") is True and "test_time_flips" not in plain.runtime
    assert 0.9 < len(flips.nuclei) / len(plain.nuclei) < 1.1
    assert not np.array_equal(flips.nuclei.centroids, plain.nuclei.centroids)
    other = detect_nuclei(DetectionParams(**{**kw, "model": "classical-he"}, test_time_flips=True))  # type: ignore[arg-type]
    assert any("test-time flips are for the U-Nets" in w for w in other.warnings)
    assert "test_time_flips" not in other.runtime


_TINY = (
    'name = "unet-tiny"\narch = "unet"\nseed = 1\n'
    '[data]\ndataset = "bbbc038"\nroot = "."\n'
    '[model]\nmpp = 0.5\nmodality = "fluorescence"\nbase = 8\ndepth = 3\n'
    "[train]\nsteps = 2\nbatch_size = 2\npatch_size = 64\nlr = 0.01\n"
    "[augment]\nnoise = 0.02\n"
)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        # a misspelt table trained without augmentation, silently
        (("[augment]", "[augmnet]"), "unknown table 'augmnet'; did you mean 'augment'?"),
        (
            ("patch_size", "patch_sise"),
            "unknown key 'train.patch_sise'; did you mean 'patch_size'?",
        ),
        (("lr = 0.01", 'lr = "fast"'), "train.lr = 'fast': expected a number"),
        (("steps = 2", 'steps = "thirty"'), "train.steps = 'thirty': expected a whole number"),
        # 0 steps from random weights would export untrained weights
        (("steps = 2", "steps = 0"), "train.steps = 0 trains nothing"),
        (("steps = 2", "steps = -5"), "train.steps = -5: expected at least 0"),
        # TOML's inf: a traceback for the steps, NaN losses for the learning rate
        (("steps = 2", "steps = inf"), "train.steps = inf: expected a whole number"),
        (("lr = 0.01", "lr = inf"), "train.lr = inf: expected a number"),
        # words read only when the training got to them: after the images
        # loaded and the run folder was made, or in a torch traceback
        (
            ("lr = 0.01", 'lr = 0.01\nprecision = "float16"'),
            "train.precision = 'float16': expected float32 or bfloat16",
        ),
        (("lr = 0.01", 'lr = 0.01\ndevice = "tpu"'), "train.device = 'tpu': expected auto or cpu"),
        (("depth = 3", 'depth = 3\nnormalisation = "zscore"'), "model.normalisation = 'zscore'"),
        # lists read only once the folds had trained ("0.5" as "0", "." and "5")
        (
            ("lr = 0.01", 'lr = 0.01\n[cv]\nfg_thresholds = "0.5"'),
            "cv.fg_thresholds = '0.5': expected a non-empty list of numbers from 0 to 1",
        ),
        (("lr = 0.01", "lr = 0.01\n[cv]\nmin_scores = [7]"), "cv.min_scores = [7]: expected"),
        (("lr = 0.01", "lr = 0.01\nscale_range = [1.2, 0.8]"), "expected [least, most] scale"),
        # a string "false" was read as true: the patches were rotated
        (
            ("noise = 0.02", 'noise = 0.02\nrotate = "false"'),
            "augment.rotate = 'false': expected true",
        ),
        (("lr = 0.01", 'lr = 0.01\n[cv]\nmetric = "ajj"'), "cv.metric 'ajj' is not one of"),
        (("lr = 0.01", "lr = 0.01\n[cv]\nfolds = 1"), "cv.folds = 1: expected at least 2"),
        # a whole number past any training's: failed in the first batch
        (("batch_size = 2", "batch_size = 1e30"), "train.batch_size = 1e+30: expected at most"),
        (("patch_size = 64", "patch_size = 100000"), "train.patch_size = 100000: expected at most"),
        # read when the network was built, after the images had loaded
        (("depth = 3", 'depth = 3\nchannels = "16"'), "model.channels = '16': U-Net channels must"),
        (("depth = 3", "depth = 3\nchannels = [8, 0]"), "model.channels = [8, 0]: U-Net channels"),
        # a string was read letter by letter: groups "o", "r", "g", "a", "n", none reported
        (
            ("lr = 0.01", 'lr = 0.01\n[cv]\nreport_groups = "organ"'),
            "cv.report_groups = 'organ': expected a list of group names",
        ),
        (
            ("lr = 0.01", 'lr = 0.01\n[cv]\ntune_on = "fluorescence"'),
            "cv.tune_on = 'fluorescence': expected one group as \"key=value\"",
        ),
        (('"bbbc038"', '"monusegg"'), "unknown dataset 'monusegg'; known:"),
        (("mpp = 0.5", "mpp = 0"), "model.mpp = 0: expected microns per pixel"),
        (("[train]\nsteps = 2\nbatch_size = 2\npatch_size = 64\nlr = 0.01\n", ""), "no [train]"),
        (('root = "."\n', ""), "no data.root"),
    ],
)
def test_a_config_that_cannot_work_is_one_line_before_anything_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: tuple[str, str], words: str
) -> None:
    from benchmark.__main__ import main

    old, new = change
    assert old in _TINY
    config = tmp_path / "tiny.toml"
    config.write_text(_TINY.replace(old, new))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {config}: ") and "\n" not in err, err
    assert words in err, err
    assert not (tmp_path / "run").exists()


def test_every_shipped_config_passes_the_check() -> None:
    from benchmark.training.run import load_config

    for config in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml")):
        load_config(config)  # raises on a key the check does not know


def test_a_resume_with_another_network_or_a_cut_checkpoint_is_one_line(
    shared_data: Path, tmp_path: Path
) -> None:
    """--resume after changing what the weights depend on (the network's
    width, the learning rate) names the keys instead of a size-mismatch
    traceback or a silent mix of two configs; the step count may change.
    A checkpoint is replaced whole, so a run killed while saving resumes
    from the previous one."""
    from benchmark.training.unet import train_unet

    imgs = _tiny_images(shared_data)
    cfg = _cfg()
    out = tmp_path / "run"
    ckpt = train_unet(cfg, imgs, out, steps=10, progress=False)
    for table, key, value in (("model", "base", 12), ("train", "lr", 0.02)):
        other = {**cfg, table: {**cfg[table], key: value}}
        with pytest.raises(ValueError, match=rf"another config \({table}\.{key} differ\)"):
            train_unet(other, imgs, out, steps=20, resume=True, progress=False)
    train_unet(cfg, imgs, out, steps=20, resume=True, progress=False)
    assert "resumed at 10 of 20 steps" in (out / "train.log").read_text()

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # while torch.save writes

    import torch

    good = ckpt.read_bytes()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "save", killed)
        with pytest.raises(KeyboardInterrupt):
            train_unet(cfg, imgs, out, steps=30, resume=True, progress=False)
    assert ckpt.read_bytes() == good
    assert [p.name for p in out.iterdir() if p.name.endswith(".partial")] == []
    ckpt.write_bytes(good[: len(good) // 2])  # what a save cut short by an older version left
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        train_unet(cfg, imgs, out, steps=30, resume=True, progress=False)


def test_an_export_without_cross_validation_says_so(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``--skip_cv`` export's card says it has no held-out metrics and that
    its thresholds are the config's defaults, and names the CPU's model."""
    from benchmark.__main__ import main
    from benchmark.training import run
    from benchmark.training.common import cpu_model

    imgs = _tiny_images(shared_data)
    monkeypatch.setattr(run, "_images", lambda cfg: imgs)
    config = tmp_path / "tiny.toml"
    config.write_text(_TINY)
    argv = ["train", "--config", str(config), "--out", str(tmp_path / "run"), "--skip_cv"]
    assert main([*argv, "--export", str(tmp_path / "weights")]) == 0
    card = (tmp_path / "weights" / "unet-tiny.md").read_text()
    assert "Not cross-validated (trained with `--skip_cv`)" in card
    assert "(no cross-validation)" in card and "min more" not in card
    assert cpu_model() in card
