"""The model most benchmarks here train: SmolLM2-135M-Instruct (the demo model, `minicustom fetch-demo-model`)
with LoRA r=8 alpha=16 on every linear, seeded, and its tokenizer."""

import torch

import minicustom as mc
from minicustom.gguf import fetch_demo_model


def demo_lora_model():
    """(model, tokenizer): the demo model with LoRA attached after torch.manual_seed(0)."""
    path = fetch_demo_model(install=False)
    tok = mc.load_tokenizer(path)
    model = mc.load_model(path)
    torch.manual_seed(0)
    mc.apply_lora(model, r=8, alpha=16, targets="all-linear", verbose=False)
    return model, tok
