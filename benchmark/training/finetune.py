"""``nucleus-bench finetune``: a shipped U-Net adapted to your labelled fields.

It writes the training config that fine-tuning needs, from the starting
model's own config (network, input, augmentation and watershed grid as it
was trained) with your data, ``train.init_from`` pinned to its sha256, a
small learning rate, as many cross-validation folds as the fields allow,
and a card naming your data; then trains it as ``nucleus-bench train``
would. The config is kept in the run folder (``<out>/config.yaml``), so
the run can be resumed, re-exported or read later.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

from .common import REPO

logger = logging.getLogger(__name__)

#: measured on DeepLIIF (benchmark/EXPERIMENTS.md, "Fine-tuning"): 1e-4 beat 5e-4 and 2e-3
DEFAULT_LR = 1e-4
DEFAULT_STEPS = 1000
# [data] keys that describe the starting model's own dataset, not the user's
_THEIR_DATA = (
    "foreground_only_masks",
    "pseudo_instances",
    "foreground_mask_erosion",
    "extra",
    "default_mpp",
    "modality",
)
# [cv] keys about the starting model's dataset (its groups: unet-bbbc038 tunes
# on its fluorescence images) or its long schedule
_THEIR_CV = ("report_groups", "tune_on", "steps", "labelled_fraction")


def finetune_config(
    start: str,
    *,
    dataset: str,
    root: str,
    name: str,
    mpp: float | None = None,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    folds: int = 3,
    license: str = "",
    data_description: str = "",
    description: str = "",
) -> dict[str, Any]:
    """The training config that fine-tunes shipped model ``start`` on ``dataset`` at ``root``.

    Raises ``ValueError`` (one line) for an unknown or non-U-Net starting
    model, a starting model whose config is not in the repository, a
    ``name`` that is already a shipped model, or fewer than two labelled
    images (a cross-validation needs two).
    """
    from nucleus_models.detection import mpp_problem

    from ..datasets import DatasetError, get_dataset
    from .run import load_config
    from .unet import shipped_card, starting_weights

    if mpp is not None and (why := mpp_problem(mpp)):
        raise ValueError(f"--mpp {mpp:g} (the images' resolution): {why}")
    if int(steps) < 0:
        raise ValueError(f"--steps {steps}: expected 0 or more")
    if int(folds) < 2:  # (it was raised to 2 unsaid; the card then said 2-fold)
        raise ValueError(f"--folds {folds}: a cross-validation needs 2 or more")
    if not (math.isfinite(float(lr)) and float(lr) > 0):  # (inf: NaN weights, exported)
        raise ValueError(f"--lr {lr}: expected a positive learning rate (default 1e-4)")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
        # (it names the weight files and the CLI's menu entry)
        raise ValueError(
            f"--name {name!r}: letters, digits, '.', '_' and '-' only, e.g. unet-monuseg-mysite"
        )
    card = json.loads(shipped_card(start, "--from").read_text())
    name_clash(name, start)
    their_config = REPO / str(card.get("training", {}).get("config", ""))
    if not their_config.is_file():
        raise ValueError(
            f"--from: {start}'s training config ({their_config}) is not in this checkout"
        )
    try:
        ds = get_dataset(dataset, root)
        labelled = [s for s in (ds.load(sid) for sid in ds.ids()) if s.labels is not None]
    except DatasetError as exc:
        raise ValueError(str(exc)) from None
    except KeyError as exc:  # an unknown dataset name
        raise ValueError(str(exc.args[0] if exc.args else exc)) from None
    n = len(labelled)
    if n < 2:
        raise ValueError(
            f"{root}: {n} labelled image(s); fine-tuning cross-validates, so it needs two or more"
        )
    base = load_config(their_config)
    spec = card["spec"]
    unscaled = sum(1 for s in labelled if s.mpp is None)
    if unscaled and not mpp and not base["data"].get("rescale_to_diameter"):
        # they would be taken as already at the model's resolution, silently
        raise ValueError(
            f"{root}: {unscaled} of the {n} labelled images carry no resolution: give --mpp "
            f"(their microns per pixel) or write mpp.txt ({start} works at {spec['mpp']} um/px)"
        )
    other = sum(1 for s in labelled if s.modality != spec["modality"])
    if other:
        logger.warning(
            "%d of the %d labelled images look %s; %s was trained on %s images "
            "(`nucleus-bench models` lists each model's modality)",
            other,
            n,
            "fluorescence" if spec["modality"] == "brightfield" else "brightfield",
            start,
            spec["modality"],
        )
    cfg: dict[str, Any] = {
        k: copy.deepcopy(v) for k, v in base.items() if not k.startswith("_") and k != "card"
    }
    cfg["name"] = name
    data = {k: v for k, v in base["data"].items() if k not in _THEIR_DATA}
    data.update(dataset=dataset, root=str(Path(root).resolve()))
    if mpp:
        data["default_mpp"] = float(mpp)
    cfg["data"] = data
    train = {k: v for k, v in base["train"].items() if k not in ("init_from", "init_sha256")}
    train.update(init_from=start, steps=int(steps), lr=float(lr))
    cfg["train"] = train
    cfg["model"] = {k: v for k, v in base["model"].items() if k != "cpu_int8"}
    # the checks a training run makes (a U-Net, the same network), and the pin
    init = starting_weights(cfg)
    assert init is not None
    train["init_sha256"] = init["sha256"]
    cv = {k: v for k, v in base.get("cv", {}).items() if k not in _THEIR_CV}
    cv["folds"] = max(2, min(int(folds), n))
    cfg["cv"] = cv
    what = data_description or f"{n} labelled images of the {dataset} dataset at {root}"
    cfg["card"] = {
        "description": description
        or f"Nucleus instance segmentation (compact U-Net + watershed): {start} fine-tuned "
        f"on {what.rstrip('.')}.",
        "data": what,
        "license": license or f"not stated (the terms of the images at {root})",
    }
    return cfg


def name_clash(name: str, start: str) -> None:
    """A one-line ``ValueError`` when ``name`` is already a registered model:
    a weight-free one (its name would shadow the export, which is then never
    loaded), a shipped one, or an earlier export (then: how to continue it)."""
    from nucleus_models.models import list_models
    from nucleus_models.models.weights import WEIGHTS_DIR

    card_path = WEIGHTS_DIR / f"{name}.json"
    if name != start and name not in list_models() and not card_path.exists():
        return
    other = f"{start}-mysite" if name != f"{start}-mysite" else f"{name}-2"
    try:
        training = json.loads(card_path.read_text()).get("training", {})
    except (OSError, ValueError):
        training = {}
    config = training.get("config")
    if training.get("init_from") and config:
        run = Path(config).parent
        raise ValueError(
            f"--name {name!r} is already exported, a fine-tune of "
            f"{training['init_from'].get('name', '?')} ({card_path}): pick a new name "
            f"(e.g. {other}), or continue or export that run again with "
            f"`nucleus-bench train --config {config} --out {run} --resume --export`"
        )
    raise ValueError(f"--name {name!r} is a shipped model: pick a new name (e.g. {other})")


def check_resume(cfg: dict[str, Any], out_dir: str | Path) -> None:
    """Before ``--resume`` rewrites ``<out_dir>/config.yaml``: a one-line
    ``ValueError`` when the run's checkpoints were trained with other
    settings than ``cfg`` (training would refuse them, and the run's own
    config would be lost to the refused one)."""
    import tempfile

    import torch

    from .common import settings_changes, training_settings
    from .run import load_config

    out = Path(out_dir)
    ckpts = sorted(out.glob("cv/fold*/checkpoint.pt")) + sorted(out.glob("final/checkpoint.pt"))
    if not ckpts:
        return
    with tempfile.TemporaryDirectory() as tmp:  # read back as training reads it
        want = training_settings(load_config(write_config(cfg, tmp)))
    for path in ckpts:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError):
            continue  # (training names an unreadable checkpoint itself)
        if changed := settings_changes(state, want):
            raise ValueError(
                f"--resume: {path} was trained with other settings ({', '.join(changed[:5])} "
                f"differ); {out / 'config.yaml'} is left as it was: give the options the run "
                "was made with, or train again without --resume"
            )


def write_config(cfg: dict[str, Any], out_dir: str | Path) -> Path:
    """``cfg`` as ``<out_dir>/config.yaml`` (written whole); returns the path."""
    import yaml

    from nucleus_models.io.atomic import atomic_write

    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ValueError(f"--out {out_dir} is a file, not a folder")
    path = Path(out_dir) / "config.yaml"
    head = (
        "# written by nucleus-bench finetune; train again with\n"
        f"#   nucleus-bench train --config {path} --out {out_dir} --resume --export\n"
    )
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(head + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return path
