"""From a LoRA fine-tune of SmolLM2-135M-Instruct to one GGUF file that llama.cpp, Ollama and LM Studio run.

    python examples/export_gguf.py              # MINICUSTOM_SMOKE=1: a tiny random model, in seconds

Trains a LoRA adapter on the city task (name the city a sentence mentions) for a few steps, folds it into
the weights (mc.merge_adapter), writes the merged model as a GGUF file with Q8_0 matrices (llama.cpp's tensor
names and q/k row order, the tokenizer and the chat template in its metadata), then reads that file back with
minicustom's own GGUF importer and measures the model read back: what a llama.cpp user gets.
Run the file with llama.cpp: `python examples/llama_cpp_chat.py runs/export_gguf/city-q8_0.gguf "..."`.
Implementation: minicustom/gguf_export.py (the reader: minicustom/gguf.py)
"""

import tempfile
from collections import Counter

from common import accuracy, held_out, model_path, out_dir, report, sft, size

import minicustom as mc
from minicustom.gguf import convert_gguf

MODEL = model_path()
TASK = held_out("city", n_test=size(20, 4))
STEPS, BATCH, LR = size(16, 2), 4, 1e-3
OUTTYPE = "q8_0"  # or f32, f16, bf16, q4_0
OUT = out_dir("export_gguf")

model, tok = mc.load_model(MODEL), mc.load_tokenizer(MODEL)
before = accuracy(model, tok, TASK)
mc.apply_lora(model, r=8, alpha=16, targets="all-linear")
params = mc.count_parameters(model)
sft(model, tok, TASK.train, STEPS, LR, BATCH)
merged = mc.merge_adapter(model)  # plain nn.Linear again, W = W0 + s B A
OUT.mkdir(parents=True)
file = OUT / f"{TASK.name}-{OUTTYPE}.gguf"
types = mc.export_gguf(merged, tok, file, OUTTYPE, name=f"SmolLM2-135M-Instruct {TASK.name}", progress=False)
print(f"{file}: {len(types)} tensors ({dict(Counter(types.values()))}), {file.stat().st_size / 2**20:.1f} MiB")
with tempfile.TemporaryDirectory() as tmp:  # the GGUF file read back as a checkpoint folder
    back = convert_gguf(file, f"{tmp}/back", progress=False)
    after = accuracy(mc.load_model(back), mc.load_tokenizer(back), TASK)
report("accuracy", before, after, params, file, labels=("the base", "the GGUF file read back"))
