# `make demo` and `make test` work on a fresh machine: they create .venv, install the CPU
# PyTorch pin when the venv has no torch (a bare `torch` requirement would pull a CUDA build),
# then curvkit itself, editable, with its test extras.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
STAMP  := $(VENV)/.curvkit-installed

.PHONY: demo test setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIN)
	@$(PY) -m pip install -q -e ".[test]"
	@touch $@

# the embedded default: a small CNN trained for a few seconds on real digits, then analysed
demo: $(STAMP)
	$(PY) -m curvkit analyze --out curvkit-report
	@echo "open curvkit-report/report.md (tables), spectrum.png and layers.png (figures)"

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
