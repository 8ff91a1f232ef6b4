"""``nucleus-bench train --config CONFIG``: cross-validate, train, export with a model card."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tomllib

from nucleus_models.models.unet import NORMALISATIONS, STAIN_NORMALISATIONS

from .common import (
    REPO,
    cv_fingerprint,
    data_paths,
    fold_seconds,
    invocation_text,
    mean_metrics,
    shipped_state,
    trained_on,
    training_lines,
    training_record,
    write_weights,
)
from .data import (
    BOUNDARY_TARGETS,
    LABEL_RESIZES,
    TrainImage,
    input_normalisation,
    label_resize_of,
    load_training_images,
    stain_normalisation_of,
    stain_normalise_images,
)
from .unet import TRAIN_PRECISIONS, starting_weights, unet_arch

# a size-normalised model's CV searches the scale again on the final
# instances of the setting chosen at most this many times (after the first
# search on the foreground map) to reach the setting it was measured with
MAX_SIZE_PASSES = 3
#: the config's ``arch``: the U-Net, or one of torchvision's detectors
#: (:data:`nucleus_models.models.torchvision_detectors.ARCHS`)
ARCHS = ("unet", "fasterrcnn", "fcos", "maskrcnn")

__all__ = ["load_config", "train_from_config", "kfold"]

log = logging.getLogger(__name__)


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a training config, TOML (``.toml``) or YAML (``.yaml``/``.yml``, the
    same tables as mappings); relative data paths are taken from the
    repository root.  A file that does not parse, or whose top level is not
    a table, is a ``ValueError`` naming the file."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise ValueError(
            f"{p}: a training config is .toml, .yaml or .yml, not {p.suffix or 'no suffix'!r}"
        )
    if not p.is_file():
        raise ValueError(f"config not found: {p}")
    text = p.read_text()
    if suffix == ".toml":
        try:
            cfg = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{p}: not a valid TOML config: {exc}") from None
    else:
        import yaml

        try:
            cfg = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(
                f"{p}: not a valid YAML config: {' '.join(str(exc).split())}"
            ) from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{p}: a training config is a table of sections, not {type(cfg).__name__}")
    extra = cfg.get("data", {}).get("extra", []) if isinstance(cfg.get("data"), dict) else []
    if not isinstance(extra, list) or not all(
        isinstance(e, dict) and "dataset" in e and "root" in e for e in extra
    ):
        raise ValueError(
            f"{p}: data.extra must be a list of tables with 'dataset' and 'root' "
            "([[data.extra]] in TOML)"
        )
    check_config(cfg, str(p))
    for table, key in data_paths(cfg):
        if not Path(table[key]).is_absolute():
            table[key] = str((REPO / table[key]).resolve())
    cfg.setdefault("name", p.stem)
    cfg.setdefault("arch", "unet")
    cfg["_config_path"] = str(p)
    if cfg.get("train", {}).get("init_from"):  # (a U-Net's: check_config refused it elsewhere)
        try:
            init = starting_weights(cfg)
        except ValueError as exc:
            raise ValueError(f"{p}: {exc}") from None
        # the starting weights are part of what the cross-validation measured
        cfg["train"]["init_sha256"] = init["sha256"] if init else None
    return cfg


#: every key a training config may hold, by table (``""``: the top level);
#: ``check_config`` refuses others, so a misspelt key is not silently ignored
CONFIG_KEYS: dict[str, frozenset[str]] = {
    "": frozenset({"name", "arch", "seed", "data", "model", "train", "augment", "cv", "card"}),
    "data": frozenset(
        {
            "dataset", "root", "extra", "default_mpp", "label_resize",
            "foreground_only_masks", "foreground_mask_erosion", "pseudo_instances",
            "rescale_to_diameter", "synthetic_images", "synthetic_max_overlap",
        }
    ),
    "data.extra": frozenset({"dataset", "root", "modality", "mpp", "weight"}),
    "model": frozenset(
        {
            "mpp", "modality", "normalisation", "stain_normalisation", "base", "depth",
            "channels", "min_area", "tile_size", "tile_overlap", "batch_size",
            "max_nucleus_diameter_um", "color", "cpu_bfloat16", "cpu_int8", "tta",
            "fpn_channels", "detections_per_img", "score_threshold", "nms_iou", "mask_threshold",
        }
    ),
    "train": frozenset(
        {
            "steps", "lr", "batch_size", "patch_size", "optimizer", "weight_decay", "clip_grad",
            "precision", "device", "threads", "ema", "scale_range", "boundary_target",
            "boundary_weight", "distance_weight", "outline_weight", "outline_band_px",
            "focal_gamma", "min_instance_area", "log_every", "checkpoint_every", "init_from",
            "init_sha256",
        }
    ),
    "augment": frozenset(
        {
            "rotate", "elastic", "elastic_sigma", "hue_shift", "stain_jitter", "brightness",
            "noise", "grayscale", "blur", "vesicular",
        }
    ),
    "cv": frozenset(
        {
            "folds", "steps", "metric", "tune_on", "report_groups", "labelled_fraction",
            "fg_thresholds", "seed_thresholds", "hmax_h", "hmax_smooth", "min_areas",
            "min_scores", "score_thresholds", "nms_ious", "mask_thresholds",
        }
    ),
    "card": frozenset({"data", "description", "license", "earlier_training"}),
}  # fmt: skip
#: keys only the U-Net trainer reads, and only the torchvision detectors
#: (``check_config`` refuses each in a config of the other kind: a detector
#: given ``train.precision = "bfloat16"`` trained in float32, silently)
_UNET_ONLY: dict[str, frozenset[str]] = {
    "model": frozenset({"normalisation", "base", "depth", "channels", "cpu_bfloat16", "cpu_int8", "tta"}),
    "train": frozenset(
        {
            "precision", "ema", "boundary_target", "boundary_weight", "distance_weight",
            "outline_weight", "outline_band_px", "focal_gamma", "init_from", "init_sha256",
        }
    ),
    "cv": frozenset(
        {"fg_thresholds", "seed_thresholds", "hmax_h", "hmax_smooth", "min_areas", "min_scores", "tune_on"}
    ),
}  # fmt: skip
_DETECTOR_ONLY: dict[str, frozenset[str]] = {
    "model": frozenset(
        {"fpn_channels", "detections_per_img", "score_threshold", "nms_iou", "mask_threshold"}
    ),
    # (a U-Net trains with AdamW, unclipped, whatever these say)
    "train": frozenset({"optimizer", "clip_grad", "min_instance_area"}),
    "cv": frozenset({"score_thresholds", "nms_ious", "mask_thresholds"}),
}
#: keys whose value is a whole number / a number, and the least each may be
_WHOLE = {
    "seed": 0, "steps": 0, "batch_size": 1, "patch_size": 16, "threads": 1, "folds": 2,
    "base": 1, "depth": 1, "min_area": 0, "tile_size": 16, "tile_overlap": 0,
    "log_every": 1, "checkpoint_every": 1, "synthetic_images": 0,
    "foreground_mask_erosion": 0,
}  # fmt: skip
#: the most each of these whole numbers may be: far past any training's,
#: short of a typo's (train.batch_size = 1e30 passed as a whole number and
#: failed in the first batch, after the images had loaded)
_MOST = {
    "steps": 10**8, "batch_size": 4096, "patch_size": 8192, "threads": 1024, "folds": 1000,
    "base": 1024, "depth": 10, "tile_size": 16384, "tile_overlap": 4096,
    "synthetic_images": 10**6, "foreground_mask_erosion": 1000,
}  # fmt: skip
_NUMBER = {
    "lr": 0.0, "weight_decay": 0.0, "clip_grad": 0.0, "ema": 0.0, "boundary_weight": 0.0,
    "distance_weight": 0.0, "outline_weight": 0.0, "outline_band_px": 0.0, "focal_gamma": 0.0,
    "min_instance_area": 0.0, "max_nucleus_diameter_um": 0.0, "hue_shift": 0.0,
    "stain_jitter": 0.0, "brightness": 0.0, "noise": 0.0, "grayscale": 0.0, "blur": 0.0,
    "vesicular": 0.0, "elastic": 0.0, "elastic_sigma": 0.0, "labelled_fraction": 0.0,
    "synthetic_max_overlap": 0.0, "weight": 0.0,
}  # fmt: skip

#: keys whose value is one of a few words, and those words (read only when
#: the training got to them: train.precision = "float16" was refused after
#: the images loaded and runs/<name>/final was made, train.device = "tpu"
#: ended in a torch traceback); ``cuda:N`` is a device too
_WORDS: dict[str, tuple[str, ...]] = {
    "train.precision": TRAIN_PRECISIONS,
    "train.device": ("auto", "cpu", "cuda", "mps", ""),
    "train.optimizer": ("adamw", "sgd"),
    "train.boundary_target": BOUNDARY_TARGETS,
    "data.label_resize": LABEL_RESIZES,
    "model.normalisation": NORMALISATIONS,
    "model.stain_normalisation": STAIN_NORMALISATIONS,
    "model.modality": ("brightfield", "fluorescence"),
    "data.extra.modality": ("brightfield", "fluorescence"),
}

#: keys whose value is yes or no: true/false, or 1/0 (a string such as
#: "false" was read as true: augment.rotate = "false" rotated)
_BOOLEAN = frozenset(
    {"data.pseudo_instances", "augment.rotate", "model.cpu_bfloat16", "model.cpu_int8", "model.tta"}
)

#: keys whose value is a list of numbers (cross-validation's grids, read only
#: when the folds had trained: fg_thresholds = "0.5" was tried as "0", "." and
#: "5"), the least and most each may be, and whether the list may be empty
_NUMBER_LISTS: dict[str, tuple[float, float, bool]] = {
    "cv.fg_thresholds": (0.0, 1.0, False),
    "cv.seed_thresholds": (0.0, 1.0, True),
    "cv.hmax_h": (0.0, math.inf, True),
    "cv.hmax_smooth": (0.0, math.inf, False),
    "cv.min_areas": (0.0, math.inf, True),
    "cv.min_scores": (0.0, 1.0, False),
    "cv.score_thresholds": (0.0, 1.0, False),
    "cv.nms_ious": (0.0, 1.0, False),
    "cv.mask_thresholds": (0.0, 1.0, False),
    "train.scale_range": (0.0, math.inf, False),
}


def _looks_numeric(text: str) -> bool:
    """Whether ``text`` is a number written as YAML leaves it text.

    >>> _looks_numeric("1e-4"), _looks_numeric("fast")
    (True, False)
    """
    try:
        float(text)
    except ValueError:
        return False
    return True


def _number_as_text(value: str, where: str) -> str:
    """Why the number ``value`` of config file ``where`` was read as text.

    PyYAML reads ``1e-4`` and ``1e3`` unquoted as text (YAML 1.1 floats need
    a point; TOML reads them as numbers); any other number is text because
    it was written in quotes.

    >>> _number_as_text("2e-3", "c.yaml")
    'YAML reads 2e-3 as text: write it with a point, 2.0e-3'
    >>> _number_as_text("5500", "c.toml")
    'in quotes, it is text: write the number without them'
    """
    import yaml

    if where.endswith((".yaml", ".yml")) and isinstance(yaml.safe_load(value), str):
        pointed = re.sub(r"^([-+]?[0-9]+)([eE])", r"\1.0\2", value)
        return f"YAML reads {value} as text: write it with a point, {pointed}"
    return "in quotes, it is text: write the number without them"


def check_config(cfg: dict[str, Any], where: str) -> None:
    """One ``ValueError`` line for what would otherwise fail late or not at
    all: an unknown table or key (a misspelt ``[augmnet]`` trained without
    augmentation), a missing table or key the training reads, a value of the
    wrong type or out of range, an unknown architecture, dataset or CV metric, 0 steps
    without starting weights, fewer than 2 folds."""
    import difflib

    from benchmark.datasets import list_datasets
    from benchmark.evaluate import INSTANCE_METRICS
    from nucleus_models.detection import mpp_problem

    def unknown(table: str, key: str, value: Any) -> ValueError:
        known = CONFIG_KEYS[table]
        near = difflib.get_close_matches(key, sorted(known), n=1)
        name = f"{table}.{key}" if table else key
        hint = f"; did you mean {near[0]!r}?" if near else f"; known: {', '.join(sorted(known))}"
        kind = "table" if isinstance(value, dict) else "key"
        return ValueError(f"{where}: unknown {kind} {name!r}{hint}")

    def tables(table: str, value: Any) -> list[dict[str, Any]]:
        if table == "data.extra":
            return list(value)
        if not isinstance(value, dict):
            raise ValueError(f"{where}: {table} must be a table ([{table}]), not {value!r}")
        return [value]

    for key in cfg:
        if key not in CONFIG_KEYS[""] and not key.startswith("_"):
            raise unknown("", key, cfg[key])
    arch = cfg.get("arch", "unet")
    if not isinstance(arch, str) or arch not in ARCHS:
        raise ValueError(f"{where}: arch = {arch!r}: expected one of {', '.join(ARCHS)}")
    for table in ("data", "model", "train"):
        if table not in cfg:
            raise ValueError(f"{where}: no [{table}] table")
    other, kind = (_DETECTOR_ONLY, "the detectors") if arch == "unet" else (_UNET_ONLY, "U-Nets")
    for table, keys in other.items():
        if isinstance(cfg.get(table), dict) and (used := sorted(keys & cfg[table].keys())):
            raise ValueError(
                f"{where}: {', '.join(f'{table}.{k}' for k in used)}: for {kind}; "
                f"arch {arch!r} does not read {'it' if len(used) == 1 else 'them'}"
            )
    checks: list[tuple[str, dict[str, Any]]] = [("", cfg)]
    for table in CONFIG_KEYS:
        head, _, sub = table.partition(".")
        if not table or head not in cfg:
            continue
        value = cfg[head] if not sub else cfg[head].get(sub, [])
        for t in tables(table, value):
            for key in t:
                if key not in CONFIG_KEYS[table]:
                    raise unknown(table, key, t[key])
            checks.append((table, t))
    for table, t in checks:
        for key, value in t.items():
            name = f"{table}.{key}" if table else key
            if key in _WHOLE or key in _NUMBER:
                whole = key in _WHOLE
                ok = isinstance(value, int | float) and not isinstance(value, bool)
                # (TOML's inf: steps = inf ended in a traceback, lr = inf trained NaNs)
                ok = ok and math.isfinite(value)
                if not ok or (whole and float(value) != int(value)):
                    want = "a whole number" if whole else "a number"
                    if isinstance(value, str) and _looks_numeric(value):
                        want += f" ({_number_as_text(value, where)})"
                    raise ValueError(f"{where}: {name} = {value!r}: expected {want}")
                least = _WHOLE[key] if whole else _NUMBER[key]
                if value < least:
                    raise ValueError(f"{where}: {name} = {value!r}: expected at least {least}")
                if whole and key in _MOST and value > _MOST[key]:
                    raise ValueError(f"{where}: {name} = {value!r}: expected at most {_MOST[key]}")
            if (limits := _NUMBER_LISTS.get(name)) is not None:
                lo, hi, may_be_empty = limits
                numbers = isinstance(value, list) and all(
                    isinstance(v, int | float) and not isinstance(v, bool) and lo <= v <= hi
                    for v in value
                )
                if not numbers or not (value or may_be_empty):
                    raise ValueError(
                        f"{where}: {name} = {value!r}: expected a{'' if may_be_empty else ' non-empty'}"
                        f" list of numbers from {lo:g} to {hi:g}"
                    )
                if key == "scale_range" and not (len(value) == 2 and 0 < value[0] <= value[1]):
                    raise ValueError(
                        f"{where}: {name} = {value!r}: expected [least, most] scale, 0 < least <= most"
                    )
            if name in _BOOLEAN and not (isinstance(value, bool) or value in (0, 1)):
                raise ValueError(f"{where}: {name} = {value!r}: expected true or false")
            if words := _WORDS.get(name):
                word = value.lower() if key == "optimizer" and isinstance(value, str) else value
                cuda_n = (
                    key == "device" and isinstance(value, str) and re.fullmatch(r"cuda:\d+", value)
                )
                if word not in words and not cuda_n:
                    said = " or ".join(w or '""' for w in words)
                    raise ValueError(f"{where}: {name} = {value!r}: expected {said}")
            if name == "model.channels":
                from nucleus_models.models.unet import unet_channels

                try:  # (read when the network is built: after the images loaded)
                    unet_channels(channels=value)
                except ValueError as exc:
                    raise ValueError(f"{where}: {name} = {value!r}: {exc}") from None
            if name == "cv.report_groups" and not (
                isinstance(value, list) and all(isinstance(v, str) and v for v in value)
            ):
                # (a string "organ" was read as the groups "o", "r", "g", "a", "n")
                raise ValueError(
                    f'{where}: {name} = {value!r}: expected a list of group names, e.g. ["organ"]'
                )
            if name == "cv.tune_on" and not (
                isinstance(value, str) and re.fullmatch(r"[^=\s]+=[^=]+", value)
            ):
                raise ValueError(
                    f"{where}: {name} = {value!r}: expected one group as"
                    ' "key=value", e.g. "modality=fluorescence"'
                )
            if key in ("mpp", "default_mpp") and table in ("model", "data", "data.extra"):
                if why := mpp_problem(value):
                    raise ValueError(f"{where}: {name} = {value!r}: {why}")
    for key in ("dataset", "root"):
        if key not in cfg["data"]:
            raise ValueError(f"{where}: no data.{key}")
    for d in [cfg["data"], *cfg["data"].get("extra", [])]:
        if str(d["dataset"]).lower() not in list_datasets():
            raise ValueError(
                f"{where}: unknown dataset {d['dataset']!r}; known: {', '.join(list_datasets())}"
            )
    if "mpp" not in cfg["model"]:
        raise ValueError(f"{where}: no model.mpp (the resolution the model trains and runs at)")
    tr = cfg["train"]
    if "steps" not in tr:
        raise ValueError(f"{where}: no train.steps")
    if tr["steps"] == 0 and not tr.get("init_from"):
        raise ValueError(
            f"{where}: train.steps = 0 trains nothing; 0 is for re-tuning a model given as "
            "train.init_from"
        )
    metric = cfg.get("cv", {}).get("metric", "aji")
    for m in [metric] if isinstance(metric, str) else list(metric):
        if m not in INSTANCE_METRICS:
            raise ValueError(
                f"{where}: cv.metric {m!r} is not one of {', '.join(INSTANCE_METRICS)}"
            )


def kfold(ids: list[str], k: int, seed: int) -> list[list[str]]:
    """Split ``ids`` into ``k`` folds (seeded shuffle)."""
    order = list(np.random.default_rng(seed).permutation(sorted(ids)))
    return [sorted(str(x) for x in order[i::k]) for i in range(k)]


def cv_folds(
    cfg: dict[str, Any], images: list[TrainImage], only_fold: int | None = None
) -> list[list[str]]:
    """The config's ``cv.folds`` folds of image ids (seeded by ``seed``).

    Only images whose nuclei were outlined one by one are held out;
    pseudo-labelled and synthetic images always train.  Every architecture
    trained from the same data and seed gets the same folds, so their
    cross-validation numbers compare image for image.
    """
    k = int(cfg.get("cv", {}).get("folds", 3))
    if only_fold is not None and not 0 <= only_fold < k:
        raise ValueError(f"--fold {only_fold}: the config has folds 0..{k - 1}")
    return kfold([im.id for im in images if _outlined(im)], k, int(cfg.get("seed", 0)))


def _outlined(im: TrainImage) -> bool:
    """Whether ``im``'s nuclei were outlined one by one (not pseudo-labelled
    from a foreground mask, not artificial): the images CV holds out."""
    return im.has_instances and not im.pseudo and "synthetic" not in im.groups


def truth_source(
    cfg: dict[str, Any],
) -> tuple[Callable[[TrainImage], np.ndarray], Callable[[str], bool]]:
    """``(truth_of, at_native)``: a held-out image's reference labels, and
    whether they are the dataset's own at the image's own resolution (as
    ``nucleus-bench eval`` scores) rather than the resampled training labels
    (images given directly, as in tests)."""
    from benchmark.datasets import DatasetError, get_dataset

    try:
        ds = get_dataset(cfg["data"]["dataset"], cfg["data"]["root"])
        native = set(ds.ids())
    except DatasetError:
        ds, native = None, set()

    def truth_of(im: TrainImage) -> np.ndarray:
        if ds is not None and im.id in native:
            return np.asarray(ds.load(im.id).labels, np.int32)
        return im.labels

    return truth_of, native.__contains__


def group_metrics(
    rows: list[dict[str, float]], groups: list[dict[str, Any]], keys: list[str]
) -> dict[str, dict[str, Any]]:
    """Mean metrics per value of each group key (``cv.report_groups``).

    >>> group_metrics([{"aji": 0.5}, {"aji": 0.25}, {"aji": 0.75}],
    ...               [{"organ": "a"}, {"organ": "b"}, {"organ": "b"}], ["organ"])
    {'organ=a': {'n': 1, 'aji': 0.5}, 'organ=b': {'n': 2, 'aji': 0.5}}
    """
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        for value in sorted({g[key] for g in groups if key in g}):
            sel = [r for r, g in zip(rows, groups, strict=True) if g.get(key) == value]
            out[f"{key}={value}"] = {
                "n": len(sel),
                **mean_metrics(sel),
            }
    return out


def _images(cfg: dict[str, Any]) -> list[TrainImage]:
    """The config's labelled images at the model's resolution (nothing rescaled or added)."""
    d = cfg["data"]
    images = load_training_images(
        d["dataset"],
        d["root"],
        mpp=float(cfg["model"]["mpp"]),
        foreground_only_masks=d.get("foreground_only_masks"),
        default_mpp=d.get("default_mpp"),
        pseudo_instances=bool(d.get("pseudo_instances", False)),
        label_resize=label_resize_of(cfg),
        foreground_mask_erosion=int(d.get("foreground_mask_erosion", 0)),
    )
    if stain_normalisation_of(cfg) == "reinhard":
        images = stain_normalise_images(images, modality_of(cfg))
    return images


def modality_of(cfg: dict[str, Any]) -> str:
    """The config's ``model.modality`` (default brightfield)."""
    return str(cfg["model"].get("modality", "brightfield"))


def fold_held_out(
    cfg: dict[str, Any],
    run: str | Path,
    images: list[TrainImage],
    folds: list[list[str]],
    ks: list[int],
) -> list[tuple[Any, TrainImage]]:
    """``(fold model, image)`` for every held-out image of folds ``ks`` of ``run``."""
    held: list[tuple[Any, TrainImage]] = []
    for k in ks:
        net = _load_net(Path(run) / "cv" / f"fold{k}" / "checkpoint.pt", cfg)
        held += [(net, im) for im in images if im.id in folds[k]]
    return held


def _training_set(cfg: dict[str, Any], images: list[TrainImage]) -> list[TrainImage]:
    """What a network trains on: ``images`` size-normalised if the config asks
    (``data.rescale_to_diameter``), plus artificial images built from them."""
    from .data import rescale_to_diameter, synthetic_image

    d = cfg["data"]
    if d.get("rescale_to_diameter"):
        images = rescale_to_diameter(
            images,
            float(d["rescale_to_diameter"]),
            label_resize=label_resize_of(cfg),
        )
    images = images + extra_training_images(cfg, images)
    n_syn = int(d.get("synthetic_images", 0))
    if n_syn:
        rng = np.random.default_rng(int(cfg.get("seed", 0)) + 1)
        images = images + [
            synthetic_image(images, rng, max_overlap=float(d.get("synthetic_max_overlap", 0.1)))
            for _ in range(n_syn)
        ]
    return images


def extra_training_images(cfg: dict[str, Any], images: list[TrainImage]) -> list[TrainImage]:
    """``data.extra``: labelled images of other datasets that every network
    of the config trains on (the folds' and the final one), never held out
    or scored, e.g. BBBC038's H&E-like brightfield images for an H&E model.

    Each entry names a ``dataset`` and ``root`` and may keep one
    ``modality``.  With ``mpp`` (the resolution of its images that carry
    none, as ``data.default_mpp``) its images are resampled to the model's;
    without (BBBC038's, which has none), each is resampled
    (:func:`.data.rescale_to_diameter`) so its nuclei are as large as the
    median of ``images``' (the training images they join, at the model's
    grid).  Each is drawn in proportion to
    its area (its sampling weight is its pixels over the mean of
    ``images``', at most 1, times the entry's ``weight``, default 1), so a
    small image is not sampled as often as a large one unless the config
    says so.  Stain normalisation applies to them as to the rest.
    """
    from nucleus_models.models.unet import mask_diameter

    from .data import rescale_to_diameter

    extra = cfg["data"].get("extra", [])
    if not extra:
        return []
    sizes = [mask_diameter(im.foreground) for im in images if im.has_instances]
    sizes = [d for d in sizes if d]
    if not sizes:
        raise ValueError("data.extra: the training images have no nuclei to take the size from")
    diameter = float(np.median(sizes))
    mean_area = float(np.mean([im.foreground.size for im in images]))
    out: list[TrainImage] = []
    for e in extra:
        loaded = load_training_images(
            e["dataset"],
            e["root"],
            mpp=float(cfg["model"]["mpp"]),
            modality=e.get("modality"),
            default_mpp=e.get("mpp"),
            label_resize=label_resize_of(cfg),
        )
        if not loaded:
            raise ValueError(
                f"data.extra: no {e.get('modality', '')} images in {e['dataset']} at {e['root']}"
            )
        if "mpp" not in e:
            loaded = rescale_to_diameter(loaded, diameter, label_resize=label_resize_of(cfg))
        for im in loaded:
            im.id = f"{e['dataset']}:{im.id}"
            im.groups = {**im.groups, "extra": e["dataset"]}
            im.weight = min(1.0, im.foreground.size / mean_area) * float(e.get("weight", 1.0))
            out.append(im)
    if stain_normalisation_of(cfg) == "reinhard":
        out = stain_normalise_images(out, modality_of(cfg))
    log.info(
        "%d extra training images (nuclei resampled to %.1f px across, the training images' median)",
        len(out),
        diameter,
    )
    return out


def fold_training_images(
    cfg: dict[str, Any], images: list[TrainImage], held: list[str], fold: int
) -> list[TrainImage]:
    """What fold ``fold``'s model trains on: every image not in ``held``,
    through :func:`_training_set`.

    ``cv.labelled_fraction`` (default 1) keeps only that fraction of the
    fold's outlined training images (a seeded subset per fold; images with
    pseudo-instances or foreground only all stay), for a learning curve: the
    held-out images are the same, so the numbers compare image for image
    with the full folds'.

    >>> ims = [TrainImage(c, np.zeros((2, 2, 3), np.uint8), np.ones((2, 2), np.int32),
    ...                   np.ones((2, 2), bool)) for c in "abcdef"]
    >>> ims.append(TrainImage("p", ims[0].image, ims[0].labels, ims[0].foreground, pseudo=True))
    >>> cfg = {"seed": 0, "data": {}, "cv": {"labelled_fraction": 0.5}}
    >>> sorted(im.id for im in fold_training_images(cfg, ims, ["a", "b"], 0))
    ['c', 'e', 'p']
    >>> len(fold_training_images({"data": {}}, ims, ["a", "b"], 0))
    5
    >>> [im.id for im in fold_training_images({**cfg, "cv": {"labelled_fraction": 0}}, ims, [], 0)]
    ['p']
    >>> fold_training_images({**cfg, "cv": {"labelled_fraction": 2}}, ims, [], 0)
    Traceback (most recent call last):
    ValueError: cv.labelled_fraction = 2.0: must be between 0 and 1
    """
    frac = float(cfg.get("cv", {}).get("labelled_fraction", 1.0))
    if not 0 <= frac <= 1:
        raise ValueError(f"cv.labelled_fraction = {frac}: must be between 0 and 1")
    train = [im for im in images if im.id not in held]
    if frac < 1:
        outlined = sorted(im.id for im in train if _outlined(im))
        rng = np.random.default_rng([int(cfg.get("seed", 0)), fold])
        keep = set(rng.permutation(outlined)[: round(frac * len(outlined))])
        train = [im for im in train if im.id in keep or not _outlined(im)]
        log.info("fold %d: %d of %d outlined training images kept", fold, len(keep), len(outlined))
    return _training_set(cfg, train)


def held_out_maps(
    net: Any,
    image: np.ndarray,
    cfg: dict[str, Any],
    params: dict[str, Any] | None = None,
    *,
    precision: str = "float32",
) -> np.ndarray:
    """A held-out image's maps as inference makes them: at the model's
    resolution, or, for a size-normalised model, at the scale where its own
    first segmentation finds nuclei ``rescale_to_diameter`` px across
    (:func:`nucleus_models.models.unet.fit_scale`; never from the labels).

    With ``params`` (a post-processing setting) the size is measured, as
    inference measures it, on the foreground of the final instances; without,
    on the foreground map above 0.5.  ``precision``: the network's arithmetic
    (``float32`` or ``bfloat16``, as :func:`.unet.predict_maps`).
    """
    from nucleus_models.models.unet import fit_scale, instances_from_maps

    from .data import _resize
    from .unet import full_setting, predict_maps

    norm = input_normalisation(cfg)
    target = cfg["data"].get("rescale_to_diameter")
    if not target:
        return predict_maps(net, image, normalisation=norm, precision=precision)
    setting = None if params is None else full_setting(cfg, params)

    def segment(scale: float) -> tuple[np.ndarray, np.ndarray]:
        maps = predict_maps(net, _resize(image, scale), normalisation=norm, precision=precision)
        if setting is None:
            return maps[0] > 0.5, maps
        return instances_from_maps(maps[0], maps[1], maps[2], **setting).labels > 0, maps

    return fit_scale(segment, float(target))[1]


def _load_net(ckpt: Path, cfg: dict[str, Any]) -> Any:
    import torch

    from nucleus_models.models.unet import build_unet

    net = build_unet(**unet_arch(cfg["model"]))
    net.load_state_dict(shipped_state(torch.load(ckpt, map_location="cpu", weights_only=True)))
    return net.eval()


def settle_size_setting(
    first: dict[str, Any],
    remeasure: Callable[[dict[str, Any]], tuple[list[Any], Any]],
    metric: str | list[str],
    max_passes: int = MAX_SIZE_PASSES,
    score: Callable[[list[Any], dict[str, Any]], dict[str, float]] | None = None,
) -> tuple[list[Any], Any, dict[str, Any], dict[str, float], int]:
    """Alternate scale search and tuning for a size-normalised model.

    ``remeasure(setting)`` gives the held-out maps with each image's scale
    measured on the final instances of ``setting`` and the post-processing
    grid scored on them.  Starting from ``first`` (chosen on maps whose size
    was measured on the foreground map), the setting chosen on the new maps
    replaces it until it is the one they were measured with, so the numbers
    are those inference gets; with no such fixed point within ``max_passes``
    the setting of the last measurement is kept with its own scores
    (``score(maps, setting)`` gives them when the grid scored on those maps
    does not hold it: its filters are searched around another setting's seeds).
    Returns ``(maps, grid, setting, metrics, passes)``, passes counting the
    first search.

    >>> a, b = {"t": 0.5}, {"t": 0.6}
    >>> def remeasure(setting):  # the chosen setting is b, whatever measured
    ...     return [setting], [(a, {"aji": 0.1}), (b, {"aji": 0.2})]
    >>> settle_size_setting(a, remeasure, "aji")[2:]
    ({'t': 0.6}, {'aji': 0.2}, 3)
    """
    from .unet import best_setting

    best = first
    for passes in range(2, 2 + max_passes):
        used = best
        maps, grid = remeasure(used)
        best, at_best = best_setting(grid, metric)
        if best == used:
            return maps, grid, best, at_best, passes
    at_used = next((m for p, m in grid if p == used), None)
    if at_used is None:
        if score is None:
            raise ValueError("settle_size_setting: the setting kept is not in the grid; pass score")
        at_used = score(maps, used)
    return maps, grid, used, at_used, passes


def cross_validate(
    cfg: dict[str, Any],
    images: list[TrainImage],
    out: Path,
    *,
    resume: bool,
    only_fold: int | None = None,
) -> dict[str, Any]:
    """k-fold CV on the images with instances; returns the post-processing grid and the best setting.

    ``only_fold``: train that fold's model only and return the folds without
    evaluating (folds can then train in parallel processes; a later run with
    ``resume`` finds them finished and evaluates).

    Held-out predictions are scored against the images' own annotations at
    their own resolution when the dataset provides them (as ``nucleus-bench
    eval`` does), else against the resampled training labels.
    """
    from .unet import best_setting, full_setting, score_images, train_unet, tune_thresholds

    cv = cfg.get("cv", {})
    folds = cv_folds(cfg, images, only_fold)
    # cv.tune_on = "key=value": choose the setting on that group of held-out
    # images only (e.g. the modality a model serves); all are still reported.
    # Checked before any fold trains (a misspelt group failed after all had)
    tune_on = str(cv.get("tune_on", ""))
    tune_key, _, tune_value = tune_on.partition("=")
    in_cv = {i for held in folds for i in held}
    cv_groups = sorted(
        {f"{k}={v}" for im in images if im.id in in_cv for k, v in im.groups.items()}
    )
    if tune_on and tune_on not in cv_groups:
        raise ValueError(
            f"cv.tune_on = {tune_on!r}: no cross-validated image is in that group; "
            f"theirs: {', '.join(cv_groups) or 'none'}"
        )
    # (a misspelt group key reported nothing, silently, once every fold had trained)
    keys = sorted({g.split("=", 1)[0] for g in cv_groups})
    if missing := [k for k in cv.get("report_groups", []) if k not in keys]:
        raise ValueError(
            f"cv.report_groups: no cross-validated image has the group {', '.join(map(repr, missing))};"
            f" theirs: {', '.join(keys) or 'none'}"
        )
    truth_of, at_native = truth_source(cfg)
    truths, ids, groups, held_out = [], [], [], []
    for i, held in enumerate(folds):
        if only_fold is not None and i != only_fold:
            continue
        train = fold_training_images(cfg, images, held, i)
        ckpt = train_unet(
            cfg,
            train,
            out / f"fold{i}",
            steps=int(cv.get("steps", cfg["train"]["steps"])),
            resume=resume,
        )
        net = _load_net(ckpt, cfg)
        for im in images:
            if im.id in held:
                held_out.append((net, im.image))
                truths.append(truth_of(im))
                ids.append(im.id)
                groups.append(dict(im.groups))
    if only_fold is not None:
        return {"folds": folds, "trained_fold": only_fold}
    metric = cv.get("metric", "aji")
    size_normalised = bool(cfg["data"].get("rescale_to_diameter"))
    tuned = list(range(len(ids)))
    if tune_on:  # (not empty: checked above)
        tuned = [i for i, g in enumerate(groups) if str(g.get(tune_key)) == tune_value]
    maps = [held_out_maps(net, image, cfg) for net, image in held_out]
    grid = tune_thresholds([maps[i] for i in tuned], [truths[i] for i in tuned], cfg)
    best, at_best = best_setting(grid, metric)
    size_passes = 1
    if size_normalised:
        # inference measures the nucleus size on the final instances of its
        # own setting: search the scale again that way and re-tune, until the
        # setting chosen is the one the sizes were measured with

        def remeasure(setting: dict[str, Any]) -> tuple[list[Any], Any]:
            again = [held_out_maps(net, image, cfg, setting) for net, image in held_out]
            return again, tune_thresholds(
                [again[i] for i in tuned], [truths[i] for i in tuned], cfg
            )

        def score_tuned(again: list[Any], setting: dict[str, Any]) -> dict[str, float]:
            return mean_metrics(
                score_images(
                    [again[i] for i in tuned],
                    [truths[i] for i in tuned],
                    full_setting(cfg, setting),
                )
            )

        maps, grid, best, at_best, size_passes = settle_size_setting(
            best, remeasure, metric, score=score_tuned
        )
    # the chosen setting per group of images (cv.report_groups, e.g. ["modality"])
    report = list(cv.get("report_groups", []))
    rows = score_images(maps, truths, full_setting(cfg, best)) if report or tune_on else []
    if tune_on:  # the headline numbers stay those of every held-out image
        at_best = mean_metrics(rows)
    by_group = group_metrics(rows, groups, report)
    result = {
        "folds": folds,
        "config_sha256": cv_fingerprint(cfg),
        "metric": metric,
        "tuned_on": tune_on or "all",
        "scored_at": "image resolution" if all(at_native(i) for i in ids) else "model resolution",
        "best": best,
        "metrics_at_best": at_best,
        "by_group": by_group,
        "grid": [{**p, **m} for p, m in grid],
        "n_images": len(ids),
    }
    if size_normalised:
        result["size_measured_on"] = "final instances of the chosen setting"
        result["size_passes"] = size_passes
    (out / "cv.json").write_text(json.dumps(result, indent=2))
    return result


def carried_cv(
    record: str | Path,
    cfg: dict[str, Any],
    images: list[TrainImage],
    record_config: str | Path | None = None,
) -> tuple[dict[str, Any], float]:
    """The cross-validation of an earlier run of this config (``--cv_from``),
    instead of training its fold models again: ``(cv, fold minutes in s)``.

    ``record`` is an exported ``<name>.json`` or a run's ``cv/cv.json``.  It
    is taken only if its folds are this config's and it was made with this
    config apart from the final model's steps and inference-only settings
    (:func:`.common.cv_fingerprint`).  A record written before fingerprints
    were recorded needs ``record_config``, the config it was made with: its
    fingerprint must equal this config's, and its resolution and tuning
    metric must match the record.  Anything else is a ``ValueError``.
    """
    path = Path(record)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"--cv_from {record}: not a readable JSON record ({exc})") from None
    cv = data.get("cv") if isinstance(data, dict) and "cv" in data else data
    if not isinstance(cv, dict) or not {"folds", "best", "metrics_at_best"} <= set(cv):
        raise ValueError(f"--cv_from {record}: holds no cross-validation result")
    if data.get("arch", cfg["arch"]) != cfg["arch"]:
        raise ValueError(
            f"--cv_from {record}: a {data['arch']} model, the config trains {cfg['arch']}"
        )
    if cv["folds"] != cv_folds(cfg, images):
        raise ValueError(f"--cv_from {record}: its folds are not this config's")
    mine = cv_fingerprint(cfg)
    if "config_sha256" in cv:
        theirs, how = cv["config_sha256"], "recorded"
    elif record_config is None:
        raise ValueError(
            f"--cv_from {record}: records no config fingerprint; "
            "name the config it was made with (--cv_config)"
        )
    else:
        old = load_config(record_config)
        spec = data.get("spec", {})
        if "mpp" in spec and float(spec["mpp"]) != float(old["model"]["mpp"]):
            raise ValueError(f"--cv_config {record_config}: not the resolution of {record}")
        if cv.get("metric") != old.get("cv", {}).get("metric", "aji"):
            raise ValueError(f"--cv_config {record_config}: not the tuning metric of {record}")
        theirs, how = cv_fingerprint(old), f"of {record_config}"
    if theirs != mine:
        raise ValueError(
            f"--cv_from {record}: made with another config (fingerprint {how} {theirs[:12]}, "
            f"this config {mine[:12]}): only the final model's steps and inference "
            "settings may differ"
        )
    training = data.get("training", {}) if "cv" in data else {}
    carried = {
        **cv,
        "config_sha256": mine,
        "carried_over_from": {
            "record": str(record),
            "weights_sha256": data.get("spec", {}).get("sha256"),
            "config": str(record_config) if record_config else None,
        },
    }
    return carried, float(training.get("cv_seconds", 0.0))


def cv_stage(
    run_cv: Callable[..., dict[str, Any]],
    cfg: dict[str, Any],
    images: list[TrainImage],
    out: Path,
    *,
    resume: bool,
    skip_cv: bool,
    fold: int | None,
    cv_from: str | Path | None,
    cv_config: str | Path | None,
) -> tuple[dict[str, Any] | None, float]:
    """A training run's cross-validation and its folds' training seconds:
    carried over (``cv_from``), skipped, or run by ``run_cv`` (the U-Net's or
    a detector's ``cross_validate``) in ``out/cv``."""
    if cv_from is not None:
        return carried_cv(cv_from, cfg, images, cv_config)
    cv = None if skip_cv else run_cv(cfg, images, out / "cv", resume=resume, only_fold=fold)
    return cv, fold_seconds(out / "cv")


def export(
    cfg: dict[str, Any],
    ckpt: Path,
    cv: dict[str, Any] | None,
    weights_dir: Path,
    meta: dict[str, Any],
    images: list[TrainImage] | None = None,
) -> Path:
    """Write ``<name>.pt`` (state_dict), ``<name>.json`` (spec) and ``<name>.md``
    (model card); with ``images`` (what the model trained on) also the int8
    calibration of the exported network (:func:`int8_calibration`)."""
    m = cfg["model"]
    thresholds: dict[str, Any] = {
        **unet_arch(m),
        "min_area": int(m.get("min_area", 8)),
        "fg_threshold": 0.5,
        "seed_threshold": 0.5,
        "tta": int(m.get("tta", 0)),
        # the input the network was trained on, so serving prepares the same
        "normalisation": input_normalisation(cfg),
    }
    if int(m.get("cpu_bfloat16", 0)):
        thresholds["cpu_bfloat16"] = 1
    int8 = None
    if images:
        int8 = int8_calibration(cfg, _load_net(ckpt, cfg), images)
        if int(m.get("cpu_int8", 0)):
            thresholds["cpu_int8"] = 1
    stain = stain_normalisation_of(cfg)
    if stain != "none":
        thresholds["stain_normalisation"] = stain
    if cfg["data"].get("rescale_to_diameter"):
        thresholds["diameter_px"] = float(cfg["data"]["rescale_to_diameter"])
    if cv:
        thresholds.update(cv["best"])
    init = meta.get("init_from")
    if (
        init
        and init.get("license")
        and init["license"] not in cfg.get("card", {}).get("license", "")
    ):
        # fine-tuned weights inherit the starting weights' license too
        own = cfg.get("card", {}).get("license", "")
        cfg = {
            **cfg,
            "card": {
                **cfg.get("card", {}),
                "license": f"{own}; " * bool(own)
                + f"from the starting weights ({init['name']}): {init['license']}",
            },
        }
    return write_weights(
        cfg,
        ckpt,
        weights_dir,
        arch="unet",
        thresholds=thresholds,
        card={"training": meta, "cv": cv, **({"int8": int8} if int8 else {})},
        markdown=lambda spec: _card_markdown(cfg, spec, meta, cv, int8),
    )


def int8_calibration(cfg: dict[str, Any], net: Any, images: list[TrainImage]) -> dict[str, Any]:
    """The int8 calibration (:mod:`nucleus_models.models.int8`) of the float
    U-Net ``net``: its serving form (batch norms folded) run on ``images`` as
    a held-out image is run (:func:`held_out_maps`: at the model's
    resolution, or a size-normalised model's own scale)."""
    from nucleus_models.models.int8 import calibrate, prepare_calibration
    from nucleus_models.models.unet import fuse_for_inference

    prepared = prepare_calibration(fuse_for_inference(copy.deepcopy(net)))
    for im in images:
        held_out_maps(prepared, im.image, cfg)
    root = Path(cfg["data"]["root"])
    try:  # as the shipped configs write it, relative to the repository
        root = Path(os.path.relpath(root.resolve(), Path(__file__).resolve().parents[2]))
    except ValueError:  # (another drive)
        pass
    data = f"the {len(images)} training images of {cfg['data']['dataset']} in {root.as_posix()}"
    return calibrate(prepared, images=len(images), data=data)


def arithmetic_line(spec: dict[str, Any], int8: dict[str, Any] | None) -> str:
    """The model card's line on the arithmetic ``--precision auto`` picks
    (:func:`nucleus_models.models.unet.pick_precision`)."""
    bf16 = int(spec["thresholds"].get("cpu_bfloat16", 0))
    q8 = bool(int(spec["thresholds"].get("cpu_int8", 0)) and int8)
    if bf16 and q8:
        auto = (
            "in int8 on x86 CPUs (`model.cpu_int8`; below), else in bfloat16 on CPUs that"
            " compute it in hardware (`model.cpu_bfloat16`), in float32 on GPUs"
        )
    elif bf16:
        auto = (
            "in bfloat16 on CPUs that compute it in hardware (`model.cpu_bfloat16`),"
            " float32 elsewhere"
        )
    elif q8:
        auto = "in int8 on x86 CPUs (`model.cpu_int8`; below), float32 elsewhere"
    else:
        auto = "in float32 everywhere (`model.cpu_bfloat16` and `model.cpu_int8` not set)"
    return (
        "- Inference arithmetic: float32 (the cross-validation's held-out maps included);"
        f" `--precision auto` runs the network {auto}"
    )


def int8_card_lines(spec: dict[str, Any], int8: dict[str, Any]) -> list[str]:
    """The model card's int8 section."""
    th = spec["thresholds"]
    if not int(th.get("cpu_int8", 0)):
        auto = "does not use it (`model.cpu_int8` not set)"
    elif int(th.get("cpu_bfloat16", 0)):
        auto = "uses it on x86 CPUs (`model.cpu_int8`), before bfloat16 (faster where both run)"
    else:
        auto = "uses it on x86 CPUs (`model.cpu_int8`)"
    return [
        "## int8 inference (CPU)",
        "",
        f"`--precision int8` runs the convolutions in 8-bit integers (PyTorch's {int8['engine']}"
        " quantized engine; weights per output channel, activations per tensor with 7-bit"
        " range; transposed convolutions and post-processing float32). Activation ranges"
        f" of {len(int8['activations'])} tensors calibrated on {int8['data']}, as held-out"
        f" images are run (torch {int8['torch']}, histogram observers), stored in"
        f" `{spec['name']}.json`. `--precision auto` {auto}.",
        "",
    ]


def calibrate_shipped(config: str | Path, weights_dir: str | Path) -> Path:
    """Add the int8 calibration to the shipped weights of ``config``'s model
    in ``weights_dir`` (``<name>.json``'s ``int8`` block, ``cpu_int8`` from
    the config's ``model.cpu_int8``, and the card's int8 section), calibrated
    on every training image of the config; the weights are checked against
    their sha256 first.  Returns the JSON's path."""
    from nucleus_models.models.unet import build_unet
    from nucleus_models.models.weights import load_state_dict

    cfg = load_config(config)
    if cfg.get("arch", "unet") != "unet":
        raise ValueError(f"{config}: int8 calibration is for U-Nets, not {cfg.get('arch')!r}")
    wd = Path(weights_dir)
    card_path = wd / f"{cfg['name']}.json"
    if not card_path.is_file():
        raise ValueError(f"no shipped weights card {card_path} (export the model first)")
    try:
        card = json.loads(card_path.read_text())
        spec = card["spec"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{card_path}: not a model card ({exc})") from None
    # the ranges are measured on the config's images at its resolution: a
    # config other than the model's would store another model's calibration
    made_with = (card.get("cv") or {}).get("config_sha256")
    if made_with and made_with != cv_fingerprint(cfg):
        raise ValueError(
            f"{config} is not the config {cfg['name']} was trained with (its card records "
            f"config fingerprint {made_with[:12]}, this config's is {cv_fingerprint(cfg)[:12]})"
        )
    if abs(float(spec.get("mpp", 0)) - float(cfg["model"]["mpp"])) > 1e-9:
        raise ValueError(
            f"{config}: model.mpp {cfg['model']['mpp']} is not {cfg['name']}'s {spec.get('mpp')}"
        )
    net = build_unet(**unet_arch(cfg["model"]))
    try:
        net.load_state_dict(load_state_dict(wd / spec["weights"], spec["sha256"]))
    except RuntimeError as exc:  # (another width or depth than the weights')
        first = " ".join(str(exc).split())[:200]
        raise ValueError(f"{config}: its network is not {cfg['name']}'s: {first}") from None
    images = _images(cfg)
    card["int8"] = int8_calibration(cfg, net.eval(), images)
    if int(cfg["model"].get("cpu_int8", 0)):
        spec["thresholds"]["cpu_int8"] = 1
    else:
        spec["thresholds"].pop("cpu_int8", None)
    from nucleus_models.io.atomic import atomic_write

    with atomic_write(card_path) as f:
        f.write(json.dumps(card, indent=2) + "\n")
    md_path = wd / f"{cfg['name']}.md"
    if md_path.is_file():
        text = card_with_int8(md_path.read_text(), spec, card["int8"])
        with atomic_write(md_path) as f:
            f.write(text)
    return card_path


def card_with_int8(md: str, spec: dict[str, Any], int8: dict[str, Any]) -> str:
    """A model card's text with its int8 section and its arithmetic line
    written anew (the rest kept as it is): what :func:`calibrate_shipped`
    writes, and how a change to what ``auto`` picks reaches the shipped cards
    without calibrating again."""
    import re

    md = re.sub(r"\n## int8 inference \(CPU\)\n.*?(?=\n## |\Z)", "", md, flags=re.S)
    md = md.rstrip("\n") + "\n\n" + "\n".join(int8_card_lines(spec, int8))
    return re.sub(
        r"^- Inference arithmetic: .*$", lambda _: arithmetic_line(spec, int8), md, flags=re.M
    )


_LABEL_RESIZE_TEXT = {
    "area": "area (outlines kept in place)",
    "nearest": "nearest pixel centre",
    "corner": "OpenCV's plain nearest neighbour (moves outlines by up to one source pixel)",
}


def _card_markdown(
    cfg: dict[str, Any],
    spec: dict[str, Any],
    meta: dict[str, Any],
    cv: dict[str, Any] | None,
    int8: dict[str, Any] | None = None,
) -> str:
    from nucleus_models.models.unet import unet_channels

    erosion = int(cfg["data"].get("foreground_mask_erosion", 0))
    resize = label_resize_of(cfg)
    levels = unet_channels(**unet_arch(cfg["model"]))
    lines = [
        f"# Model card: {spec['name']}",
        "",
        spec["description"],
        "",
        f"- Architecture: compact U-Net (foreground, boundary, distance heads; channels"
        f" {'/'.join(map(str, levels))} from full to 1/{2 ** (len(levels) - 1)} resolution;"
        f" {meta['parameters']:,} parameters) + marker-controlled watershed",
        (
            f"- Resolution: size-normalised: nuclei {spec['thresholds']['diameter_px']:g} px across "
            "(training images resampled to it; at inference the scale comes from a first "
            f"segmentation, starting from {spec['mpp']} um/px); modality: {spec['modality']}"
            if spec["thresholds"].get("diameter_px")
            else f"- Resolution: {spec['mpp']} um/px (inputs are resampled to it); modality: {spec['modality']}"
        ),
        f"- Training data: {cfg.get('card', {}).get('data', cfg['data']['dataset'])}",
        *_starting_weights_lines(meta),
        f"- Targets: boundary {cfg['train'].get('boundary_target', 'thick')}; loss weights boundary "
        f"{cfg['train'].get('boundary_weight', 1.0)}, distance {cfg['train'].get('distance_weight', 2.0)}"
        + f"; label maps resampled to the model's grid by {_LABEL_RESIZE_TEXT.get(resize, resize)}"
        + (
            "; images with only a foreground mask get pseudo-instances (distance-transform watershed of the mask"
            + (
                f", eroded {erosion}x{erosion} first to match the outlines' rasterisation"
                if erosion > 1
                else ""
            )
            + ")"
            if cfg["data"].get("pseudo_instances")
            else ""
        ),
        *training_lines(meta, cfg),
        f"- Training: {meta['steps']} steps, batch {cfg['train']['batch_size']}, patch {cfg['train']['patch_size']} px, "
        f"{meta['seconds'] / 60:.1f} min on {meta['hardware']} "
        + (
            f"(cross-validation folds: {meta.get('cv_seconds', 0) / 60:.1f} min more)"
            if cv
            else "(no cross-validation)"
        )
        + (
            f"; the shipped and cross-validated weights are an exponential moving average "
            f"of the trained ones (decay {float(cfg['train']['ema']):g})"
            if float(cfg["train"].get("ema", 0.0)) > 0
            else ""
        )
        + (
            "; forward passes in bfloat16 (autocast, channels-last; weights, optimiser and loss float32)"
            if cfg["train"].get("precision", "float32") == "bfloat16"
            else ""
        ),
        f"- Post-processing: {_postprocess_text(spec['thresholds'])}",
        arithmetic_line(spec, int8),
        f"- Weights: `{spec['weights']}`, sha256 `{spec['sha256']}` (loaded with weights_only=True after a checksum check)",
        f"- License: {spec['license']}",
        "",
    ]
    if cv:
        lines += cv_card_lines(cfg, spec, cv)
    else:
        lines += [
            "Not cross-validated (trained with `--skip_cv`): no held-out metrics, and the "
            "post-processing thresholds above are the config's defaults, not tuned.",
        ]
    if int8:
        lines += ["", *int8_card_lines(spec, int8)]
    return "\n".join(lines)


def _starting_weights_lines(meta: dict[str, Any]) -> list[str]:
    """The card's line on the weights a fine-tuned model started from."""
    init = meta.get("init_from")
    if not init:
        return []
    seen = init.get("images_seen", [])
    return [
        f"- Starting weights: fine-tuned from `{init['name']}` (sha256 `{init['sha256']}`, "
        f"{init['mpp']:g} um/px), itself trained on {init['data'].rstrip('.')}"
        + (
            f"; {len(seen)} of the images here were among its training images, so its "
            "cross-validation is not held out for them"
            if seen
            else "; none of the images here were among its training images"
        )
    ]


def cv_card_lines(cfg: dict[str, Any], spec: dict[str, Any], cv: dict[str, Any]) -> list[str]:
    """The model card's cross-validation section: headline metrics of the
    chosen setting, how they were scored, and the per-group table."""
    mm = cv["metrics_at_best"]
    lines = [
        f"## {len(cv['folds'])}-fold cross-validation ({cv['n_images']} held-out images, thresholds chosen by {cv['metric'] if isinstance(cv['metric'], str) else ' + '.join(cv['metric'])}"
        + (
            f" on the held-out images with {cv['tuned_on']}"
            if cv.get("tuned_on", "all") != "all"
            else ""
        )
        + ")",
        "",
        "| " + " | ".join(mm) + " |",
        "|" + "---|" * len(mm),
        "| " + " | ".join(f"{v:.3f}" for v in mm.values()) + " |",
        "",
        "Numbers come from the fold models (each trained on the other folds with "
        f"{cfg.get('cv', {}).get('steps', cfg['train']['steps'])} steps), evaluated on their held-out images at the "
        + (
            "image's own resolution (labels grown back as `nucleus-bench eval` does: smooth foreground, ids by nearest pixel centre) "
            if cv.get("scored_at") == "image resolution"
            else "training resolution "
        )
        + "with `benchmark.metrics.instance_metrics`."
        + (
            " Each held-out image was segmented at the scale its fold model picked from its "
            "own segmentation (`fit_scale`), never from its labels"
            + (
                f": measured, as inference does, on the {cv['size_measured_on']}"
                + (
                    f" ({cv['size_passes']} passes of scale search and tuning)"
                    if "size_passes" in cv
                    else ""
                )
                + "."
                if cv.get("size_measured_on")
                else "."
            )
            if spec["thresholds"].get("diameter_px")
            else ""
        ),
        "",
    ]
    carried = cv.get("carried_over_from")
    if carried:
        lines += [
            f"Cross-validation carried over from the record `{carried['record']}`"
            + (
                f" (weights sha256 `{carried['weights_sha256']}`)"
                if carried.get("weights_sha256")
                else ""
            )
            + ": the same fold models and tuning, made with this config apart from the final "
            f"model's steps and inference settings (config fingerprint `{cv['config_sha256'][:12]}`"
            + (", checked against the config it was made with" if carried.get("config") else "")
            + "); the folds were not trained again for this export.",
            "",
        ]
    if len(cv.get("by_group", {})) > 1:
        keys = ["f1_iou50", "aji", "dice", "det_f1"]
        lines += [
            "By group of held-out images (same setting):",
            "",
            "| group | images | " + " | ".join(keys) + " |",
            "|---|---|" + "---|" * len(keys),
            *(
                f"| {name} | {g['n']} | " + " | ".join(f"{g[k]:.3f}" for k in keys) + " |"
                for name, g in cv["by_group"].items()
            ),
            "",
        ]
    return lines


def _postprocess_text(th: dict[str, Any]) -> str:
    """One line describing the tuned watershed settings of a card."""
    if th.get("seed_mode", "threshold") == "hmax":
        seeds = f"seeds = h-maxima (h {th['h']}) of (distance - boundary) smoothed with sigma {th['smooth']} px"
    else:
        seeds = f"seeds = (distance - boundary) > {th['seed_threshold']}"
    filt = f"instances < {th['min_area']} px" + (
        f" or with mean foreground < {th['min_score']}" if th.get("min_score") else ""
    )
    return f"foreground > {th['fg_threshold']}; {seeds}; {filt} dropped"


def train_from_config(
    config: str | Path,
    *,
    out_dir: str | Path | None = None,
    resume: bool = False,
    skip_cv: bool = False,
    cv_only: bool = False,
    steps: int | None = None,
    export_to: str | Path | None = None,
    fold: int | None = None,
    cv_from: str | Path | None = None,
    cv_config: str | Path | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Cross-validate (unless ``skip_cv``), train on all images (unless
    ``cv_only``), optionally export.  ``fold``: train only that
    cross-validation fold (implies ``cv_only``; nothing is evaluated).
    ``cv_from``: take the cross-validation from an earlier run of the same
    config (:func:`carried_cv`) instead of running it.  ``out_dir``
    defaults to ``runs/<config name>``.  ``device`` (``auto``, ``cpu`` or
    ``cuda``) replaces the config's ``train.device`` (default ``cpu``):
    where the networks train; held-out images are scored on the CPU."""
    cfg = load_config(config)
    if device is not None or cfg["train"].get("device"):
        from nucleus_models.models.unet import pick_device

        # no GPU for "cuda": a one-line error before any data loads or is written
        pick_device(device if device is not None else str(cfg["train"]["device"]))
        if device is not None:
            cfg["train"]["device"] = device
    if steps is not None and (steps < 0 or (steps == 0 and not cfg["train"].get("init_from"))):
        raise ValueError(
            f"--steps {steps}: expected 1 or more (0 only re-tunes a model given as "
            "train.init_from)"
        )
    k = int(cfg.get("cv", {}).get("folds", 3))
    if fold is not None and not 0 <= fold < k:
        raise ValueError(f"--fold {fold}: the config has folds 0..{k - 1}")
    needed = ("batch_size", "patch_size") + (("lr",) if cfg["arch"] == "unet" else ())
    for key in needed:
        if key not in cfg["train"]:
            raise ValueError(f"{config}: no train.{key}")
    if out_dir is None:
        out_dir = Path("runs") / str(cfg["name"])
    if cv_from is not None and (skip_cv or cv_only or fold is not None):
        raise ValueError(
            "--cv_from replaces the cross-validation: not with --skip_cv, --cv_only or --fold"
        )
    if cv_config is not None and cv_from is None:
        raise ValueError("--cv_config names the config of a --cv_from record")
    if fold is not None:
        if skip_cv or export_to is not None:
            raise ValueError("--fold trains one cross-validation fold: no --skip_cv or --export")
        cv_only = True
    if cv_only and export_to is not None:
        raise ValueError("--cv_only trains no final model to export")
    if export_to is not None:
        from nucleus_models.models import get_spec, list_models

        name = str(cfg["name"])
        if name in list_models() and not get_spec(name).weights:
            # its card would be skipped when the registry loads: never served
            raise ValueError(
                f"{config}: name {name!r} is a built-in model without weights: "
                "exported under it, these weights would never be loaded; rename it"
            )
    if cfg["arch"] != "unet":
        from . import detectors  # torchvision detectors share the command

        return detectors.train_from_config(
            cfg,
            out_dir=out_dir,
            resume=resume,
            skip_cv=skip_cv,
            cv_only=cv_only,
            fold=fold,
            steps=steps,
            export_to=export_to,
            cv_from=cv_from,
            cv_config=cv_config,
        )
    from .unet import train_unet

    out = Path(out_dir)
    images = _images(cfg)
    if not images:
        raise ValueError(f"no training images with labels under {cfg['data']['root']}")
    out.mkdir(parents=True, exist_ok=True)  # (after the data: a run without any makes none)
    init = starting_weights(cfg)
    seen = sorted({im.id for im in images} & set(init["images"])) if init else []
    if init is not None and seen:
        log.warning(
            "%d of these %d images trained %s, the starting weights: the cross-validation "
            "is not held out for them",
            len(seen),
            len(images),
            init["name"],
        )
    cv, t_cv = cv_stage(
        cross_validate,
        cfg,
        images,
        out,
        resume=resume,
        skip_cv=skip_cv,
        fold=fold,
        cv_from=cv_from,
        cv_config=cv_config,
    )
    if fold is not None:
        return {"checkpoint": str(out / "cv" / f"fold{fold}" / "checkpoint.pt"), "cv": None}
    if cv_only:
        return {"checkpoint": None, "cv": cv, "meta": {}}
    ckpt = train_unet(cfg, _training_set(cfg, images), out / "final", steps=steps, resume=resume)
    # training time from the checkpoints' own logs (exact also when a later
    # invocation only resumed finished runs to re-tune or export)
    seconds, sessions = training_record(ckpt)
    import torch

    from nucleus_models.models.unet import build_unet

    meta = {
        "command": invocation_text(f"nucleus-bench train --config {config}"),
        "sessions": sessions,
        "config": cfg["_config_path"],
        "steps": int(steps if steps is not None else cfg["train"]["steps"]),
        "seconds": round(seconds, 1),
        "cv_seconds": round(t_cv, 1),
        "hardware": trained_on(sessions),
        "torch": torch.__version__,
        "images": [im.id for im in images],
        "data": str(cfg.get("card", {}).get("data", cfg["data"]["dataset"])),
        "parameters": sum(p.numel() for p in build_unet(**unet_arch(cfg["model"])).parameters()),
        "seed": int(cfg.get("seed", 0)),
    }
    if init is not None:
        meta["init_from"] = {
            **{k: init[k] for k in ("name", "sha256", "mpp", "license", "data")},
            "images_seen": seen,
        }
    result = {"checkpoint": str(ckpt), "cv": cv, "meta": meta}
    if export_to is not None:
        result["weights"] = str(export(cfg, ckpt, cv, Path(export_to), meta, images))
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    return result
