# One command each, from a fresh clone:  make quickstart  |  make test
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo-model quickstart test test-fast clean

setup:
	bash scripts/setup.sh

demo-model: setup
	$(PY) -m rl.demo_model

# Trains SmolLM2-135M-Instruct with GRPO on arithmetic (configs/quickstart.yaml).
quickstart: demo-model
	$(PY) -m rl.train configs/quickstart.yaml $(ARGS)

# The whole suite, end-to-end tests included.
test: setup
	$(PY) -m pytest -q $(ARGS)

# Unit tests only (seconds).
test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(ARGS)

clean:
	rm -rf outputs .pytest_cache
