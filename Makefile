# The README's two set-up commands: `make demo` and `make test`. Each creates .venv if missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch, installed before anything else can pull a multi-GB CUDA build.
# On a machine without the wheel on disk add: TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_VERSION ?= 2.13.0
TORCH_SPEC ?= torch==$(TORCH_VERSION)
TORCH_PIP_ARGS ?=
# The CPU wheel where pip's find-links has it (this machine's /opt/wheels); uv installs that file.
WHEEL_DIRS := $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
TORCH_WHEEL := $(firstword $(wildcard $(addsuffix /torch-$(TORCH_VERSION)+cpu-*.whl,$(WHEEL_DIRS))))
ifneq ($(TORCH_SPEC),torch==$(TORCH_VERSION))
TORCH_WHEEL :=  # a TORCH_SPEC of your own goes to pip as it is
endif
STAMP := $(VENV)/.tv_lens-installed
comma := ,

# A second environment for TransformerLens 3.9 beside SAELens (which needs transformer-lens<4):
# `make test-tl3` installs tv_lens with the `sae` extra there, so the resolver keeps TL 3.9.
VENV_TL3 ?= .venv-tl3

.PHONY: setup setup-tl3 test test-tl3 demo clean-venv

# $(call install,VENV,EXTRAS): a fresh venv, the CPU torch first, then tv_lens editable. uv
# (installed into the venv by pip) does the installing, ten times faster than pip; pip takes
# over wherever uv fails (no network to PyPI, say) and installs torch when its wheel is not on
# disk (pip honours TORCH_PIP_ARGS and pip.conf). Bytecode is compiled at install time, as pip
# does and uv does not by default: where PYTHONDONTWRITEBYTECODE is set (CI images, this
# machine) every start would otherwise compile torch from source again (`import tv_lens` 3.6 s
# instead of 1.8 s).
define install
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q uv || true
	$(1)/bin/python -c "import torch" 2>/dev/null || \
	  { test -n "$(TORCH_WHEEL)" -a -z "$(TORCH_PIP_ARGS)" && \
	    $(1)/bin/uv pip install -q --compile-bytecode --python $(1)/bin/python "$(TORCH_WHEEL)"; } || \
	  $(1)/bin/python -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(1)/bin/uv pip install -q --compile-bytecode --python $(1)/bin/python -e ".[$(2)]" || \
	  $(1)/bin/python -m pip install -q -e ".[$(2)]"
	$(1)/bin/python -m compileall -q tv_lens > /dev/null
	$(1)/bin/python -c "import importlib.metadata as m; print('$(1): torch', m.version('torch'), '/ transformer-lens', m.version('transformer-lens'))"
	touch $(1)/.tv_lens-installed
endef

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(call install,$(VENV),dev)

setup-tl3: $(VENV_TL3)/.tv_lens-installed

$(VENV_TL3)/.tv_lens-installed: pyproject.toml
	$(call install,$(VENV_TL3),dev$(comma)sae)

test: $(STAMP)
	$(PY) -m pytest -q -rs -p no:cacheprovider --durations=10

test-tl3: $(VENV_TL3)/.tv_lens-installed
	$(VENV_TL3)/bin/python -m pytest -q -rs -p no:cacheprovider --durations=10

demo: $(STAMP)
	$(VENV)/bin/tv-lens demo

clean-venv:
	rm -rf $(VENV) $(VENV_TL3)
