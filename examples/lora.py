"""LoRA (or DoRA) on SmolLM2-135M-Instruct: a trained low-rank update of every linear layer, the base frozen.

    python examples/lora.py [lora|dora]         # MINICUSTOM_SMOKE=1: a tiny random model, in seconds

Measures greedy accuracy on held-out sentiment reviews, attaches LoRA (r=8, alpha=16 on every linear; `dora`
also learns a magnitude per output row), trains it with the SFT loop, measures again, and saves the adapter
in PEFT's format: `minicustom chat --adapter runs/lora`, or mc.load_adapter(model, "runs/lora").
Implementation: minicustom/methods/lora.py (the modules: minicustom/methods/lora_layers.py)
"""

import sys

from common import accuracy, held_out, model_path, out_dir, report, sft, size

import minicustom as mc

METHOD = sys.argv[1] if len(sys.argv) > 1 else "lora"  # or "dora"
MODEL = model_path()
TASK = held_out("sentiment", n_test=size(30, 4))
STEPS, BATCH, LR = size(32, 2), 4, 1e-3
R, ALPHA = 8, 16
OUT = out_dir(METHOD)

if METHOD not in ("lora", "dora"):
    sys.exit(f"METHOD is lora or dora, got {METHOD!r}")
model, tok = mc.load_model(MODEL), mc.load_tokenizer(MODEL)
before = accuracy(model, tok, TASK)
mc.apply_lora(model, r=R, alpha=ALPHA, targets="all-linear", use_dora=METHOD == "dora")
params = mc.count_parameters(model)
sft(model, tok, TASK.train, STEPS, LR, BATCH)
after = accuracy(model, tok, TASK)
mc.save_adapter(model, OUT, base_model_name_or_path=str(MODEL))
report("accuracy", before, after, params, OUT)
