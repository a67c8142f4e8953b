"""Prompt engineering on SmolLM2-135M-Instruct: zero-shot, few-shot and chain of thought, nothing trained.

    python examples/prompting.py [sentiment|city|arithmetic]     # MINICUSTOM_SMOKE=1: seconds, tiny model

Asks the held-out questions of a shipped task three ways and scores the greedy answers with the task's scorer:
- zero-shot: the record's system prompt and the question;
- few-shot:  4 solved training examples, the most similar to the question (TF-IDF), as earlier chat turns;
- cot:       "Let's think step by step." (Kojima et al. 2022), with worked rationales as shots where the task has
             them (arithmetic: Wei et al. 2022).
Saves the three prompts, with their accuracy in `notes`, as a prompt library: `minicustom prompts eval --library
runs/prompting/library.jsonl --task examples/data/tasks/sentiment` scores them again on the validation split.
Implementation: minicustom/prompting.py (scoring: minicustom/evaluate.py, variants: minicustom/prompt_library.py)
"""

import json
import sys

from common import accuracy, held_out, model_path, out_dir, report, size

import minicustom as mc
from minicustom.prompt_library import Variant

MODEL = model_path()
TASK = held_out(sys.argv[1] if len(sys.argv) > 1 else "sentiment", n_test=size(30, 4))
SHOTS = 4
OUT = out_dir("prompting")

VARIANTS = [Variant("zero-shot"), Variant("few-shot", shots=SHOTS),
            Variant("cot", chain_of_thought=True, shots=SHOTS if TASK.chain_of_thought_data else 0)]
model, tok = mc.load_model(MODEL), mc.load_tokenizer(MODEL)
results = {}
for variant in VARIANTS:
    results[variant.name] = r = accuracy(model, tok, TASK, variant)
    tokens = sum(x["prompt_tokens"] for x in r.records) / r.n
    print(f"{variant.name:>9}: accuracy {r.accuracy:.3f}, {tokens:.0f} prompt tokens a question, "
          f"{r.metrics['latency_p50_s']:.2f} s p50 latency; first answer {r.records[0]['output'].strip()[:60]!r}")
best = max(VARIANTS, key=lambda v: results[v.name].accuracy)
OUT.mkdir(parents=True)
lines = [{**v.to_json(), "notes": f"test accuracy {results[v.name].accuracy:.3f} on the first {results[v.name].n} "
          f"{TASK.name} questions"} for v in VARIANTS]
(OUT / "library.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
report("accuracy", results["zero-shot"], results[best.name], None, OUT / "library.jsonl",
       labels=("zero-shot", best.name))
