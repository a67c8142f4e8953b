"""IA3 on SmolLM2-135M-Instruct: learned vectors that rescale the keys, the values and the MLP's inner activations.

    python examples/ia3.py                      # MINICUSTOM_SMOKE=1: a tiny random model, in seconds

Attaches IA3 with PEFT's targets for Llama (k_proj, v_proj and down_proj's input: 57,600 numbers on the 135M
model, all 1 at the start, so the model is unchanged), trains them on the sentiment task with the SFT loop,
saves the adapter in PEFT's format, then folds the vectors into the weights (mc.merge_adapter) and checks
that the plain merged model answers as the adapted one did.
Implementation: minicustom/methods/ia3.py
"""

from common import accuracy, held_out, model_path, out_dir, report, sft, size

import minicustom as mc

MODEL = model_path()
TASK = held_out("sentiment", n_test=size(30, 4))
STEPS, BATCH, LR = size(32, 2), 4, 1e-2  # IA3 wants a far larger step than LoRA
OUT = out_dir("ia3")

model, tok = mc.load_model(MODEL), mc.load_tokenizer(MODEL)
before = accuracy(model, tok, TASK)
mc.apply_ia3(model)
params = mc.count_parameters(model)
sft(model, tok, TASK.train, STEPS, LR, BATCH)
after = accuracy(model, tok, TASK)
mc.save_adapter(model, OUT, base_model_name_or_path=str(MODEL))
merged = mc.merge_adapter(model)  # l folded into W: a plain model, no adapter left
same = sum(a["output"] == b["output"] for a, b in zip(after.records, accuracy(merged, tok, TASK).records))
print(f"merged into the weights: {same} of {after.n} answers identical to the adapted model's")
report("accuracy", before, after, params, OUT)
