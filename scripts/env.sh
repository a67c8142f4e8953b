# Sourced by scripts/demo.sh and scripts/test.sh: a virtual environment in .venv with minicustom
# installed (editable) plus the extras named in $1. Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip_install ARGS: pip install, without the "Location ... is ignored" warnings of the machine's extra
# indexes (a hundred lines that bury a real error in a CI log), retried once after a failure, which prints
# the free disk first.
pip_install() {
  local rc try
  for try in 1 2; do
    set +e
    pip install "$@" 2>&1 | grep -v "is ignored: it is neither a file nor a directory"
    rc=${PIPESTATUS[0]}
    set -e
    [ "$rc" = 0 ] && return 0
    echo "env.sh: pip install $* failed (exit $rc, try $try of 2); free disk:" >&2
    df -h . "${TMPDIR:-/tmp}" >&2
  done
  return "$rc"
}
# torch first, pinned: a bare `torch` requirement with no torch installed pulls a multi-GB CUDA build,
# while 2.13.0 is the CPU build these machines carry.
python -c "import torch" 2>/dev/null || pip_install -q torch==2.13.0
# llama-cpp-python (dev extra) compiles llama.cpp: for AVX2, so the wheel pip caches also runs on the machines
# without AVX-512, and without the multimodal library and tools nothing here uses (about 6 minutes on 2 cores).
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF}"
pip_install -q -e ".[${1:-gguf}]"
