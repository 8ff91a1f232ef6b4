"""Shipped weights: checked loading and registration from their cards.

Each learned model ships as ``nucleus_models/weights/<name>.pt`` (a
``state_dict``) with ``<name>.json`` (its spec: architecture, resolution,
thresholds, sha256, metrics, license) and a human-readable ``<name>.md``
model card.  Nothing is ever downloaded.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..errors import ModelError
from .base import ModelSpec, NucleusModel, sha256_of_file

__all__ = ["WEIGHTS_DIR", "load_state_dict", "register_shipped", "spec_from_card"]

log = logging.getLogger(__name__)
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"


def load_state_dict(path: str | Path, sha256: str) -> dict[str, Any]:
    """Load a ``state_dict`` after checking its sha256 (``weights_only=True``).

    Raises
    ------
    ModelError
        Missing file or checksum mismatch.
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise ModelError(f"weights file not found: {p}")
    got = sha256_of_file(p)
    if got != sha256:
        raise ModelError(
            f"weights {p.name}: sha256 mismatch (expected {sha256[:12]}..., got {got[:12]}...)"
        )
    state = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    return state


_SPEC_KEYS = set(ModelSpec.__dataclass_fields__)


def spec_from_card(card: dict[str, Any]) -> ModelSpec:
    """Build a ``ModelSpec`` from the ``spec`` block of a weights card."""
    s = {k: v for k, v in card["spec"].items() if k in _SPEC_KEYS}
    for key in ("classes", "class_colors"):
        if key in s:
            s[key] = tuple(s[key])
    return ModelSpec(**s)


def _builder(spec: ModelSpec, arch: str, weights: Path, int8: dict[str, Any] | None = None):  # noqa: ANN202
    def build(**options: Any) -> NucleusModel:
        if arch == "unet":
            from .unet import UNetModel

            return UNetModel(spec, str(weights), int8=int8, **options)
        if arch in ("fasterrcnn", "fcos", "maskrcnn"):
            from .torchvision_detectors import DetectorModel

            return DetectorModel(spec, str(weights), arch=arch, **options)
        raise ModelError(f"model {spec.name}: unknown architecture {arch!r}")

    return build


def register_shipped(directory: Path = WEIGHTS_DIR) -> list[str]:
    """Register every ``<name>.json`` card in ``directory``; return the names."""
    from .registry import _REGISTRY, register_model

    names = []
    for card_path in sorted(directory.glob("*.json")):
        card = json.loads(card_path.read_text())
        spec = spec_from_card(card)
        if spec.name in _REGISTRY:
            continue
        weights = directory / (spec.weights or f"{spec.name}.pt")
        arch = card.get("arch", "unet")
        register_model(spec)(_builder(spec, arch, weights, card.get("int8")))
        names.append(spec.name)
    return names
