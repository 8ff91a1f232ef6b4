"""One toolchain, configured in pyproject.toml: ruff (lint + format) and mypy on the library."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_ruff_lint() -> None:
    res = _run(str(BIN / "ruff"), "check", ".")
    assert res.returncode == 0, res.stdout[-4000:]


def test_ruff_format() -> None:
    res = _run(str(BIN / "ruff"), "format", "--check", ".")
    assert res.returncode == 0, res.stdout[-4000:]


def test_mypy_library() -> None:
    res = _run(str(BIN / "mypy"))
    assert res.returncode == 0, res.stdout[-4000:]
