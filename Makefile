# The README's two set-up commands: `make demo` and `make test`. Each creates .venv if missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch, installed before anything else can pull a multi-GB CUDA build.
# On a machine without the wheel on disk add: TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.tv_lens-installed
comma := ,

# A second environment for TransformerLens 3.9 beside SAELens (which needs transformer-lens<4):
# `make test-tl3` installs tv_lens with the `sae` extra there, so pip resolves TL 3.9.
VENV_TL3 ?= .venv-tl3

.PHONY: setup setup-tl3 test test-tl3 demo clean-venv

# $(call install,VENV,EXTRAS): a fresh venv with the CPU torch first, then tv_lens editable.
define install
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -c "import torch" 2>/dev/null || $(1)/bin/python -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(1)/bin/python -m pip install -q -e ".[$(2)]"
	$(1)/bin/python -c "import importlib.metadata as m; print('$(1): transformer-lens', m.version('transformer-lens'))"
	touch $(1)/.tv_lens-installed
endef

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(call install,$(VENV),dev)

setup-tl3: $(VENV_TL3)/.tv_lens-installed

$(VENV_TL3)/.tv_lens-installed: pyproject.toml
	$(call install,$(VENV_TL3),dev$(comma)sae)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

test-tl3: $(VENV_TL3)/.tv_lens-installed
	$(VENV_TL3)/bin/python -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	$(VENV)/bin/tv-lens demo

clean-venv:
	rm -rf $(VENV) $(VENV_TL3)
