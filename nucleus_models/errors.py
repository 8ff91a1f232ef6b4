"""Exceptions that carry a message meant for the user (one line, no traceback)."""

from __future__ import annotations

__all__ = ["NucleusModelsError", "SlideError", "ParameterError", "ModelError", "NoTissueError"]


class NucleusModelsError(Exception):
    """Base class: a problem with the input that the user can fix."""


class SlideError(NucleusModelsError):
    """The slide is missing, unreadable, truncated or lacks needed metadata."""


class ParameterError(NucleusModelsError):
    """A parameter value is invalid (ROI outside the slide, tile size <= overlap...)."""


class ModelError(NucleusModelsError):
    """Unknown model, or weights that fail their checksum."""


class NoTissueError(NucleusModelsError):
    """The analysis region holds no tissue."""
