# Two commands a new user needs: `make run` (main job) and `make test` (everything CI checks).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint bench install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,train,hf,torchtitan]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m disco train $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check disco tests examples
	$(PY) -m ruff format --check disco tests examples
	$(PY) -m mypy disco
	$(PY) -m mypy --strict disco/distributed disco/optim

test: lint
	$(PY) -m pytest -q tests $(ARGS)

bench: $(STAMP)
	$(PY) -m disco bench ortho
	$(PY) -m disco bench step
	$(PY) -m disco bench dist

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
