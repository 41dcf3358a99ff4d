# `make test` and `make models` set everything up on a fresh machine: a virtual environment in .venv,
# torch 2.13.0 first (a looser torch requirement would pull several GB of CUDA packages), then x3dnet.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.x3dnet-installed

.PHONY: test models clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

models: $(STAMP)
	$(BIN)/x3dnet models
	$(BIN)/x3dnet weights list

clean:
	rm -rf $(VENV) build *.egg-info
