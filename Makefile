# Fresh-machine set-up. `make test` and `make bench` create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: venv test lint docs bench clean

$(BIN)/kronfac: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel
	# The pinned CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e ".[test,bench,dev,docs]" "$(TORCH)"
	touch $(BIN)/kronfac

venv: $(BIN)/kronfac

lint: venv
	$(BIN)/ruff check src tests benchmarks docs/_ext
	$(BIN)/ruff format --check src tests benchmarks docs/_ext
	$(BIN)/mypy

# The site (docs/ and the docstrings) into site/; --strict: a broken link, anchor or cross-reference fails.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

test: lint docs
	$(BIN)/pytest tests

bench: venv
	$(BIN)/kronfac bench --out bench-results

clean:
	rm -rf $(VENV) bench-results site .pytest_cache .mypy_cache .ruff_cache
