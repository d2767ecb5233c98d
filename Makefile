# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing and
# install the pinned dependencies (CPU torch first, so nothing can pull a CUDA build).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install browser demo test test-fast lint format clean

$(STAMP): requirements/torch.txt requirements/base.txt requirements/test.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements/torch.txt
	$(BIN)/python -m pip install -q -r requirements/base.txt -r requirements/test.txt -c requirements/torch.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/crln demo

# The report's browser test needs Debian's chromium; without root or network it skips with a reason.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  ( (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
	    && echo "installed chromium for the browser test" ) || \
	  echo "chromium could not be installed: the browser test will be skipped"

test: install browser
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest -q

# The inner loop: every test but those marked slow (multi-process, browser, subprocess, wheel build).
# `make test` (and CI) still runs them all.
test-fast: install
	$(BIN)/pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: install
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache runs/demo
