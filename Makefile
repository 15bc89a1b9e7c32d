# Both targets set themselves up from the pinned lock file; nothing else is needed on the machine
# but Python 3.11 and git (npm optional, for the codex end-to-end tests).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CODEX_VERSION := 0.169.0
CODEX_PREFIX ?= $(HOME)/.cache/codex-runner/codex-$(CODEX_VERSION)

.PHONY: setup run test lint typecheck pytest codex clean bench

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/python -m codex_runner.demo

codex:
	@./scripts/install-codex.sh "$(CODEX_VERSION)" "$(CODEX_PREFIX)"

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: setup
	$(BIN)/mypy

# Two runs: first the tests that restart shared services (PostgreSQL), alone — pytest's exit code
# 5, "no tests collected", is fine there — then the rest in parallel, whose summary closes the run.
pytest: setup codex
	PATH="$(CODEX_PREFIX)/bin:$$PATH" $(BIN)/pytest -p no:xdist -m disruptive $(PYTEST_ARGS); \
	  rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]
	PATH="$(CODEX_PREFIX)/bin:$$PATH" $(BIN)/pytest -n 2 --dist loadgroup -m "not disruptive" $(PYTEST_ARGS)

test: lint typecheck pytest

clean:
	rm -rf $(VENV) .runner-data .pytest_cache .mypy_cache .ruff_cache
