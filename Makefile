# Two commands for a new user: `make run` and `make test`. Both create .venv and install
# everything they need; nothing else has to be set up by hand.
PYTHON ?= python3.11
VENV   ?= .venv
BIN     = $(VENV)/bin

INPUT   ?= data/sample_images
OUTPUT  ?= output
MODEL   ?= fasterrcnn_resnet50_fpn_v2
WEIGHTS ?=
ARGS    ?=

.PHONY: run test lint install install-dev test-weights clean bench deploy worker serve

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

run: install
	$(BIN)/detectflow run --input $(INPUT) --output $(OUTPUT) --model $(MODEL) \
		$(if $(WEIGHTS),--weights $(WEIGHTS)) $(ARGS)

# Prefect deployments (needs PREFECT_API_URL, e.g. a `prefect server start` on this machine).
POOL ?= detectflow

deploy: install
	$(BIN)/prefect work-pool inspect $(POOL) >/dev/null 2>&1 || \
		$(BIN)/prefect work-pool create $(POOL) --type process
	$(BIN)/prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml

worker: install
	$(BIN)/prefect worker start --pool $(POOL)

serve: install
	$(BIN)/python deployments/serve.py

lint: install-dev
	$(BIN)/ruff check .

test: install-dev
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# Offline weights for trying `make run` on a machine that cannot download torchvision's:
# a real state dict, batch-norm recalibrated on the bundled photos (see tests/calibrated_weights.py).
test-weights: install
	$(BIN)/python tests/calibrated_weights.py --model $(MODEL) --images data/sample_images \
		--out output/weights/$(MODEL)-calibrated.pth

# Throughput against Ray's reference recipe and the bare model (benchmarks/RESULTS.md); never
# part of `make test`. BENCH_ARGS e.g. "--n 48 --scale" or "--device cuda".
BENCH_ARGS ?=
bench: install-dev
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf output .pytest_cache
