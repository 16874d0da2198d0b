# Two commands do all the set-up on a fresh clone (Python 3.11 and the package registries):
#   make demo   installs, then runs the main job end to end on the built-in sample
#   make test   installs, then runs the tests
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo

.PHONY: install demo test lint image-test gpu-check clean

# Exact versions from constraints.txt. torch first, so pip takes the local CPU build instead of the
# multi-GB CUDA wheels; then the package with the CUDA 13 DALI build (CPU-only mode here; pillow-simd
# compiled from source; setup.py compiles pca-stats' C kernel in place), then a check that
# pillow-simd is the active PIL.
$(BIN)/.installed: setup.cfg setup.py pyproject.toml constraints.txt tools/_moments.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet -c constraints.txt torch
	$(BIN)/pip install --quiet -c constraints.txt --no-binary pillow-simd -e '.[cuda13,dev]'
	$(BIN)/python -m alexnet.pipeline.images --require-simd
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/python -m alexnet.trainer.demo --out $(DEMO_DIR)

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q tests

# docker/Dockerfile's CPU variant built with podman and the main path run inside it (root; ~10-20 min).
image-test:
	docker/build_and_test.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Benchmarks have no target: each is a script in benchmarks/ with its own options, and its command
# is written beside its figures in benchmarks/RESULTS.md.

# On a GPU host, no venv: the host's python3 with its torch. Stage 1 (benchmarks/gpu_probe.py, torch
# alone) then, where the wheel parts and their MANIFEST are in .gpu/parts (benchmarks/gpu_check.sh pack,
# here), stage 2 (DALI: the GPU tests and the pipeline figures); JSON into $(OUT) (default /tmp/gpu-check).
gpu-check:
	benchmarks/gpu_check.sh $(OUT)

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .ruff_cache *.egg-info
