"""Registry of named nucleus models (``<arch>-<data>``)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ModelError
from .base import ModelSpec, NucleusModel

__all__ = ["register_model", "get_model", "get_spec", "list_models"]


@dataclass(frozen=True)
class _Entry:
    spec: ModelSpec
    builder: Callable[..., NucleusModel]


_REGISTRY: dict[str, _Entry] = {}


def register_model(
    spec: ModelSpec,
) -> Callable[[Callable[..., NucleusModel]], Callable[..., NucleusModel]]:
    """Decorator registering ``builder(**options) -> NucleusModel`` under ``spec.name``."""

    def deco(builder: Callable[..., NucleusModel]) -> Callable[..., NucleusModel]:
        if spec.name in _REGISTRY:
            raise ValueError(f"model {spec.name!r} is already registered")
        _REGISTRY[spec.name] = _Entry(spec, builder)
        return builder

    return deco


_LOADED = False
_LOAD_LOCK = threading.RLock()


def _ensure_builtin() -> None:
    """Register the built-in and shipped models once; threads that ask
    meanwhile wait for the whole registry (not a half-filled one), and a
    re-entrant call while registering returns at once."""
    global _LOADED
    with _LOAD_LOCK:
        if _LOADED:
            return
        _LOADED = True
        from . import classical  # noqa: F401  (registers classical-he, histomicstk-kofahi)
        from .weights import register_shipped

        register_shipped()


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    _ensure_builtin()
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The spec of model ``name`` (cheap: builds nothing)."""
    _ensure_builtin()
    try:
        return _REGISTRY[name].spec
    except KeyError:
        raise ModelError(
            f"unknown model {name!r}; available: {', '.join(sorted(_REGISTRY))}"
        ) from None


def get_model(name: str, **options: Any) -> NucleusModel:
    """Build model ``name`` with builder ``options`` (e.g. thresholds, device)."""
    return _REGISTRY[get_spec(name).name].builder(**options)
