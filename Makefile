# Two commands for a newcomer: `make demo` and `make test` (both set up .venv first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
SAMPLE := samples/CMU-1-Small-Region-crop.tif
DEMO_OUT := demo_out

.PHONY: setup demo test lint speed clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh scripts/requirements-runtime.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	PYTHON=$(PY) EXTRAS=dev bash scripts/install.sh
	touch $(STAMP)

demo: setup
	mkdir -p $(DEMO_OUT)
	$(PY) -m cli NucleusDetection $(SAMPLE) $(DEMO_OUT)/nuclei.anot \
		--nuclei_csv $(DEMO_OUT)/nuclei.csv --overlay_image $(DEMO_OUT)/overlay.png
	@echo "Wrote $(DEMO_OUT)/nuclei.anot (DSA annotation), $(DEMO_OUT)/nuclei.csv and $(DEMO_OUT)/overlay.png"

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

speed: setup
	$(PY) -m benchmark speed --slide ../shared/data/wsi/CMU-1-Small-Region.svs

clean:
	rm -rf $(DEMO_OUT) .pytest_cache .ruff_cache .mypy_cache
