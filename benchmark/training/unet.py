"""Training the compact U-Net: seeded, resumable, cross-validated, exportable.

``train_unet(cfg, images, out_dir)`` trains one network from a config dict
(see ``configs/unet-*.toml``) and returns the path of its final checkpoint;
``predict_maps`` runs a network on a whole image; ``tune_thresholds`` scores
a grid of post-processing settings on held-out images with the harness's
metrics.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from .common import (
    REPO,
    mean_metrics,
    restore_checkpoint,
    score_on_truth,
    train_loop,
    training_settings,
    warmup_cosine,
)
from .data import (
    TrainImage,
    augment,
    input_normalisation,
    label_resize_of,
    sample_patch,
    stain_normalisation_of,
)

__all__ = [
    "train_unet",
    "predict_maps",
    "postprocess_grid",
    "tune_thresholds",
    "score_images",
    "cv_score",
    "best_setting",
    "full_setting",
    "seed_everything",
    "unet_arch",
    "starting_weights",
    "shipped_card",
]

log = logging.getLogger(__name__)

#: ``train.precision`` values (the weights, optimiser and loss stay float32)
TRAIN_PRECISIONS = ("float32", "bfloat16")


def unet_arch(model: dict[str, Any]) -> dict[str, Any]:
    """The U-Net's shape from a config's ``[model]`` table, as ``build_unet``
    takes it and as the exported spec stores it: ``base`` and ``depth``, and
    ``channels`` (one count per level, finest first) when the config sets them.

    >>> unet_arch({"base": 12})
    {'base': 12, 'depth': 4}
    >>> unet_arch({"channels": [8, 16, 48, 96]})
    {'base': 8, 'depth': 4, 'channels': [8, 16, 48, 96]}
    """
    from nucleus_models.models.unet import unet_channels

    if model.get("channels"):
        chans = unet_channels(channels=model["channels"])
        return {"base": chans[0], "depth": len(chans), "channels": chans}
    return {"base": int(model.get("base", 16)), "depth": int(model.get("depth", 4))}


def starting_weights(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """``train.init_from``: the shipped U-Net (a registered name, e.g.
    ``"unet-monuseg"``, or the path of its ``.json`` card or ``.pt`` weights)
    whose weights the networks start from instead of random ones, i.e.
    fine-tuning.  Returns None without it, else its name, card, weights path,
    sha256, resolution, license, data and training images.

    The config must build the same network and prepare its input the same
    way (normalisation, stain normalisation): anything else is a one-line
    ``ValueError``, as is a ``train.init_sha256`` that does not match.  The
    resolution may differ (fine-tuning to another one).
    """
    src = cfg.get("train", {}).get("init_from")
    if not src:
        return None
    from nucleus_models.models.unet import default_normalisation, unet_channels

    text = str(src)
    if text.endswith((".json", ".pt")) or "/" in text:
        p = Path(text).expanduser()
        p = p if p.is_absolute() else REPO / p
        card_path = p.with_suffix(".json")
    else:
        card_path = shipped_card(
            text, "train.init_from", "; or give the path of a model's .json card"
        )
    if not card_path.is_file():
        raise ValueError(f"train.init_from: no model card {card_path} (the .json beside the .pt)")
    try:
        card = json.loads(card_path.read_text())
        spec = card["spec"]
        th = spec["thresholds"]
        theirs = unet_channels(
            int(th.get("base", 16)), int(th.get("depth", 4)), th.get("channels") or None
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"train.init_from: {card_path} is not a model card ({exc!r})") from None
    if card.get("arch", "unet") != "unet":
        raise ValueError(
            f"train.init_from: {spec['name']} is a {card['arch']} model; only U-Nets can be "
            "fine-tuned"
        )
    ours = unet_channels(**unet_arch(cfg["model"]))
    differ = []
    if ours != theirs:
        differ.append(f"channels {'/'.join(map(str, ours))} vs {'/'.join(map(str, theirs))}")
    norm = str(th.get("normalisation", default_normalisation(str(spec["modality"]))))
    if input_normalisation(cfg) != norm:
        differ.append(f"normalisation {input_normalisation(cfg)} vs {norm}")
    stain = str(th.get("stain_normalisation", "none"))
    if stain_normalisation_of(cfg) != stain:
        differ.append(f"stain_normalisation {stain_normalisation_of(cfg)} vs {stain}")
    if differ:
        raise ValueError(
            f"train.init_from: {spec['name']} is not the network this config builds "
            f"({'; '.join(differ)}): set [model] as its card says"
        )
    pinned = cfg["train"].get("init_sha256")
    if pinned and pinned != spec["sha256"]:
        raise ValueError(
            f"train.init_from: {spec['name']} has sha256 {spec['sha256'][:12]}..., not the "
            f"train.init_sha256 {str(pinned)[:12]}... this config was made with"
        )
    return {
        "name": str(spec["name"]),
        "card": str(card_path),
        "weights": str(card_path.parent / str(spec.get("weights") or f"{spec['name']}.pt")),
        "sha256": str(spec["sha256"]),
        "mpp": float(spec["mpp"]),
        "license": str(spec.get("license", "")),
        "data": _card_data(card, card_path),
        "images": [str(i) for i in card.get("training", {}).get("images", [])],
    }


def shipped_card(name: str, flag: str, hint: str = "") -> Path:
    """The ``.json`` card of shipped model ``name``, or a one-line
    ``ValueError`` (prefixed with the option ``flag``) listing the shipped ones."""
    from nucleus_models.models.weights import WEIGHTS_DIR

    card_path = WEIGHTS_DIR / f"{name}.json"
    if not card_path.is_file():
        from nucleus_models.models import list_models

        shipped = sorted(c.stem for c in WEIGHTS_DIR.glob("*.json"))
        if name in list_models():  # classical-he: registered, weight-free
            raise ValueError(
                f"{flag}: {name!r} has no trained weights to start from "
                f"(models with weights: {', '.join(shipped)}{hint})"
            )
        raise ValueError(f"{flag}: no shipped model {name!r} (shipped: {', '.join(shipped)}{hint})")
    return card_path


def _card_data(card: dict[str, Any], card_path: Path) -> str:
    """What a shipped model was trained on: its card's ``training.data``, else
    the "Training data" line of its Markdown card, else its image count."""
    data = str(card.get("training", {}).get("data", ""))
    md = card_path.with_suffix(".md")
    if not data and md.is_file():
        for line in md.read_text().splitlines():
            if line.startswith("- Training data: "):
                data = line.removeprefix("- Training data: ")
                break
    return data or f"{len(card.get('training', {}).get('images', []))} images"


def seed_everything(seed: int) -> np.random.Generator:
    """Seed torch and return a NumPy generator."""
    import torch

    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def _batch(
    items: list[TrainImage], cfg: dict[str, Any], rng: np.random.Generator
) -> dict[str, Any]:
    import torch

    from nucleus_models.models.unet import normalise_tile

    tr = cfg["train"]
    size = int(tr["patch_size"])
    # images with instances are drawn twice as often as foreground-only ones,
    # each times its own weight (``data.extra`` images: their area's share)
    w = np.array([(2.0 if it.has_instances else 1.0) * it.weight for it in items])
    picks = rng.choice(len(items), size=int(tr["batch_size"]), p=w / w.sum())
    aug = cfg.get("augment", {})
    patches = [
        augment(
            sample_patch(
                items[i],
                size,
                rng,
                scale_range=tuple(tr.get("scale_range", (1.0, 1.0))),
                boundary=str(tr.get("boundary_target", "thick")),
                label_resize=label_resize_of(cfg),
                warp=aug,
            ),
            rng,
            aug,
        )
        for i in picks
    ]
    norm = input_normalisation(cfg)
    x = np.stack([normalise_tile(p["image"], norm) for p in patches])
    out = {"image": torch.from_numpy(x)}
    for key in ("fg", "boundary", "dist", "fg_weight", "inst_weight"):
        out[key] = torch.from_numpy(np.stack([p[key] for p in patches]).astype(np.float32))[:, None]
    if float(tr.get("outline_weight", 0.0)) > 0:
        band = float(tr.get("outline_band_px", 1.5))
        out["outline"] = torch.from_numpy(
            np.stack([outline_band(p["fg"] > 0.5, band) for p in patches]).astype(np.float32)
        )[:, None]
    return out


def outline_band(fg: np.ndarray, band_px: float) -> np.ndarray:
    """Pixels within ``band_px`` of the foreground's outline, on either side
    (where the foreground loss is weighted up by ``train.outline_weight``).

    >>> m = np.zeros((9, 9), bool); m[2:7, 2:7] = True
    >>> b = outline_band(m, 1.0)
    >>> int(b[4, 4]), int(b[2, 4]), int(b[1, 4]), int(b[0, 4]), int(b.sum())
    (0, 1, 1, 0, 36)
    """
    from scipy import ndimage as ndi

    fg = np.asarray(fg, bool)
    if fg.all() or not fg.any():
        return np.zeros(fg.shape, bool)
    d = np.where(fg, ndi.distance_transform_edt(fg), ndi.distance_transform_edt(~fg))
    return d <= float(band_px)


def loss_fn(
    pred: Any,
    b: dict[str, Any],
    *,
    boundary_weight: float = 1.0,
    distance_weight: float = 2.0,
    outline_weight: float = 0.0,
    focal_gamma: float = 0.0,
) -> Any:
    """BCE + soft Dice on foreground, weighted BCE on boundary, MSE on distance.

    ``outline_weight``: the foreground BCE of pixels near the outlines
    (``b["outline"]``, :func:`outline_band`) counts ``1 + outline_weight`` times.
    ``focal_gamma`` > 0: the foreground BCE is the focal loss (each pixel's
    term times ``(1 - p_true) ** focal_gamma``), so pixels the network already
    gets right count less than those it misses (e.g. pale nuclei).
    """
    import torch.nn.functional as F

    fg_logit, bd_logit, dist_logit = pred[:, 0:1], pred[:, 1:2], pred[:, 2:3]
    fw, iw = b["fg_weight"], b["inst_weight"]
    bw = fw * (1 + outline_weight * b["outline"]) if outline_weight > 0 else fw
    bce_px = F.binary_cross_entropy_with_logits(fg_logit, b["fg"], reduction="none")
    if focal_gamma > 0:
        bce_px = bce_px * (1 - (-bce_px).exp()) ** focal_gamma  # exp(-bce) = p of the true class
    bce = (bce_px * bw).sum() / bw.sum().clamp(min=1)
    p = fg_logit.sigmoid() * fw
    dice = 1 - (2 * (p * b["fg"]).sum() + 1) / (p.sum() + (b["fg"] * fw).sum() + 1)
    n_inst = iw.sum().clamp(min=1)
    bd = (
        F.binary_cross_entropy_with_logits(
            bd_logit, b["boundary"], reduction="none", pos_weight=bd_logit.new_tensor(2.0)
        )
        * iw
    ).sum() / n_inst
    dist = ((dist_logit.sigmoid() - b["dist"]) ** 2 * iw).sum() / n_inst
    return bce + dice + boundary_weight * bd + distance_weight * dist


def predict_maps(
    net: Any,
    image: np.ndarray,
    *,
    normalisation: str,
    device: str = "cpu",
    tta: bool = False,
    precision: str = "float32",
) -> np.ndarray:
    """``(3, H, W)`` sigmoid maps (foreground, boundary, distance) of a whole image
    (the network in ``precision``: ``float32`` or ``bfloat16``, as served)."""
    import torch

    from nucleus_models.models.unet import normalise_tile, sigmoid_maps

    h, w = image.shape[:2]
    pad = int(net.stride)  # build_unet's coarsest stride
    H, W = -(-h // pad) * pad, -(-w // pad) * pad
    x = normalise_tile(image, normalisation)
    x = np.pad(x, ((0, 0), (0, H - h), (0, W - w)), mode="reflect")
    t = torch.from_numpy(x)[None].to(device)
    was_training = net.training
    net.eval()

    def maps(x: Any) -> Any:
        return sigmoid_maps(net, x, precision=precision)

    with torch.inference_mode():
        out = maps(t)
        if tta:
            out = (out + maps(t.flip(-1)).flip(-1) + maps(t.flip(-2)).flip(-2)) / 3
    if was_training:
        net.train()
    return out[0, :, :h, :w].float().cpu().numpy()


def postprocess_grid(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The post-processing settings cross-validation chooses from.

    ``cv.fg_thresholds`` x (``cv.seed_thresholds`` for ``seed_mode="threshold"``
    + ``cv.hmax_h`` x ``cv.hmax_smooth`` for ``seed_mode="hmax"``).

    >>> len(postprocess_grid({"cv": {"fg_thresholds": [0.5, 0.6], "seed_thresholds": [0.1],
    ...                              "hmax_h": [0.05, 0.1], "hmax_smooth": [1.0]}}))
    6
    """
    cv = cfg.get("cv", {})
    seeds: list[dict[str, Any]] = [
        {"seed_mode": "threshold", "seed_threshold": float(st)}
        for st in cv.get("seed_thresholds", [0.5])
    ]
    seeds += [
        {"seed_mode": "hmax", "h": float(h), "smooth": float(sm)}
        for h in cv.get("hmax_h", [])
        for sm in cv.get("hmax_smooth", [1.0])
    ]
    return [
        {"fg_threshold": float(ft), **sd} for ft in cv.get("fg_thresholds", [0.5]) for sd in seeds
    ]


def cv_score(metrics: dict[str, float], metric: str | list[str]) -> float:
    """The number cross-validation maximises: one metric, or the mean of several.

    >>> cv_score({"aji": 0.5, "f1_iou50": 0.7}, ["aji", "f1_iou50"])
    0.6
    """
    names = [metric] if isinstance(metric, str) else list(metric)
    return float(np.mean([metrics[m] for m in names]))


def best_setting(
    grid: list[tuple[dict[str, Any], dict[str, float]]], metric: str | list[str]
) -> tuple[dict[str, Any], dict[str, float]]:
    """The ``(setting, metrics)`` pair of ``grid`` with the highest :func:`cv_score`.

    >>> best_setting([({"h": 1}, {"aji": 0.4}), ({"h": 2}, {"aji": 0.6})], "aji")
    ({'h': 2}, {'aji': 0.6})
    """
    return max(grid, key=lambda pm: cv_score(pm[1], metric))


def full_setting(cfg: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A post-processing setting with the config's ``model.min_area`` (default 8)
    where it names none: the keywords of ``instances_from_maps``.

    >>> full_setting({"model": {"min_area": 12}}, {"h": 0.2})
    {'min_area': 12, 'h': 0.2}
    """
    return {"min_area": int(cfg["model"].get("min_area", 8)), **params}


def score_images(
    maps: list[np.ndarray], truths: list[np.ndarray], params: dict[str, Any]
) -> list[dict[str, float]]:
    """Instance metrics of each held-out image under one post-processing setting
    (scored by :func:`.common.score_on_truth`)."""
    from nucleus_models.models.unet import instances_from_maps

    return [
        score_on_truth(instances_from_maps(m[0], m[1], m[2], **params).labels, t)
        for m, t in zip(maps, truths, strict=True)
    ]


def tune_thresholds(
    maps: list[np.ndarray], truths: list[np.ndarray], cfg: dict[str, Any]
) -> list[tuple[dict[str, Any], dict[str, float]]]:
    """Mean instance metrics of each post-processing setting on held-out images.

    Every setting of :func:`postprocess_grid` is scored; then, for the best
    of them (by ``cv.metric``), the filters ``cv.min_areas`` x ``cv.min_scores``
    (instances smaller than that many pixels, or with a lower mean
    foreground probability, dropped) are scored too.  ``truths`` may be on a
    finer grid than ``maps`` (the images' own resolution): labels are then
    resized to it as :func:`nucleus_models.detection.segment_image` does
    (:func:`nucleus_models.instances.resize_labels`), so the scores are
    those the harness reports.
    """
    cv_cfg = cfg.get("cv", {})
    min_area = int(cfg["model"].get("min_area", 8))

    def score(params: dict[str, Any]) -> dict[str, float]:
        return mean_metrics(score_images(maps, truths, full_setting(cfg, params)))

    out = [(params, score(params)) for params in postprocess_grid(cfg)]
    best = best_setting(out, cv_cfg.get("metric", "aji"))[0]
    for area in cv_cfg.get("min_areas", []):
        for ms in cv_cfg.get("min_scores", [0.0]):
            if int(area) == min_area and float(ms) == 0.0:
                continue  # the setting already scored
            params = {**best, "min_area": int(area), "min_score": float(ms)}
            out.append((params, score(params)))
    return out


def train_unet(
    cfg: dict[str, Any],
    images: list[TrainImage],
    out_dir: str | Path,
    *,
    steps: int | None = None,
    resume: bool = False,
    progress: bool = True,
) -> Path:
    """Train a U-Net on ``images``; checkpoints go to ``out_dir/checkpoint.pt``.

    Resuming restores model, optimiser, schedule, step and random state, so an
    interrupted run continues where it stopped.  ``train.device`` (``cpu`` by
    default, or ``auto``/``cuda``) picks where the network trains; patches
    are made on the CPU, and a checkpoint loads anywhere.  ``train.ema`` (a decay, e.g.
    0.998) also keeps an exponential moving average of the weights (buffers
    included) in the checkpoint as ``ema_model``; evaluation and export use it
    (:func:`.common.shipped_state`).
    """
    import torch

    from nucleus_models.models.unet import build_unet, pick_device

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tr = cfg["train"]
    total = int(steps if steps is not None else tr["steps"])
    rng = seed_everything(int(cfg.get("seed", 0)))
    if tr.get("threads"):
        torch.set_num_threads(int(tr["threads"]))
    device = pick_device(tr.get("device", "cpu"))
    net = build_unet(**unet_arch(cfg["model"]))
    init = starting_weights(cfg)
    if init is not None:  # fine-tuning (a resumed checkpoint replaces these below)
        from nucleus_models.models.weights import load_state_dict

        net.load_state_dict(load_state_dict(init["weights"], init["sha256"]))
        if abs(init["mpp"] - float(cfg["model"]["mpp"])) > 1e-9:
            log.warning(
                "fine-tuning %s (trained at %g um/px) at %g um/px",
                init["name"],
                init["mpp"],
                float(cfg["model"]["mpp"]),
            )
    net = net.to(device)
    # train.precision = "bfloat16": forward under autocast, channels-last
    # (weights, optimiser and loss stay float32)
    precision = str(tr.get("precision", "float32"))
    if precision not in TRAIN_PRECISIONS:
        raise ValueError(f"train.precision must be float32 or bfloat16, not {precision!r}")
    bf16 = precision == "bfloat16"
    if bf16:
        net = net.to(memory_format=torch.channels_last)
    autocast_to = torch.device(device).type
    opt = torch.optim.AdamW(
        net.parameters(), lr=float(tr["lr"]), weight_decay=float(tr.get("weight_decay", 1e-4))
    )
    sched = warmup_cosine(opt, total, warmup_fraction=0.03)
    ckpt = out / "checkpoint.pt"
    step = 0
    history: list[dict[str, float]] = []
    sessions: list[dict[str, Any]] = []
    ema_decay = float(tr.get("ema", 0.0))
    ema = None
    if ema_decay > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
    if resume and ckpt.exists():
        step, history, state = restore_checkpoint(
            ckpt, net=net, opt=opt, sched=sched, rng=rng, settings=training_settings(cfg)
        )
        sessions = list(state.get("sessions", []))
        if ema is not None:
            if "ema_model" in state:
                ema.module.load_state_dict(state["ema_model"])
                ema.n_averaged.fill_(int(state.get("ema_n", 1)))
            else:  # a run continued with averaging: start the average from here
                ema.module.load_state_dict(net.state_dict())
                ema.n_averaged.fill_(1)
    net.train()

    def one_step() -> dict[str, float]:
        b = {k: v.to(device, non_blocking=True) for k, v in _batch(images, cfg, rng).items()}
        x = b["image"].to(memory_format=torch.channels_last) if bf16 else b["image"]
        with torch.autocast(autocast_to, dtype=torch.bfloat16, enabled=bf16):
            pred = net(x)
        loss = loss_fn(
            pred.float(),
            b,
            boundary_weight=float(tr.get("boundary_weight", 1.0)),
            distance_weight=float(tr.get("distance_weight", 2.0)),
            outline_weight=float(tr.get("outline_weight", 0.0)),
            focal_gamma=float(tr.get("focal_gamma", 0.0)),
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update_parameters(net)
        return {"loss": loss.item()}

    extra: dict[str, Any] = {"training_settings": training_settings(cfg)}
    if ema is not None:
        avg = ema
        extra |= {
            "ema_model": lambda: avg.module.state_dict(),
            "ema_n": lambda: int(avg.n_averaged.item()),
            "ema_decay": ema_decay,
        }

    return train_loop(
        one_step,
        net=net,
        opt=opt,
        sched=sched,
        rng=rng,
        out=out,
        step=step,
        total=total,
        history=history,
        desc=f"train {cfg.get('name', 'unet')}",
        progress=progress,
        log_every=int(tr.get("log_every", 25)),
        checkpoint_every=int(tr.get("checkpoint_every", 250)),
        sessions=sessions,
        **extra,
    )
