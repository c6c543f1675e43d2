# The two quick-start commands (README):
#   make demo   set up .venv, run the demo recipe end to end on the embedded corpus
#   make test   set up .venv, run the whole test suite
VENV ?= .venv

.PHONY: setup demo test lint bench clean

setup:
	@scripts/setup.sh

demo: setup
	@PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash recipes/demo/run.sh

test: setup
	@$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	@$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf recipes/demo/feats recipes/demo/exp
