"""Fine-tuning a shipped U-Net (``train.init_from``) and the ``folder`` dataset
of one's own labelled images."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from nucleus_models.errors import ModelError


def _write_folder(root: Path, shared_data: Path, n: int = 3, size: int = 96) -> list[str]:
    """``n`` crops of BBBC038 images written as a ``folder`` dataset (PNG
    images, 16-bit TIFF label masks); returns their ids."""
    import tifffile
    from PIL import Image

    from benchmark.datasets import get_dataset
    from benchmark.datasets.base import to_rgb_uint8

    ds = get_dataset("bbbc038", shared_data / "dsb2018_bbbc038")
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    ids = []
    for sid in ds.ids():
        s = ds.load(sid)
        if s.modality != "fluorescence" or min(s.labels.shape) < size:
            continue
        lab = s.labels[:size, :size]
        if lab.max() == 0:
            continue
        Image.fromarray(to_rgb_uint8(s.image[:size, :size])).save(root / "images" / f"{sid}.png")
        tifffile.imwrite(root / "masks" / f"{sid}.tif", lab.astype(np.uint16))
        ids.append(sid)
        if len(ids) == n:
            break
    return ids


def test_a_folder_of_images_and_label_masks_loads_as_a_dataset(
    shared_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from PIL import Image

    from benchmark.datasets import DatasetError, fingerprint, get_dataset

    root = tmp_path / "mine"
    ids = _write_folder(root, shared_data)
    ds = get_dataset("folder", root)
    assert sorted(ds.ids()) == sorted(ids) and len(ds) == 3
    s = ds.load(ids[0])
    assert s.image.shape == (96, 96, 3) and s.labels.dtype == np.int32
    assert s.mpp is None and s.modality == "fluorescence"  # grey stored as RGB
    # a pseudo-coloured DAPI field (a fluorescence slide's, cut by `fields`)
    # is fluorescence too, an H&E crop brightfield
    grey = np.asarray(Image.open(root / "images" / f"{ids[0]}.png"))[..., 0]
    blue = np.stack([np.zeros_like(grey), grey // 5, grey], axis=2)
    Image.fromarray(blue).save(root / "images" / f"{ids[0]}.png")
    assert get_dataset("folder", root).load(ids[0]).modality == "fluorescence"
    he = get_dataset("monuseg", shared_data / "monuseg2018" / "train")
    Image.fromarray(he.load(he.ids()[0]).image[:96, :96]).save(root / "images" / f"{ids[0]}.png")
    assert get_dataset("folder", root).load(ids[0]).modality == "brightfield"
    # the labels are the mask's integers, unchanged
    import tifffile

    assert np.array_equal(s.labels, tifffile.imread(root / "masks" / f"{ids[0]}.tif"))
    # mpp.txt gives every image its resolution; it is part of the fingerprint
    before = fingerprint(ds)
    (root / "mpp.txt").write_text("0.25\n")
    ds = get_dataset("folder", root)
    assert ds.load(ids[0]).mpp == 0.25 and fingerprint(ds) != before
    # a binary mask: its connected parts become nuclei, with a warning
    two = np.zeros((96, 96), np.uint8)
    two[10:20, 10:20] = two[40:50, 40:60] = 255
    Image.fromarray(two).save(root / "masks" / f"{ids[1]}.png")
    (root / "masks" / f"{ids[1]}.tif").unlink()
    with caplog.at_level(logging.WARNING):
        lab = get_dataset("folder", root).load(ids[1]).labels
    assert sorted(np.unique(lab).tolist()) == [0, 1, 2] and "binary mask" in caplog.text
    # an image without a mask is left out, with a warning
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / "lonely.png")
    with caplog.at_level(logging.WARNING):
        assert "lonely" not in get_dataset("folder", root).ids()
    assert "without a mask" in caplog.text
    # bad masks and layouts are one-line errors naming the file
    Image.fromarray(np.zeros((90, 96), np.uint8)).save(root / "masks" / f"{ids[2]}.png")
    (root / "masks" / f"{ids[2]}.tif").unlink()
    with pytest.raises(DatasetError, match=r"mask shape \(90, 96\) differs") as err:
        get_dataset("folder", root).load(ids[2])
    assert "\n" not in str(err.value) and f"{ids[2]}.png" in str(err.value)
    colour = np.zeros((96, 96, 3), np.uint8)
    colour[5:9, 5:9] = (255, 0, 0)
    Image.fromarray(colour).save(root / "masks" / f"{ids[2]}.png")
    with pytest.raises(DatasetError, match="colour image"):
        get_dataset("folder", root).load(ids[2])
    (root / "mpp.txt").write_text("fast\n")
    with pytest.raises(DatasetError, match="not a number of microns per pixel"):
        get_dataset("folder", root)
    (root / "mpp.txt").unlink()
    (tmp_path / "nomasks" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError, match="missing masks/"):
        get_dataset("folder", tmp_path / "nomasks")
    with pytest.raises(DatasetError, match="missing images/"):
        get_dataset("folder", root / "images")
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "labels").mkdir()
    with pytest.raises(DatasetError, match="no image in images/ has a mask"):
        get_dataset("folder", empty)


def test_a_jpeg_mask_is_named_as_not_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A mask saved as JPEG is not read (lossy); the error or warning says so,
    instead of "0 masks" beside the file the user sees there."""
    from PIL import Image

    from benchmark.datasets import DatasetError, get_dataset

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "masks" / "a.jpg")
    with pytest.raises(DatasetError, match=r"0 masks\); 1 JPEG mask\(s\) not read \(a.jpg\)"):
        get_dataset("folder", tmp_path)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "b.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "masks" / "b.png")
    with caplog.at_level(logging.WARNING):
        assert get_dataset("folder", tmp_path).ids() == ["b"]
    assert "left out (a); 1 JPEG mask(s) not read (a.jpg)" in caplog.text


def _tiny_cfg(**train: object) -> dict:
    return {
        "name": "unet-base",
        "seed": 3,
        "data": {"dataset": "folder", "root": "."},
        "model": {"mpp": 0.5, "modality": "fluorescence", "base": 8, "depth": 3},
        "train": {
            "steps": 30,
            "batch_size": 4,
            "patch_size": 64,
            "lr": 0.01,
            "checkpoint_every": 10,
            "log_every": 1,
            **train,
        },
        "cv": {"fg_thresholds": [0.5], "seed_thresholds": [0.5]},
        "card": {"data": "three BBBC038 crops", "license": "CC0"},
        "_config_path": "test",
    }


@pytest.fixture
def shipped_base(shared_data: Path, tmp_path: Path) -> tuple[Path, list]:
    """A small U-Net trained for 30 steps on three crops and exported with a
    card, as a shipped model is; returns its card and the crops."""
    from benchmark.training.data import load_training_images
    from benchmark.training.run import export
    from benchmark.training.unet import train_unet

    ids = _write_folder(tmp_path / "data", shared_data)
    imgs = load_training_images("folder", tmp_path / "data", mpp=0.5, default_mpp=0.5)
    assert sorted(im.id for im in imgs) == sorted(ids)
    ckpt = train_unet(_tiny_cfg(), imgs, tmp_path / "base", progress=False)
    meta = {"command": "t", "steps": 30, "seconds": 1.0, "hardware": "cpu", "parameters": 1}
    meta |= {"images": ids, "data": "three BBBC038 crops"}
    export(_tiny_cfg(), ckpt, None, tmp_path / "weights", meta)
    return tmp_path / "weights" / "unet-base.json", imgs


def test_fine_tuning_starts_from_the_shipped_weights_and_checks_them(
    shipped_base: tuple[Path, list], tmp_path: Path
) -> None:
    import torch

    from benchmark.training.unet import starting_weights, train_unet

    card, imgs = shipped_base
    shipped = torch.load(card.with_suffix(".pt"), weights_only=True)
    # 0 steps: the model is the starting weights, exactly
    ck = train_unet(_tiny_cfg(init_from=str(card), steps=0), imgs, tmp_path / "f0", progress=False)
    state = torch.load(ck, weights_only=True)
    assert state["step"] == 0 and state["model"].keys() == shipped.keys()
    assert all(torch.equal(state["model"][k], shipped[k]) for k in shipped)
    # a few steps: it starts where the shipped model ended, far below a random network
    tuned = train_unet(
        _tiny_cfg(init_from=str(card), steps=3), imgs, tmp_path / "f3", progress=False
    )
    fresh = train_unet(_tiny_cfg(steps=3), imgs, tmp_path / "s3", progress=False)
    first_tuned = torch.load(tuned, weights_only=True)["history"][0]["loss"]
    first_fresh = torch.load(fresh, weights_only=True)["history"][0]["loss"]
    assert first_tuned < 0.8 * first_fresh
    # the .pt path names the same model as its card
    assert (
        starting_weights(_tiny_cfg(init_from=str(card.with_suffix(".pt"))))["name"] == "unet-base"
    )
    # another network, another input preparation or a pinned sha256 that
    # differs: one-line errors before training
    wide = _tiny_cfg(init_from=str(card))
    wide["model"]["base"] = 12
    with pytest.raises(ValueError, match=r"channels 12/24/48 vs 8/16/32"):
        train_unet(wide, imgs, tmp_path / "x", progress=False)
    rgb = _tiny_cfg(init_from=str(card))
    rgb["model"]["normalisation"] = "rgb"
    with pytest.raises(ValueError, match="normalisation rgb vs percentile"):
        starting_weights(rgb)
    with pytest.raises(ValueError, match="not the train.init_sha256"):
        starting_weights(_tiny_cfg(init_from=str(card), init_sha256="0" * 64))
    with pytest.raises(ValueError, match="no shipped model 'unet-nope'"):
        starting_weights(_tiny_cfg(init_from="unet-nope"))
    with pytest.raises(ValueError, match="no model card"):
        starting_weights(_tiny_cfg(init_from=str(tmp_path / "gone.json")))
    # weights that are not the card's are refused by their checksum
    pt = card.with_suffix(".pt")
    pt.write_bytes(pt.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ModelError, match="sha256 mismatch"):
        train_unet(_tiny_cfg(init_from=str(card)), imgs, tmp_path / "y", progress=False)


def test_a_fine_tuned_model_is_cross_validated_exported_and_carded(
    shipped_base: tuple[Path, list], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``nucleus-bench train`` on a ``folder`` dataset with ``init_from``: the
    fold models start from the shipped weights too, the card names them and
    their license, and says that the CV is not held out for images the
    starting model trained on."""
    from benchmark.__main__ import main
    from benchmark.training.run import load_config

    card, _ = shipped_base
    cfg = tmp_path / "ft.toml"
    cfg.write_text(
        'name = "unet-ft"\narch = "unet"\nseed = 1\n'
        f'[data]\ndataset = "folder"\nroot = "{tmp_path / "data"}"\ndefault_mpp = 0.5\n'
        '[model]\nmpp = 0.5\nmodality = "fluorescence"\nbase = 8\ndepth = 3\n'
        f'[train]\ninit_from = "{card}"\nsteps = 2\nbatch_size = 2\npatch_size = 64\nlr = 0.001\n'
        "[cv]\nfolds = 3\nfg_thresholds = [0.5]\nseed_thresholds = [0.5]\n"
        '[card]\ndata = "the same crops"\nlicense = "CC BY 4.0"\n'
    )
    sha = json.loads(card.read_text())["spec"]["sha256"]
    assert load_config(cfg)["train"]["init_sha256"] == sha
    out = tmp_path / "weights-ft"
    with caplog.at_level(logging.WARNING):
        rc = main(
            ["train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--export", str(out)]
        )
    assert rc == 0
    assert "3 of these 3 images trained unet-base" in caplog.text
    shipped = json.loads((out / "unet-ft.json").read_text())
    assert shipped["training"]["init_from"]["sha256"] == sha
    assert len(shipped["training"]["init_from"]["images_seen"]) == 3
    assert shipped["spec"]["license"] == "CC BY 4.0; from the starting weights (unet-base): CC0"
    md = (out / "unet-ft.md").read_text()
    assert f"fine-tuned from `unet-base` (sha256 `{sha}`" in md
    assert "trained on three BBBC038 crops" in md and "3 of the images here" in md
    # a config whose starting model does not fit is a one-line error from the command line
    cfg.write_text(cfg.read_text().replace("base = 8", "base = 6"))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run2")]) == 2


def test_finetune_command_writes_the_config_and_trains_from_a_shipped_model(
    shared_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys
) -> None:
    """``nucleus-bench finetune``: the starting model's own config with the
    user's data, the weights pinned, a small learning rate and one fold per
    image at most; trained, cross-validated and exported with a card."""
    import yaml
    from PIL import Image

    from benchmark.__main__ import main
    from benchmark.datasets import get_dataset
    from nucleus_models.models.weights import WEIGHTS_DIR

    ds = get_dataset("monuseg", shared_data / "monuseg2018" / "train")
    root = tmp_path / "mine"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    ids = [sid for sid in ds.ids() if ds.load(sid).labels is not None][:3]
    for sid in ids:
        s = ds.load(sid)
        Image.fromarray(s.image[:320, :320, :3]).save(root / "images" / f"{sid}.png")
        Image.fromarray(s.labels[:320, :320].astype(np.uint16)).save(root / "masks" / f"{sid}.png")
    (root / "mpp.txt").write_text("0.25\n")
    out, weights = tmp_path / "run", tmp_path / "weights"
    args = ["finetune", "--from", "unet-monuseg", "--root", str(root), "--out", str(out)]
    args += ["--name", "unet-monuseg-mine", "--license", "CC BY 4.0"]
    with caplog.at_level(logging.WARNING):
        assert main([*args, "--steps", "2", "--folds", "5", "--export", str(weights)]) == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    card = json.loads((WEIGHTS_DIR / "unet-monuseg.json").read_text())
    assert cfg["train"]["init_from"] == "unet-monuseg"
    assert cfg["train"]["init_sha256"] == card["spec"]["sha256"]
    assert cfg["train"]["lr"] == 1e-4 and cfg["train"]["steps"] == 2
    assert cfg["cv"]["folds"] == 3  # one per image at most
    assert "report_groups" not in cfg["cv"] and "steps" not in cfg["cv"]
    assert cfg["data"] == {
        "dataset": "folder",
        "root": str(root),
        "label_resize": "area",
    }
    assert cfg["model"]["base"] == 12 and "cpu_int8" not in cfg["model"]
    # the crops are of unet-monuseg's own training images: said, not hidden
    assert "3 of these 3 images trained unet-monuseg" in caplog.text
    shipped = json.loads((weights / "unet-monuseg-mine.json").read_text())
    assert shipped["spec"]["description"] == (
        "Nucleus instance segmentation (compact U-Net + watershed): unet-monuseg fine-tuned on "
        f"3 labelled images of the folder dataset at {root}."
    )
    assert shipped["spec"]["license"].startswith("CC BY 4.0; from the starting weights")
    assert shipped["training"]["init_from"]["sha256"] == card["spec"]["sha256"]
    assert len(shipped["cv"]["folds"]) == 3
    assert "cross-validation (3 folds)" in capsys.readouterr().out
    # what cannot work is one line and status 2, before anything is trained
    for bad, message in [
        (["--name", "unet-monuseg"], "is a shipped model"),
        (["--from", "unet-nosuch"], "no shipped model 'unet-nosuch'"),
        (["--from", "classical-he"], "'classical-he' has no trained weights to start from"),
        # (-1 resized every image to 1 x 1 px and trained on that)
        (["--mpp", "-1"], "--mpp -1 (the images' resolution): expected microns per pixel"),
        (["--mpp", "0"], "--mpp 0 (the images' resolution): expected"),
        (["--dataset", "nope"], "unknown dataset 'nope'"),
        (["--lr", "-1"], "--lr -1"),
        (["--lr", "inf"], "--lr inf: expected a positive learning rate"),
        (["--folds", "1"], "--folds 1: a cross-validation needs 2 or more"),
        (["--name", "x y/../z"], "letters, digits"),
    ]:
        assert main([*args, *bad, "--out", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err
    assert main([*args, "--out", str(root / "mpp.txt"), "--config_only"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    # images of unknown resolution would be taken as at the model's: refused
    (root / "mpp.txt").unlink()
    assert main([*args, "--out", str(tmp_path / "bad")]) == 2
    assert "3 of the 3 labelled images carry no resolution: give --mpp" in capsys.readouterr().err
    for sid in ids[1:]:
        (root / "masks" / f"{sid}.png").unlink()
    assert main([*args, "--out", str(tmp_path / "bad")]) == 2
    assert "needs two or more" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_finetune_from_the_fluorescence_model(
    shared_data: Path, tmp_path: Path, capsys, caplog: pytest.LogCaptureFixture
) -> None:
    """``finetune --from unet-bbbc038`` on a folder of fluorescence fields: the
    size normalisation is kept, its tuning on BBBC038's fluorescence group is
    not (the user's folder has no such group), and the run exports."""
    from benchmark.__main__ import main
    from benchmark.training.finetune import finetune_config

    root = tmp_path / "mine"
    ids = _write_folder(root, shared_data, n=3, size=200)
    assert len(ids) == 3
    name = "unet-bbbc038-mine"
    # no resolution is needed: the model sizes the nuclei itself
    cfg = finetune_config("unet-bbbc038", dataset="folder", root=str(root), name=name)
    assert "tune_on" not in cfg["cv"] and cfg["data"]["rescale_to_diameter"]
    # fluorescence fields under an H&E model: said (and a resolution is needed there)
    with caplog.at_level(logging.WARNING):
        finetune_config("unet-monuseg", dataset="folder", root=str(root), name=name, mpp=0.3)
    assert (
        "3 of the 3 labelled images look fluorescence; unet-monuseg was trained on brightfield"
        in caplog.text
    )
    out, weights = tmp_path / "run", tmp_path / "weights"
    args = ["finetune", "--from", "unet-bbbc038", "--root", str(root), "--name", name]
    args += ["--out", str(out), "--steps", "2", "--folds", "2", "--export", str(weights)]
    assert main(args) == 0, capsys.readouterr().err
    shipped = json.loads((weights / f"{name}.json").read_text())
    assert shipped["cv"]["tuned_on"] == "all" and shipped["cv"]["n_images"] == 3
    assert shipped["spec"]["thresholds"]["diameter_px"] == cfg["data"]["rescale_to_diameter"]


def test_finetune_writes_its_run_where_train_looks_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Without --out both commands use runs/<name> under the current folder,
    so the README's `train --config runs/<name>/config.yaml` follow-up finds
    the config wherever the user works (not in the installed package's tree)."""

    from benchmark.__main__ import main

    root = tmp_path / "mine"
    _random_fields(root)
    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    args = ["finetune", "--from", "unet-monuseg", "--root", str(root), "--name", "site-x"]
    assert main([*args, "--license", "CC BY 4.0", "--config_only"]) == 0
    assert (work / "runs" / "site-x" / "config.yaml").is_file()
    assert "config: runs/site-x/config.yaml" in capsys.readouterr().out


def _random_fields(root: Path, n: int = 2) -> None:
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(
            root / "images" / f"f{i}.png"
        )
        lab = np.zeros((64, 64), np.uint16)
        lab[10:20, 10:20] = 1
        Image.fromarray(lab).save(root / "masks" / f"f{i}.png")
    (root / "mpp.txt").write_text("0.25\n")


def test_a_name_taken_by_any_model_is_refused_and_an_export_says_how_to_continue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A weight-free model's name (classical-he) would shadow the export, which
    the registry then never loads: refused like a shipped name, before anything
    is written, by `finetune` and by `train --export`. The user's own earlier
    export is not called shipped, and the message says how to export it again."""
    import shutil

    from benchmark.__main__ import main
    from benchmark.training.finetune import finetune_config
    from benchmark.training.run import REPO, train_from_config
    from nucleus_models.models import weights

    root = tmp_path / "mine"
    _random_fields(root)
    args = ["finetune", "--from", "unet-monuseg", "--root", str(root), "--config_only"]
    for name in ("classical-he", "histomicstk-kofahi"):
        assert main([*args, "--name", name, "--out", str(tmp_path / "run")]) == 2
        assert f"--name {name!r} is a shipped model" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    text = (REPO / "configs" / "unet-monuseg.toml").read_text()
    config = tmp_path / "builtin.toml"
    config.write_text(text.replace('name = "unet-monuseg"', 'name = "classical-he"', 1))
    with pytest.raises(ValueError, match="'classical-he' is a built-in model without weights"):
        train_from_config(config, out_dir=tmp_path / "run", export_to=tmp_path / "w")
    assert not (tmp_path / "run").exists() and not (tmp_path / "w").exists()

    # an earlier export of the user's own fine-tuning
    wdir = tmp_path / "weights"
    wdir.mkdir()
    shutil.copy(weights.WEIGHTS_DIR / "unet-monuseg.json", wdir)
    mine = {"init_from": {"name": "unet-monuseg"}, "config": "runs/site/config.yaml"}
    (wdir / "site.json").write_text(json.dumps({"spec": {"name": "site"}, "training": mine}))
    monkeypatch.setattr(weights, "WEIGHTS_DIR", wdir)
    with pytest.raises(ValueError) as err:
        finetune_config("unet-monuseg", dataset="folder", root=str(root), name="site")
    message = str(err.value)
    assert "shipped" not in message and "already exported" in message
    assert "nucleus-bench train --config runs/site/config.yaml --out runs/site --resume" in message


def test_finetune_resume_with_other_settings_keeps_the_runs_config(tmp_path: Path, capsys) -> None:
    """`finetune --resume` with an option the run's checkpoints were not made
    with is refused before its config.yaml is replaced: the run keeps the
    config its checkpoints match (the one `train --resume --export` needs)."""
    import torch

    from benchmark.__main__ import main
    from benchmark.training.common import training_settings
    from benchmark.training.run import load_config

    root, out = tmp_path / "mine", tmp_path / "run"
    _random_fields(root)
    args = ["finetune", "--from", "unet-monuseg", "--root", str(root), "--name", "site-y"]
    args += ["--out", str(out), "--steps", "1", "--folds", "2"]
    assert main([*args, "--config_only"]) == 0
    before = (out / "config.yaml").read_text()
    # a fold checkpoint as training leaves it (only what the check reads)
    settings = training_settings(load_config(out / "config.yaml"))
    (out / "cv" / "fold0").mkdir(parents=True)
    torch.save({"training_settings": settings}, out / "cv" / "fold0" / "checkpoint.pt")
    capsys.readouterr()
    assert main([*args, "--lr", "0.001", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "train.lr differ" in err and err.count("\n") == 1
    assert (out / "config.yaml").read_text() == before


def test_a_weight_free_model_as_the_start_is_called_so() -> None:
    """``finetune --from classical-he`` said "no shipped model 'classical-he'",
    though the model ships and runs; what it lacks is weights to start from."""
    from benchmark.training.unet import shipped_card

    with pytest.raises(ValueError) as info:
        shipped_card("classical-he", "--from")
    msg = str(info.value)
    assert msg.startswith("--from: 'classical-he' has no trained weights to start from"), msg
    assert "unet-monuseg" in msg and "no shipped model" not in msg, msg
    with pytest.raises(ValueError, match="no shipped model 'unet-nope'"):
        shipped_card("unet-nope", "--from")
