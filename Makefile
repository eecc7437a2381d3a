# Two commands a new user needs: `make run` (main job) and `make test` (everything CI checks).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint docs bench install clean package

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
	$(PY) -m ruff check src tests examples
	$(PY) -m ruff format --check src tests examples
	$(PY) -m mypy --strict src/disco

# The documentation site, warnings as errors (a broken link, a page or docstring mkdocs cannot read); the Python
# blocks of README.md and docs/*.md are run by tests/test_docs_blocks.py.
docs: $(STAMP)
	$(PY) -m mkdocs build --strict --site-dir build/site  # no --quiet: it hides the warnings --strict counts

test: lint docs
	$(PY) -m pytest -q tests $(ARGS)

# The wheel, installed into a fresh venv with nothing else of this checkout, runs the README's quickstart.
package: $(STAMP)
	rm -rf build/wheel build/wheel-venv
	$(PY) -m pip wheel -q --no-deps -w build/wheel .
	$(PYTHON) -m venv build/wheel-venv
	build/wheel-venv/bin/python -m pip install -q "$(TORCH_SPEC)"
	build/wheel-venv/bin/python -m pip install -q build/wheel/disco_optim-*.whl
	cd build && wheel-venv/bin/python ../examples/quickstart.py
	cd build && wheel-venv/bin/python -c "import disco, sys; assert 'site-packages' in disco.__file__, disco.__file__"

# On GPUs where there are (one per rank, NCCL), else the CPU; DISCO_DEVICE=cpu|cuda forces one (docs/benchmarks.md).
bench: $(STAMP)
	$(PY) -m disco bench goals

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
