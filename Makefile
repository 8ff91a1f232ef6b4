# Two commands for a newcomer: `make demo` and `make test` (both set up .venv first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
# A real Girder 5 server for the integration tests lives in its own venv
# (its pre-release large-image conflicts with the runtime's).
GIRDER_VENV ?= .venv-girder
GIRDER_STAMP := $(GIRDER_VENV)/.setup-stamp
SAMPLE := samples/CMU-1-Small-Region-crop.tif
DEMO_OUT := demo_out

.PHONY: setup setup-girder demo test lint speed clean check-image-torch

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh scripts/requirements-runtime.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	PYTHON=$(PY) EXTRAS=dev bash scripts/install.sh
	touch $(STAMP)

setup-girder: $(GIRDER_STAMP)

$(GIRDER_STAMP): scripts/setup_girder_venv.sh
	PYTHON=$(PYTHON) GIRDER_VENV=$(GIRDER_VENV) bash scripts/setup_girder_venv.sh
	touch $(GIRDER_STAMP)

demo: setup
	mkdir -p $(DEMO_OUT)
	$(PY) -m cli NucleusDetection $(SAMPLE) $(DEMO_OUT)/nuclei.anot \
		--nuclei_csv $(DEMO_OUT)/nuclei.csv --overlay_image $(DEMO_OUT)/overlay.png
	@echo "Wrote $(DEMO_OUT)/nuclei.anot (DSA annotation), $(DEMO_OUT)/nuclei.csv and $(DEMO_OUT)/overlay.png"

test: setup setup-girder
	$(PY) -m pytest

# the tests under the Docker image's (older) torch: ~3 GB of downloads, ~10 min
check-image-torch:
	PYTHON=$(PYTHON) bash scripts/check_image_torch.sh

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

speed: setup
	$(PY) -m benchmark speed --slide ../shared/data/wsi/CMU-1-Small-Region.svs

clean:
	rm -rf $(DEMO_OUT) .pytest_cache .ruff_cache .mypy_cache
