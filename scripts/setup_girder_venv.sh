#!/usr/bin/env bash
# Create .venv-girder: a real Girder 5 server (large_image + annotation plugins)
# for the integration tests, in its own venv because its pre-release large-image
# conflicts with the runtime's. Pins from ../shared/docs/ENVIRONMENT.md.
# Idempotent: skipped when the stamp matches the pins.
#
#   PYTHON       interpreter that creates the venv (default python3)
#   GIRDER_VENV  where to create it (default <repo>/.venv-girder)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
VENV=${GIRDER_VENV:-$HERE/.venv-girder}
PINS=(
  "girder==5.0.21"
  "girder-jobs==5.0.21"
  "girder-large-image==1.35.6a198"
  "girder-large-image-annotation==1.35.6a198"
  "large-image[tiff,tifffile,pil]==1.35.6a198"
  "girder-slicer-cli-web==5.0.21"
  "girder-client"
  "mongomock"
)
STAMP="$VENV/.setup-stamp"
WANT="$(printf '%s\n' "${PINS[@]}")"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
# keep the venv out of git whatever the repository's .gitignore says
printf '*\n' > "$VENV/.gitignore"
"$VENV/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
"$VENV/bin/python" -m pip install --quiet "${PINS[@]}"
"$VENV/bin/python" -c "import girder, girder_large_image, girder_large_image_annotation, mongomock, uvicorn"
printf '%s\n' "${PINS[@]}" > "$STAMP"
echo "Girder test venv ready: $VENV"
