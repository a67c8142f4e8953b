"""Prompt learning on SmolLM2-135M-Instruct: prompt tuning, p-tuning or prefix tuning, the model frozen.

    python examples/prompt_tuning.py [prompt|ptuning|prefix]     # MINICUSTOM_SMOKE=1: seconds, tiny model

- prompt:  20 virtual tokens whose embeddings are trained, started from the embeddings of the task's
           instruction (Lester et al. 2021; PEFT's PromptTuningInit.TEXT): 11,520 numbers.
- ptuning: the 20 embeddings are the output of a small MLP prompt encoder, trained (Liu et al. 2021).
- prefix:  20 learned keys and values in every layer (Li & Liang 2021; projection=True makes them with an MLP,
           as the paper does for stability: 2.26M numbers instead of 230,400).
Trains the chosen one on the sentiment task with the SFT loop and saves it as a PEFT folder.
Implementation: minicustom/methods/prompt_tuning.py, minicustom/methods/prefix.py
"""

import sys

from common import accuracy, held_out, model_path, out_dir, report, sft, size

import minicustom as mc

METHOD = sys.argv[1] if len(sys.argv) > 1 else "prompt"  # or "ptuning", "prefix"
MODEL = model_path()
TASK = held_out("sentiment", n_test=size(30, 4))
STEPS, BATCH = size(32, 2), 4
LR = {"prompt": 3e-2, "ptuning": 1e-3, "prefix": 1e-2}.get(METHOD)  # each method's usual step (the registry's)
VIRTUAL_TOKENS = 20
OUT = out_dir(f"prompt_tuning-{METHOD}")

if LR is None:
    sys.exit(f"METHOD is prompt, ptuning or prefix, got {METHOD!r}")
model, tok = mc.load_model(MODEL), mc.load_tokenizer(MODEL)
before = accuracy(model, tok, TASK)
if METHOD == "prompt":
    instruction = TASK.train[0]["messages"][0]["content"]  # the system prompt: "Classify the sentiment ..."
    mc.apply_prompt_tuning(model, VIRTUAL_TOKENS, init="text", init_text=instruction, tokenizer=tok)
elif METHOD == "ptuning":
    mc.apply_p_tuning(model, VIRTUAL_TOKENS, encoder="mlp")
else:
    mc.apply_prefix(model, VIRTUAL_TOKENS, projection=False)
params = mc.count_parameters(model)
sft(model, tok, TASK.train, STEPS, LR, BATCH)
after = accuracy(model, tok, TASK)
mc.save_adapter(model, OUT, base_model_name_or_path=str(MODEL))
report("accuracy", before, after, params, OUT)
