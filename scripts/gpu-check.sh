#!/usr/bin/env bash
# The GPU checks of the Triton path in one run, on a CUDA machine whose python3 already has torch,
# triton, transformers and pytest (no virtual environment, nothing fetched):
#
#   bash scripts/gpu-check.sh [tests|bench|all]     (default all)
#
# tests: the suites that need or use a GPU (tests/engine/test_cuda.py, the CUDA graphs, the Triton
#        kernels compiled for this GPU instead of interpreted), log in $OUT/tests.log;
# bench: python -m benchmarks.bench_gpu_triton (every figure of BENCHMARKS.md's GPU section), the
#        table in $OUT/bench.log and the JSON in $OUT/gpu-triton.json.
# Python packages the machine lacks (the `gguf` reader, say) are installed from wheels in .whl/ when
# that folder exists: `python3 -m pip download --no-deps --only-binary=:all: -d .whl gguf` where pip
# can reach an index. OUT defaults to ./gpu-check-out.
set -uo pipefail

what="${1:-all}"
case "$what" in tests|bench|all) ;; *) echo "usage: bash scripts/gpu-check.sh [tests|bench|all]" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "[gpu-check] installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 - <<'EOF' || exit 1
import torch
if not torch.cuda.is_available():
    raise SystemExit("[gpu-check] no CUDA device: this script is for a GPU machine")
import triton, transformers
print(f"[gpu-check] {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
      f"transformers {transformers.__version__}", flush=True)
EOF
status=0
if [ "$what" != bench ]; then
  python3 -m pytest -q -p no:cacheprovider -x \
    tests/engine/test_cuda.py tests/engine/test_cuda_graphs.py tests/engine/test_triton_layer_ops.py \
    tests/engine/attention/test_triton_paged.py tests/engine/attention/test_triton_prefill.py \
    tests/engine/attention/test_triton_compile.py tests/engine/attention/test_torch_ref.py 2>&1 | tee "$OUT/tests.log"
  status=$?
fi
if [ "$what" != tests ]; then
  python3 -m benchmarks.bench_gpu_triton --json "$OUT/gpu-triton.json" 2>&1 | tee "$OUT/bench.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
exit "$status"
