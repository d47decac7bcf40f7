# The two commands (see README.md):
#   make demo   run the whole pipeline on the embedded default (CPU is fine)
#   make test   run the test suite (what .ci/run calls)
# Both create or reuse a virtual environment in $(VENV) with the CPU build of torch 2.13.0.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test env clean

env: $(VENV)/.installed

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

demo: env
	$(PY) -m megatron_ham.demo

test: env
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: treating as a failure"; exit 1; fi; \
	exit $$rc

clean:
	rm -rf $(VENV) runs .pytest_cache
