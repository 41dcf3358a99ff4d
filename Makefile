# `make profile`, `make test` and `make models` set everything up on a fresh machine: a virtual environment
# in .venv, torch 2.13.0 first (a looser torch requirement would pull several GB of CUDA packages), then
# x3dnet with its fast engines (OpenVINO, ONNX Runtime) and matplotlib.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.x3dnet-installed

.PHONY: profile test models clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test,fast,plot]'
	touch $(STAMP)

# The published profile table measured here: all four sizes, eager PyTorch and the fastest engine installed.
profile: $(STAMP)
	$(BIN)/x3dnet profile --backend torch auto --runs 5

# A pytest-xdist worker per core, each computing on one thread (tests/conftest.py).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto

models: $(STAMP)
	$(BIN)/x3dnet models
	$(BIN)/x3dnet weights list

clean:
	rm -rf $(VENV) build *.egg-info
