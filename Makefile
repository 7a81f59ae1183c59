# Two entry points on a fresh machine: `make demo` (the main job) and `make test`.
# Each creates the virtual environment it needs from requirements.txt.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test clean-venv

$(BIN)/.installed: requirements.txt requirements-test.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt -r requirements-test.txt
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python discover.py demo

# pytest exits 5 when it collects no test: that must fail, never pass silently.
test: $(BIN)/.installed
	@$(BIN)/python -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean-venv:
	rm -rf $(VENV)
