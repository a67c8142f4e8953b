# Sourced by scripts/demo.sh and scripts/test.sh: a virtual environment in .venv with minicustom
# installed (editable) plus the extras named in $1. Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned: a bare `torch` requirement with no torch installed pulls a multi-GB CUDA build,
# while 2.13.0 is the CPU build these machines carry.
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
# llama-cpp-python (dev extra) compiles llama.cpp: for AVX2, so the wheel pip caches also runs on the machines
# without AVX-512, and without the multimodal library and tools nothing here uses (about 6 minutes on 2 cores).
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF}"
pip install -q -e ".[${1:-gguf}]"
