"""slicer_cli_web progress lines (``<filter-progress>``) on stdout.

These, and a line saying what a long step does (:meth:`FilterProgress.note`),
are the only lines the library writes to stdout: slicer_cli_web turns the
tags into job progress in HistomicsUI and shows the rest in the job's log.
"""

from __future__ import annotations

import sys
from typing import TextIO
from xml.sax.saxutils import escape

__all__ = ["FilterProgress"]


class FilterProgress:
    """Write ``<filter-start>``, throttled ``<filter-progress>`` and ``<filter-end>`` lines."""

    def __init__(
        self, name: str, comment: str = "", *, stream: TextIO | None = None, step: float = 0.01
    ):
        self.name = name
        self.comment = comment
        self.stream = stream or sys.stdout
        self.step = step
        self._last = -1.0

    def _write(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def start(self) -> None:
        """Announce the filter."""
        self._write(
            f"<filter-start><filter-name>{self.name}</filter-name>"
            f"<filter-comment>{escape(self.comment)}</filter-comment></filter-start>"
        )

    def note(self, text: str) -> None:
        """Say what the filter is doing: a line in the job's log, and the
        comment HistomicsUI shows with its progress (slicer_cli_web takes
        the last ``<filter-comment>`` as the job's progress message)."""
        self.comment = text
        self._write(text)
        self._write(f"<filter-comment>{escape(text)}</filter-comment>")

    def __call__(self, fraction: float) -> None:
        """Report progress in [0, 1] (throttled to ``step``)."""
        fraction = min(max(float(fraction), 0.0), 1.0)
        if fraction - self._last >= self.step or fraction >= 1.0 and self._last < 1.0:
            self._last = fraction
            self._write(f"<filter-progress>{fraction:.4f}</filter-progress>")

    def end(self, seconds: float | None = None) -> None:
        """Close the filter."""
        t = f"<filter-time>{seconds:.2f}</filter-time>" if seconds is not None else ""
        self._write(f"<filter-end><filter-name>{self.name}</filter-name>{t}</filter-end>")
