"""Bottleneck adapters and LLaMA-Adapter on SmolLM2-135M-Instruct: small modules added to a frozen model.

    python examples/adapters.py [houlsby|parallel|llama-adapter]     # MINICUSTOM_SMOKE=1: seconds, tiny model

- houlsby: a down-up MLP (576 -> 36 -> 576) after each attention and each MLP output (Houlsby et al. 2019);
  parallel: one beside each MLP (He et al. 2022). W_up starts at zero, so the model starts unchanged.
- llama-adapter: 10 learned prompt vectors in each of the top 8 layers, read by the layer's own attention
  through a gate that starts at zero (Zhang et al. 2023).
Trains the chosen one on the sentiment task with the SFT loop and saves it (bottleneck adapters in
minicustom's own folder format, PEFT has none; LLaMA-Adapter as PEFT's ADAPTION_PROMPT).
Implementation: minicustom/methods/bottleneck.py, minicustom/methods/llama_adapter.py
"""

import sys

from common import accuracy, held_out, model_path, out_dir, report, sft, size

import minicustom as mc

METHOD = sys.argv[1] if len(sys.argv) > 1 else "houlsby"  # or "parallel", "llama-adapter"
MODEL = model_path()
TASK = held_out("sentiment", n_test=size(30, 4))
STEPS, BATCH = size(32, 2), 4
LR = 1e-2 if METHOD == "llama-adapter" else 1e-3  # a gate and a few prompts want larger steps
OUT = out_dir(f"adapters-{METHOD}")

model, tok = mc.load_model(MODEL), mc.load_tokenizer(MODEL)
before = accuracy(model, tok, TASK)
if METHOD == "llama-adapter":
    mc.apply_llama_adapter(model, adapter_len=10, adapter_layers=min(8, model.config.num_hidden_layers))
elif METHOD in ("houlsby", "parallel"):
    mc.apply_adapters(model, reduction_factor=16, placement=METHOD)
else:
    sys.exit(f"METHOD is houlsby, parallel or llama-adapter, got {METHOD!r}")
params = mc.count_parameters(model)
sft(model, tok, TASK.train, STEPS, LR, BATCH)
after = accuracy(model, tok, TASK)
mc.save_adapter(model, OUT, base_model_name_or_path=str(MODEL))
report("accuracy", before, after, params, OUT)
