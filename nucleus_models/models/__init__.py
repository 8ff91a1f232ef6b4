"""Nucleus models: the registry and the model contract."""

from .base import ModelSpec, NucleusModel, TileInstances, sha256_of_file
from .registry import get_model, get_spec, list_models, register_model

__all__ = [
    "ModelSpec",
    "NucleusModel",
    "TileInstances",
    "get_model",
    "get_spec",
    "list_models",
    "register_model",
    "sha256_of_file",
]
