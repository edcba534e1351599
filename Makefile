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

.PHONY: run test test-fast lint lock install install-dev test-weights clean bench deploy worker serve shapes-detector

# Everything comes from requirements.lock (every transitive dependency, hash-checked), so a new
# upstream release changes nothing here until `make lock` is run on purpose. pyproject.toml keeps
# the compatible ranges for those who install detectflow as a library.
LOCK = requirements.lock

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The project itself is installed last, without dependencies or a build environment of its own,
# so nothing outside the lock is fetched; `sync` removes what the lock no longer lists.
$(VENV)/.locked: $(LOCK) pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python tools/lockcheck.py sync $(LOCK)
	touch $@

install: $(VENV)/.locked
install-dev: install

# Refresh the lock (newest versions within pyproject.toml's ranges, for Linux x86_64 and
# Python 3.11), install it and run the whole suite on it; commit the lock only when that passes.
LOCK_ARGS ?= --upgrade
lock: install
	printf 'pip\nsetuptools>=77\n' | $(BIN)/uv pip compile pyproject.toml --extra dev - \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes \
		--quiet --custom-compile-command 'make lock' $(LOCK_ARGS) -o $(LOCK)
	$(MAKE) test
	git diff --stat -- $(LOCK)

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

lint: install
	$(BIN)/ruff check .

# Two workers, a test module each at a time (its shared Ray, servers or cluster start once).
WORKERS ?= 2
test: install
	$(BIN)/python tools/lockcheck.py check $(LOCK)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n $(WORKERS) --dist loadfile

# While developing: everything but the slowest end-to-end cases (marked slow); CI runs `make test`.
test-fast: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n $(WORKERS) --dist loadfile -m "not slow"

# Offline weights for trying `make run` on a machine that cannot download torchvision's:
# a real state dict, batch-norm recalibrated on the bundled photos (see tests/calibrated_weights.py).
test-weights: install
	$(BIN)/python tests/calibrated_weights.py --model $(MODEL) --images data/sample_images \
		--out output/weights/$(MODEL)-calibrated.pth

# The small detector the tests and README's "Your own detector" use: synthetic shapes, trained here.
shapes-detector: install
	$(BIN)/python -m examples.shapes.train --out examples/shapes/shapes_detector.pth

# Throughput against Ray's reference recipe and the bare model; never part of `make test`. Each
# run's tables go to output/bench/results/ (the current ones, the method and the lever log are in
# benchmarks/RESULTS.md). BENCH_ARGS e.g. "--n 96 --scale --repeat 3" or "--device cuda".
BENCH_ARGS ?=
bench: install
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf output .pytest_cache
