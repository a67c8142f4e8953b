"""QLoRA on SmolLM2-135M-Instruct: LoRA trained on top of a frozen 4-bit (NF4) copy of the model.

    python examples/qlora.py                    # MINICUSTOM_SMOKE=1: a tiny random model, in seconds

Loads the model with every linear but lm_head quantized to NF4 (blocks of 64, double quantization; the
bytes bitsandbytes would write), prints what that saves, measures the 4-bit model's greedy accuracy on held-out
sentiment reviews, trains LoRA (r=8 on every linear) on top with the SFT loop, measures again and saves the
adapter: it applies to the model loaded 4-bit again (`minicustom chat --quantize nf4 --adapter runs/qlora`).
Implementation: minicustom/methods/qlora.py (4-bit layers: minicustom/quant/linear4bit.py, minicustom/quant/nf4.py)
"""

from common import accuracy, held_out, model_path, out_dir, report, sft, size

import minicustom as mc

MODEL = model_path()
TASK = held_out("sentiment", n_test=size(30, 4))
STEPS, BATCH, LR = size(32, 2), 4, 1e-3
R, ALPHA = 8, 16
OUT = out_dir("qlora")

model, tok = mc.load_model(MODEL, quantize="nf4"), mc.load_tokenizer(MODEL)
print(mc.memory_report(model))
before = accuracy(model, tok, TASK)  # the 4-bit model as it is: QLoRA's starting point
mc.apply_lora(model, r=R, alpha=ALPHA, targets="all-linear")  # LoRA on Linear4bit layers = QLoRA
params = mc.count_parameters(model)
sft(model, tok, TASK.train, STEPS, LR, BATCH)
after = accuracy(model, tok, TASK)
mc.save_adapter(model, OUT, base_model_name_or_path=str(MODEL))
report("accuracy", before, after, params, OUT)
