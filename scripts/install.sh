#!/usr/bin/env bash
# Install the runtime of nucleus-models into the current Python environment.
# Used by `make setup` (into .venv) and by the Dockerfile (into the image), so
# CI exercises exactly the install steps the image runs.
#
#   TORCH_SPEC   torch/torchvision requirement ("" = keep the torch already
#                installed, as in the CUDA PyTorch base image)
#   EXTRAS       extras of the project to install ("dev" for tests/lint)
set -euo pipefail
PY=${PYTHON:-python}
TORCH_SPEC=${TORCH_SPEC-"torch==2.14.1 torchvision==0.29.1"}
EXTRAS=${EXTRAS-}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

$PY -m pip install --upgrade pip setuptools wheel
if [ -n "$TORCH_SPEC" ]; then
  # shellcheck disable=SC2086
  $PY -m pip install $TORCH_SPEC
fi
# histomicstk pins an ancient dask and large-image[sources] (GDAL); install it
# without its declared deps and add its real runtime needs explicitly.
$PY -m pip install --no-deps histomicstk==1.4.0
$PY -m pip install -r "$HERE/scripts/requirements-runtime.txt"
if [ -n "$EXTRAS" ]; then
  $PY -m pip install -e "$HERE[$EXTRAS]"
  # large_image's own annotation schema, for the schema contract test. The
  # package pins an old Girder, and the test reads only its schema class, so
  # it is installed without dependencies.
  $PY -m pip install --no-deps girder-large-image-annotation==1.35.6
else
  $PY -m pip install -e "$HERE"
fi
