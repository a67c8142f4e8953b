"""Full fine-tuning of SmolLM2-135M-Instruct: every weight trained, the baseline the adapter methods are measured by.

    python examples/full_sft.py                 # MINICUSTOM_SMOKE=1: a tiny random model, in seconds

Measures greedy accuracy on held-out sentiment reviews, makes every parameter trainable (the registry's
`full` method), trains with the SFT loop at a small learning rate (full fine-tuning moves 134M weights; the
adapters' 1e-3 would wreck them), measures again and saves the whole model with its tokenizer as a Hugging
Face checkpoint folder (`minicustom chat --model runs/full_sft`; transformers loads it too).
Implementation: minicustom/methods/full.py (the loop: minicustom/train/sft.py, minicustom/train/loop.py)
"""

from common import accuracy, held_out, model_path, out_dir, report, sft, size

import minicustom as mc
from minicustom.train import apply_method

MODEL = model_path()
TASK = held_out("sentiment", n_test=size(30, 4))
STEPS, BATCH, LR = size(32, 2), 4, 3e-5
OUT = out_dir("full_sft")

model, tok = mc.load_model(MODEL), mc.load_tokenizer(MODEL)
before = accuracy(model, tok, TASK)
apply_method(model, "full")  # every parameter requires grad; nothing is attached
params = mc.count_parameters(model)
sft(model, tok, TASK.train, STEPS, LR, BATCH)
after = accuracy(model, tok, TASK)
mc.save_model(model, OUT)  # config.json + model.safetensors, written to temporary names and renamed
tok.save(OUT)
report("accuracy", before, after, params, OUT)
