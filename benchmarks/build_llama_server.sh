#!/usr/bin/env bash
# Build llama.cpp's llama-server from the source that PyPI's llama-cpp-python vendors, for
# benchmarks/bench_vs_llamacpp.py only (never in CI: it compiles for many minutes on 2 cores).
#   bash benchmarks/build_llama_server.sh [WORKDIR]   -> WORKDIR/llama.cpp/build/bin/llama-server
# WORKDIR defaults to /tmp/llamacpp. LLAMA_CPP_PYTHON pins the sdist (default 0.3.36).
set -euo pipefail
work=${1:-/tmp/llamacpp}
version=${LLAMA_CPP_PYTHON:-0.3.36}
python=${PYTHON:-python3}
mkdir -p "$work"
cd "$work"
if [ ! -d llama.cpp ]; then
  "$python" -m pip download --no-deps --no-binary llama-cpp-python "llama-cpp-python==$version" -d sdist
  tar -xzf sdist/llama_cpp_python-"$version".tar.gz
  mv llama_cpp_python-"$version"/vendor/llama.cpp llama.cpp
fi
cd llama.cpp
nice -n 19 cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON
nice -n 19 cmake --build build --target llama-server -j "$(nproc)"
echo "$work/llama.cpp/build/bin/llama-server"
