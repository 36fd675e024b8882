# Two set-up commands (see README): `make run` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# MatterSim's wheel metadata pins torchvision/torchaudio, whose builds break `import torch` on CPU-only machines:
# install it without dependencies and pull its real runtime needs from our `mattersim` extra.
MATTERSIM := mattersim==1.2.3
SHARED_DATA := $(abspath ../shared/data)

.PHONY: install run test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel of torch (pinned here; a newer range would pull several GB of CUDA packages).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,mattersim]"
	$(BIN)/pip install -q --no-deps $(MATTERSIM)
	$(BIN)/python -c "import torch, mattersim, chgnet, pyxtal; print('wyckoff-lab environment ready, torch', torch.__version__)"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/wyckoff-lab --help

# WYCKOFF_LAB_DATA defaults to the sibling shared/data folder when it exists; tests skip data-bound checks otherwise.
test: $(STAMP)
	@if [ -z "$$WYCKOFF_LAB_DATA" ] && [ -d "$(SHARED_DATA)" ]; then export WYCKOFF_LAB_DATA="$(SHARED_DATA)"; fi; \
	$(BIN)/python -m pytest -q -ra tests

clean:
	rm -rf $(VENV) *.egg-info
