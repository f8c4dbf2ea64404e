# All targets use the virtual environment at .venv/ (created on first use).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-slow lint format bench demo demo-model clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned, so nothing pulls a CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# pytest-xdist workers, each test file on one worker (its module fixtures built once): on the 2-core CI
# machine 2 workers take the suite from ~12 to ~8.5 minutes, since many tests wait on single-threaded
# XLA compiles. TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
test: $(STAMP) lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python -m bench.unet_cpu

# the first command: the shipped demo model (assets/demo/model, trained on the synthetic world) animates an
# identity it never saw with a dance it never saw -> outputs/demo.mp4 and outputs/demo_grid.mp4
# (driving pose | face maps | result). The settings are bench/synthetic_reenactment.py's (the README's table).
# DEMO_MODEL=BUNDLE DEMO_OUT=DIR sample another bundle into another folder (tests/test_demo.py: random weights).
DEMO := assets/demo
DEMO_MODEL ?= $(DEMO)/model
DEMO_OUT ?= outputs
demo: $(STAMP)
	mkdir -p $(DEMO_OUT)
	$(BIN)/python sample.py --model $(DEMO_MODEL) --reference $(DEMO)/reference.png \
		--pose $(DEMO)/driving_pose.npy --face $(DEMO)/driving.mp4 --landmarks $(DEMO)/driving_landmarks.npy \
		--height 96 --width 64 --window 4 --overlap 1 --steps 25 --guidance 1.5 --seed 0 --dtype fp32 \
		--out $(DEMO_OUT)/demo.mp4 --grid $(DEMO_OUT)/demo_grid.mp4

# the demo model from scratch on the synthetic world (docs/synthetic.md): demo/xdyna_synthetic/
demo-model: $(STAMP)
	$(BIN)/python -m xdyna_jax.training.demo_recipe --out demo/

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
