#!/usr/bin/env bash
# Serve a model with stock vLLM (.venv-vllm, made by scripts/setup-vllm.sh) carrying headwise's
# per-head telemetry plugin; the per-head families appear on vLLM's own /metrics.
#   bash scripts/serve-vllm.sh [MODEL] [extra vLLM server flags...]
# MODEL: a GGUF file or model folder (default: headwise's default model); a GGUF is converted once
# to a Hugging Face folder under ~/.cache/headwise/gguf/ (vLLM loads folders). The served model
# name is headwise's name for the model, so dashboards see the same `model` label as headwise serve.
# Defaults: port 8000, fp32, eager, 1 GiB KV cache (VLLM_CPU_KVCACHE_SPACE),
# HEADWISE_TELEMETRY_SAMPLE_RATE as set (else the plugin's default).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv-vllm/bin/python
if [ ! -x "$PY" ]; then
  echo "error: .venv-vllm is missing; run: bash scripts/setup-vllm.sh" >&2
  exit 2
fi
model=()
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then model=("$1"); shift; fi
folder=$("$PY" -m server.vllm_plugin.model_dir "${model[@]}")
name=$("$PY" -c 'import json, os, sys
p = os.path.join(sys.argv[1], "headwise.json")
print(json.load(open(p)).get("name") if os.path.isfile(p) else os.path.basename(os.path.normpath(sys.argv[1])))' "$folder")
export VLLM_PLUGINS=${VLLM_PLUGINS:-headwise}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
exec "$PY" -m vllm.entrypoints.openai.api_server --model "$folder" --served-model-name "$name" \
  --dtype float32 --enforce-eager --port 8000 \
  --worker-extension-cls server.vllm_plugin.worker.HeadwiseWorkerExtension "$@"
