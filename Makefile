# Two set-up commands (see README): `make run` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# MatterSim's wheel metadata pins torchvision/torchaudio, whose builds break `import torch` on CPU-only machines:
# install it without dependencies and pull its real runtime needs from our `mattersim` extra.
MATTERSIM := mattersim==1.2.3
SHARED_DATA := $(abspath ../shared/data)

.PHONY: install run test bench clean chromium

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel of torch (pinned here; a newer range would pull several GB of CUDA packages).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,mattersim,sevennet]"
	$(BIN)/pip install -q --no-deps $(MATTERSIM)
	# Dash ships @plotly/dash-jupyterlab as a JupyterLab *source* extension (a tarball JupyterLab 4 wants to rebuild
	# itself with Node.js): every JupyterLab start then shows "Build recommended", then "Build failed". It only
	# serves Dash's own Jupyter mode, which Wyckoff Lab does not use (README, In Jupyter).
	rm -f $(VENV)/share/jupyter/lab/extensions/dash-jupyterlab.tgz
	$(BIN)/python -c "import torch, mattersim, chgnet, sevenn, pyxtal; print('wyckoff-lab environment ready, torch', torch.__version__)"
	touch $(STAMP)

install: $(STAMP)

# Starts the app on 127.0.0.1:8050 and opens the browser (PORT=... and ARGS="--no-browser" to change that).
PORT ?= 8050
run: $(STAMP)
	@if [ -z "$$WYCKOFF_LAB_DATA" ] && [ -d "$(SHARED_DATA)" ]; then export WYCKOFF_LAB_DATA="$(SHARED_DATA)"; fi; \
	$(BIN)/wyckoff-lab app --port $(PORT) $(ARGS)

# Headless Chromium for the end-to-end test: installed from Debian when missing and running as root (idempotent);
# otherwise that test is skipped with the reason.
chromium:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
		if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
				>/dev/null) || echo "could not install chromium: the browser test will be skipped"; \
		else echo "chromium not installed and not root: the browser test will be skipped"; fi; \
	fi

# WYCKOFF_LAB_DATA defaults to the sibling shared/data folder when it exists; tests skip data-bound checks otherwise.
test: $(STAMP) chromium
	@if [ -z "$$WYCKOFF_LAB_DATA" ] && [ -d "$(SHARED_DATA)" ]; then export WYCKOFF_LAB_DATA="$(SHARED_DATA)"; fi; \
	$(BIN)/python -m pytest -q -ra tests

clean:
	rm -rf $(VENV) *.egg-info
