"""What every trainer shares: the learning-rate schedule, resumable checkpoints,
and writing shipped weights with their spec card."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "warmup_cosine",
    "save_checkpoint",
    "training_settings",
    "restore_checkpoint",
    "train_loop",
    "write_weights",
    "shipped_state",
    "invocation_text",
    "sessions_text",
    "training_lines",
    "training_record",
    "score_on_truth",
    "mean_metrics",
    "trained_on",
    "cv_fingerprint",
    "fold_seconds",
]

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]

# config keys a cross-validation does not depend on: the model card's text,
# the final model's step count, and what only inference reads
_NOT_IN_CV = {
    "card": None,
    "_config_path": None,
    # where and on how many threads a run trains is not what it trains
    "train": ("steps", "device", "threads"),
    "model": (
        "tile_size",
        "tile_overlap",
        "batch_size",
        "max_nucleus_diameter_um",
        "color",
        "cpu_bfloat16",
        "cpu_int8",
    ),
}


def cpu_model() -> str:
    """The CPU's model name (Linux's ``/proc/cpuinfo``; ``platform.processor()``
    is empty there), else the machine type (``x86_64``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name") and ":" in line:
                    name = " ".join(line.split(":", 1)[1].split())
                    if name:
                        return f"{name} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_text(device: Any = None) -> str:
    """The machine a training run used, for the model card: CPU and threads,
    and the GPU when the network ran on one (``device``, a torch device or
    its name; without one, any GPU this process sees)."""
    import torch

    n = torch.get_num_threads()
    cpu = f"{cpu_model()}, {n} CPU thread{'s' if n > 1 else ''}"
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type != "cuda":
        return cpu
    return f"{torch.cuda.get_device_name(dev.index or 0)} (CUDA), {cpu}"


def trained_on(sessions: list[dict[str, Any]]) -> str:
    """The machine(s) the recorded training sessions ran on, for the model
    card; this process's own (:func:`hardware_text`) when none were recorded.
    An export runs in a process of its own, whose threads say nothing of the
    training's.

    >>> trained_on([{"hardware": "x86_64, 1 CPU thread"}, {"hardware": "x86_64, 1 CPU thread"}])
    'x86_64, 1 CPU thread'
    >>> trained_on([{"hardware": "a"}, {"hardware": "b"}, {"hardware": "a"}])
    'a; b'
    """
    seen = [str(s["hardware"]) for s in sessions if s.get("hardware")]
    return "; ".join(dict.fromkeys(seen)) if seen else hardware_text()


def invocation_text(default: str) -> str:
    """The ``nucleus-bench train ...`` (or ``finetune ...``) command line this
    process runs, or ``default`` when training was started some other way
    (from Python)."""
    if len(sys.argv) > 1 and sys.argv[1] in ("train", "finetune"):
        return shlex.join(["nucleus-bench", *sys.argv[1:]])
    return default


def sessions_text(sessions: list[dict[str, Any]], earlier: str = "") -> str:
    """One line for the model card: each invocation that trained the
    checkpoint (steps, command, time, machine), as :func:`train_loop`
    recorded them.  ``earlier`` (the config's ``card.earlier_training``)
    says how steps trained before sessions were recorded were made.

    >>> sessions_text([{"from_step": 0, "to_step": 900, "command": "nucleus-bench train --config c",
    ...                 "seconds": 600.0, "hardware": "x86_64, 2 CPU threads"}])
    'steps 0-900 `nucleus-bench train --config c` (10.0 min on x86_64, 2 CPU threads)'
    >>> sessions_text([{"from_step": 500, "to_step": 900, "command": "c", "seconds": 60.0, "hardware": "h"}])
    'steps 0-500 not recorded (checkpoint from before sessions were recorded); steps 500-900 `c` (1.0 min on h)'
    >>> sessions_text([{"from_step": 500, "to_step": 900, "command": "c", "seconds": 60.0, "hardware": "h"}],
    ...               "run x")
    'steps 0-500 (before sessions were recorded): run x; steps 500-900 `c` (1.0 min on h)'
    """
    parts = []
    if sessions and int(sessions[0]["from_step"]) > 0:
        parts.append(
            f"steps 0-{int(sessions[0]['from_step'])} (before sessions were recorded): {earlier}"
            if earlier
            else f"steps 0-{int(sessions[0]['from_step'])} not recorded "
            "(checkpoint from before sessions were recorded)"
        )
    for s in sessions:
        parts.append(
            f"steps {int(s['from_step'])}-{int(s['to_step'])} `{s['command']}` "
            f"({float(s['seconds']) / 60:.1f} min on {s['hardware']})"
        )
    return "; ".join(parts)


def data_paths(cfg: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """``(table, key)`` of every data path a config sets: ``data.root``,
    ``data.foreground_only_masks`` and each ``[[data.extra]]`` root.

    >>> cfg = {"data": {"root": "a", "extra": [{"dataset": "x", "root": "b"}]}}
    >>> [t[k] for t, k in data_paths(cfg)]
    ['a', 'b']
    """
    d = cfg.get("data", {})
    paths = [(d, key) for key in ("root", "foreground_only_masks") if d.get(key)]
    return paths + [(e, "root") for e in d.get("extra", []) if e.get("root")]


def cv_fingerprint(cfg: dict[str, Any]) -> str:
    """sha256 of everything in a loaded config that its cross-validation
    depends on: the config without its card, its final model's step count
    and inference-only settings (tile size, batch size); the folds' step
    count is made explicit (``cv.steps``, else ``train.steps``), and data
    paths are taken relative to the repository, so a fresh checkout of the
    same config gets the same fingerprint.

    >>> a = {"train": {"steps": 10, "lr": 0.1}, "card": {"data": "x"}}
    >>> b = {"train": {"steps": 20, "lr": 0.1}, "cv": {"steps": 10}}
    >>> cv_fingerprint(a) == cv_fingerprint(b)
    True
    >>> cv_fingerprint(a) == cv_fingerprint({"train": {"steps": 10, "lr": 0.2}})
    False
    """
    c = _settings_copy(cfg)
    c.setdefault("cv", {}).setdefault("steps", cfg.get("train", {}).get("steps"))
    text = json.dumps(c, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _settings_copy(cfg: dict[str, Any], *, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """A copy of a loaded config without what neither its cross-validation nor
    its weights depend on (:data:`_NOT_IN_CV`) nor the tables in ``drop``,
    with data paths relative to the repository (a fresh checkout: the same)."""
    c = copy.deepcopy({k: v for k, v in cfg.items() if k not in drop})
    for section, keys in _NOT_IN_CV.items():
        if keys is None:
            c.pop(section, None)
        else:
            for key in keys:
                c.get(section, {}).pop(key, None)
    for table, key in data_paths(c):
        table[key] = os.path.relpath(table[key], REPO)
    return c


def training_record(ckpt: Path) -> tuple[float, list[dict[str, Any]]]:
    """A checkpoint's training seconds (summed over the invocations that
    trained it, from its history) and its recorded sessions, read in one load."""
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    hist = state.get("history", [])
    return (float(hist[-1]["seconds"]) if hist else 0.0), list(state.get("sessions", []))


def fold_seconds(cv_dir: Path) -> float:
    """Training seconds of the cross-validation fold models under ``cv_dir``."""
    return sum(training_record(p)[0] for p in sorted(cv_dir.glob("fold*/checkpoint.pt")))


def training_lines(meta: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """The model card's lines on how the final model was trained: every
    recorded training invocation (steps from before sessions were recorded
    as the config's ``card.earlier_training`` says), and the command that
    exported it."""
    earlier = str(cfg.get("card", {}).get("earlier_training", ""))
    if not meta.get("sessions"):
        return [f"- Training command: `{meta['command']}`"]
    return [
        f"- Training sessions: {sessions_text(meta['sessions'], earlier)}",
        f"- Exported with: `{meta['command']}`",
    ]


def score_on_truth(labels: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Instance metrics of a held-out prediction against its reference; a
    prediction on a coarser grid is first resized to the reference's
    (:func:`nucleus_models.instances.resize_labels`), as
    :func:`nucleus_models.detection.segment_image` does, so cross-validation
    scores what ``nucleus-bench eval`` would."""
    from benchmark.metrics import instance_metrics
    from nucleus_models.instances import resize_labels

    grown = resize_labels(np.asarray(labels, np.int32), (truth.shape[1], truth.shape[0]))
    return instance_metrics(truth, grown)


def outlines_on_grid(labels: np.ndarray, shape: tuple[int, int], **kw: Any) -> np.ndarray:
    """The outlines a slide's annotation gets for ``labels`` (``nuclei_from_labels``
    on their grid; ``kw`` its options, e.g. ``simplify``), scaled to a grid of
    ``shape`` (rows, cols) and rasterised there as the MoNuSeg XML polygons are
    (pixel centres inside), for scoring the annotation rather than the labels.

    >>> lab = np.zeros((4, 4), np.int32); lab[1:3, 1:3] = 1
    >>> int((outlines_on_grid(lab, (8, 8)) == 1).sum())  # the 2x2 block at 2x: 4x4 pixels
    16
    """
    from benchmark.datasets.monuseg import rasterize_polygons
    from nucleus_models.instances import nuclei_from_labels

    fy, fx = shape[0] / labels.shape[0], shape[1] / labels.shape[1]
    # vertices: pixel corners at integers; rasterised in the pixel-index frame
    polys = [p * (fx, fy) - 0.5 for p in nuclei_from_labels(labels, **kw).polygons()]
    return rasterize_polygons(polys, shape)


def mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per-metric mean over images (NaN-aware: a metric undefined on one image
    does not void the mean).

    >>> mean_metrics([{"aji": 0.5, "dice": float("nan")}, {"aji": 0.25, "dice": 0.5}])
    {'aji': 0.375, 'dice': 0.5}
    """
    return {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0]}


def warmup_cosine(opt: Any, total: int, *, warmup_fraction: float) -> Any:
    """Linear warm-up over ``warmup_fraction`` of ``total`` steps, then cosine decay to 0."""
    import torch

    warm = max(1, int(warmup_fraction * total))
    span = max(1, total)  # 0 steps (a starting model taken as it is) never steps the schedule
    return torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, span) / span)),
    )


def save_checkpoint(
    path: Path,
    *,
    net: Any,
    opt: Any,
    sched: Any,
    step: int,
    rng: np.random.Generator,
    history: list[dict[str, float]],
    **extra: Any,
) -> None:
    """Everything needed to continue a run exactly: model, optimiser, schedule, step, random state.

    Written to a temporary file and renamed over the last one, so a run
    killed while saving still resumes from its previous checkpoint.
    """
    import torch

    from nucleus_models.io.atomic import atomic_write

    state = {
        **extra,
        "model": net.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "step": step,
        "numpy_rng": rng.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
        "history": history,
    }
    with atomic_write(path, "wb") as f:
        torch.save(state, f)


def training_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """What a run's weights depend on, as plain JSON: the config without its
    card, name and cross-validation table, step count, device and threads,
    and the settings only inference reads; data paths relative to the
    repository.  A run resumed with other values of these would be another
    run's continuation (:func:`restore_checkpoint` refuses it).

    >>> training_settings({"name": "a", "train": {"steps": 5, "lr": 0.1}, "cv": {"folds": 3}})
    {'train': {'lr': 0.1}}
    """
    drop = ("cv", "name", *(k for k in cfg if k.startswith("_")))
    return dict(json.loads(json.dumps(_settings_copy(cfg, drop=drop), default=str)))


def changed_settings(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two :func:`training_settings`.

    >>> changed_settings({"model": {"base": 12}, "seed": 0}, {"model": {"base": 8}, "seed": 0})
    ['model.base']
    """
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [] if old == new else [prefix or "(all)"]
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}.{key}" if prefix else str(key)
        out += changed_settings(old.get(key), new.get(key), name)
    return out


def settings_changes(state: Any, settings: dict[str, Any]) -> list[str]:
    """The keys of ``settings`` (:func:`training_settings`) a checkpoint's
    ``state`` was trained with other values of (none when it recorded none).

    >>> settings_changes({"training_settings": {"seed": 0}}, {"seed": 1}), settings_changes({}, {})
    (['seed'], [])
    """
    recorded = state.get("training_settings") if isinstance(state, dict) else None
    return [] if recorded is None else changed_settings(recorded, settings)


def restore_checkpoint(
    path: Path,
    *,
    net: Any,
    opt: Any,
    sched: Any,
    rng: np.random.Generator,
    expect: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
) -> tuple[int, list[dict[str, float]], dict[str, Any]]:
    """Load a checkpoint written by :func:`save_checkpoint` into the given objects.

    ``expect``: extra keys that must hold these values (e.g. the architecture),
    checked before anything is loaded; ``settings``: the run's
    :func:`training_settings`, which must be those the checkpoint was made
    with (when it recorded them).  Returns ``(step, history, state)``.
    """
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError) as exc:  # (an old, non-atomic save cut short)
        raise ValueError(
            f"{path}: not a readable checkpoint ({' '.join(str(exc).split())[:200]}); "
            "train again without --resume"
        ) from None
    for key, want in (expect or {}).items():
        if state.get(key) != want:
            raise ValueError(f"{path} holds a {state.get(key)!r} model, not {want!r}")
    if settings is not None and (changed := settings_changes(state, settings)):
        raise ValueError(
            f"{path} was trained with another config ({', '.join(changed[:5])} differ): "
            "put them back to continue it, or train again without --resume"
        )
    net.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    rng.bit_generator.state = state["numpy_rng"]
    torch.set_rng_state(state["torch_rng"])
    step = int(state["step"])
    log.warning("resumed from %s at step %d", path, step)
    return step, list(state.get("history", [])), state


def shipped_state(state: dict[str, Any]) -> dict[str, Any]:
    """The weights a checkpoint is evaluated and shipped with: the moving
    average when the run kept one (``train.ema``), else the trained weights."""
    return state["ema_model"] if "ema_model" in state else state["model"]


def train_loop(
    step_fn: Callable[[], dict[str, float]],
    *,
    net: Any,
    opt: Any,
    sched: Any,
    rng: np.random.Generator,
    out: Path,
    step: int,
    total: int,
    history: list[dict[str, float]],
    desc: str,
    progress: bool = True,
    log_every: int = 25,
    checkpoint_every: int = 250,
    sessions: list[dict[str, Any]] | None = None,
    **checkpoint_extra: Any,
) -> Path:
    """Run ``step_fn`` (one optimiser step; returns its losses, ``"loss"``
    among them) from ``step`` to ``total`` with a progress bar, running means
    in ``out/train.log`` and ``history``, and a checkpoint every
    ``checkpoint_every`` steps and at the end; returns the checkpoint path.
    A callable in ``checkpoint_extra`` is called at each checkpoint (state
    that changes during training, such as averaged weights).

    ``sessions`` (the restored checkpoint's ``sessions``, if any) gains one
    record for this invocation when it trains at least one step: first and
    last step, command line, machine and seconds; it is saved in the
    checkpoint so that a model card can say how a continued run was made.
    A restored ``step`` past ``total`` is a ``ValueError``.
    """
    from tqdm import tqdm

    ckpt = out / "checkpoint.pt"
    if step > total:
        # a model is not un-trained: going on would export (or score) it as a
        # `total`-step model, the card and cross-validation record saying so
        raise ValueError(
            f"{ckpt} has trained {step} steps, more than the {total} asked for: ask for "
            f"{step} or more (--steps or train.steps for the final model, cv.steps for the "
            "cross-validation folds), or train again without --resume"
        )

    def _save(at: int) -> None:
        extra = {k: v() if callable(v) else v for k, v in checkpoint_extra.items()}
        save_checkpoint(
            ckpt,
            net=net,
            opt=opt,
            sched=sched,
            step=at,
            rng=rng,
            history=history,
            sessions=sessions,
            **extra,
        )

    bar = tqdm(total=total, initial=step, desc=desc, disable=not progress)
    # time accumulates over resumed invocations (the history holds the past)
    t0, running = time.perf_counter() - (history[-1]["seconds"] if history else 0.0), []
    sessions = list(sessions or [])
    t_start = time.perf_counter()
    if step < total:
        sessions.append(
            {
                "from_step": int(step),
                "to_step": int(step),
                "command": invocation_text("(started from Python, not nucleus-bench)"),
                "hardware": hardware_text(next(net.parameters()).device),
                "seconds": 0.0,
            }
        )
    with (out / "train.log").open("a") as logf:
        # (a run started again without --resume appends to the same log)
        logf.write(f"{'resumed' if step else 'started'} at {step} of {total} steps\n")
        while step < total:
            running.append(step_fn())
            sched.step()
            step += 1
            bar.update(1)
            if step % log_every == 0 or step == total:
                recent = running[-log_every:]
                mean = {k: float(np.mean([r[k] for r in recent])) for k in recent[0]}
                bar.set_postfix(loss=f"{mean['loss']:.4f}")
                history.append({"step": step, **mean, "seconds": time.perf_counter() - t0})
                logf.write(
                    f"step {step} "
                    + " ".join(f"{k} {v:.5f}" for k, v in mean.items())
                    + f" lr {sched.get_last_lr()[0]:.2e} t {time.perf_counter() - t0:.0f}s\n"
                )
                logf.flush()
            if step % checkpoint_every == 0 or step == total:
                sessions[-1].update(to_step=int(step), seconds=time.perf_counter() - t_start)
                _save(step)
    bar.close()
    if not ckpt.exists():  # 0 steps: the starting weights are the model
        _save(step)
    return ckpt


def write_weights(
    cfg: dict[str, Any],
    ckpt: Path,
    weights_dir: Path,
    *,
    arch: str,
    thresholds: dict[str, Any],
    card: dict[str, Any],
    markdown: Any,
) -> Path:
    """Write ``<name>.pt`` (state_dict), ``<name>.json`` (spec + ``card``) and ``<name>.md``.

    ``markdown(spec) -> str`` renders the human-readable model card from the
    finished spec (which then knows the weights' sha256).
    """
    import torch

    from nucleus_models.models.base import sha256_of_file

    name = cfg["name"]
    weights_dir.mkdir(parents=True, exist_ok=True)
    pt = weights_dir / f"{name}.pt"
    from nucleus_models.io.atomic import atomic_write

    with atomic_write(pt, "wb") as f:
        torch.save(shipped_state(torch.load(ckpt, map_location="cpu", weights_only=True)), f)
    m = cfg["model"]
    spec = {
        "name": name,
        "mpp": float(m["mpp"]),
        "modality": m.get("modality", "brightfield"),
        "classes": ["nucleus"],
        "class_colors": [m.get("color", "rgb(0,200,255)")],
        "tile_size": int(m.get("tile_size", 512)),
        "tile_overlap": int(m.get("tile_overlap", 48)),
        "max_nucleus_diameter_um": float(m.get("max_nucleus_diameter_um", 20.0)),
        "batch_size": int(m.get("batch_size", 4)),
        "weights": pt.name,
        "sha256": sha256_of_file(pt),
        "thresholds": thresholds,
        "description": cfg.get("card", {}).get("description", ""),
        "license": cfg.get("card", {}).get("license", ""),
    }
    (weights_dir / f"{name}.json").write_text(
        json.dumps({"arch": arch, "spec": spec, **card}, indent=2) + "\n"
    )
    (weights_dir / f"{name}.md").write_text(markdown(spec))
    return pt
