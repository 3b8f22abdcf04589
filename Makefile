# Two commands set everything up on a fresh machine:
#   make demo   - the whole pipeline on the embedded digits data
#   make test   - the test suite (fast tests; `make test-slow` for the long ones)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-slow test-all lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned with its matching torchvision (timm needs both)
	$(BIN)/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install -q -e ".[dev,onnx,openvino,postgres]"
	touch $@

demo: $(STAMP)
	$(BIN)/vitnas demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

test-all: test test-slow

lint: $(STAMP)
	$(BIN)/ruff check nas tests benchmarks runners dashboards

clean:
	rm -rf $(VENV) vitnas-runs .pytest_cache
