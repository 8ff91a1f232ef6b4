#!/usr/bin/env bash
# Run the test suite under the PyTorch the Docker image runs.
#
# The image keeps its base image's torch (Dockerfile: BASE_IMAGE, installed
# with TORCH_SPEC=""), while `make setup` and CI install the newer torch of
# scripts/install.sh. This builds a venv the way the image is built (that
# torch first, then scripts/install.sh with TORCH_SPEC="") and runs the tests
# in it, but for the Girder server tests (their own venv). It downloads
# ~3 GB (CUDA wheels) and takes ~10 min; it is not part of `make test`.
#
#   IMAGE_TORCH  torch/torchvision of the base image (keep in step with the
#                Dockerfile's BASE_IMAGE; tests/test_packaging.py checks it)
#   VENV         where to build it (default .venv-image)
set -euo pipefail
IMAGE_TORCH=${IMAGE_TORCH-"torch==2.9.1 torchvision==0.24.1"}
VENV=${VENV:-.venv-image}
PYTHON=${PYTHON:-python3}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$HERE"
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install -q $IMAGE_TORCH
PYTHON="$VENV/bin/python" TORCH_SPEC="" EXTRAS=dev bash scripts/install.sh > "$VENV/install.log"
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider --ignore=tests/test_dsa_girder.py "$@"
