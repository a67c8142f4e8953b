#!/usr/bin/env bash
# Build llama.cpp's llama-cli from the llama.cpp source that llama-cpp-python's PyPI package vendors (no
# other download), with the same portable flags as scripts/env.sh: AVX2, not -march=native (a native build
# on an AMX machine inside a VM died with a general protection fault here). About 4 minutes on 2 cores.
#   bash scripts/build_llama_cli.sh [OUT_DIR]      # default .llama.cpp; the binary is OUT_DIR/bin/llama-cli
set -euo pipefail
cd "$(dirname "$0")/.."
out="$(realpath -m "${1:-.llama.cpp}")"
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work"
tar xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
cmake -S "$work"/llama_cpp_python-*/vendor/llama.cpp -B "$out" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON > /dev/null
cmake --build "$out" --target llama-cli -j "$(nproc)"
echo "$out/bin/llama-cli"
