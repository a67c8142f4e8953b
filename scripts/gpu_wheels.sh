#!/usr/bin/env bash
# Wheels for the GPU machine, which has no network: bitsandbytes (the QLoRA peer and bench_nf4's CUDA
# baseline) and gguf, for its Python 3.12, into .whl/ (ignored by git). Then, with the device tool:
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  -d .whl bitsandbytes==0.50.2 gguf==0.19.0
du -sh .whl
