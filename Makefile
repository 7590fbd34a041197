# megatron-rpt: `make demo` (a real small pretraining run, end to end) and `make test`.
# Both set up .venv themselves (tools/setup_env.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mrpt-installed
DEMO_DIR ?= runs/demo

.PHONY: setup demo test test-fast clean-demo

$(STAMP): setup.py tools/constraints-cpu.txt tools/setup_env.sh
	VENV=$(VENV) bash tools/setup_env.sh
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) examples/cpu_demo.py --output-dir $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest -q -ra tests

clean-demo:
	rm -rf $(DEMO_DIR)
