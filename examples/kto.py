"""KTO on SmolLM2-135M-Instruct: alignment from thumbs-up / thumbs-down answers, one at a time (no pairs).

    python examples/kto.py                      # MINICUSTOM_SMOKE=1: a tiny random model, in seconds

Each sentiment review's preference pair becomes two unpaired records, as `minicustom train kto` does with a
paired file: its right label marked desirable and a wrong one undesirable. KTO (Ethayarajh et al. 2024) raises
the implicit reward log pi - log pi_ref of the desirable answers above a reference point (the batch's KL
estimate, each prompt with the previous record's answer in the shuffled batch) and pushes the undesirable ones
below it, with a LoRA adapter and the base model (adapter disabled) as reference. Prints held-out preference
accuracy (how often log pi(right label) > log pi(wrong label)) and greedy accuracy on held-out reviews before
and after, and saves the adapter.
Implementation: minicustom/train/kto.py (the loss: kto_loss in minicustom/losses.py)
"""

import tempfile

from common import accuracy, held_out, model_path, out_dir, report, size

import minicustom as mc
from minicustom.data import load_preferences, pad_id_for
from minicustom.train import KTOConfig, train_kto
from minicustom.train.kto import split_pairs

MODEL = model_path()
TASK = held_out("sentiment", n_test=size(30, 4))
STEPS, BATCH, LR, BETA = size(20, 2), 8, 5e-4, 0.1
N_HELD_OUT = size(20, 4)  # validation pairs
OUT = out_dir("kto")

model, tok = mc.load_model(MODEL), mc.load_tokenizer(MODEL)
pairs = load_preferences(TASK.folder / "prefs_train.jsonl", tok)
feedback = split_pairs(pairs)  # each review: its right label desirable, then a wrong one undesirable
held = load_preferences(TASK.folder / "prefs_validation.jsonl", tok)[:N_HELD_OUT]
before = accuracy(model, tok, TASK)
mc.apply_lora(model, r=8, alpha=16, targets="all-linear")
params = mc.count_parameters(model)
with tempfile.TemporaryDirectory() as run:  # the run's checkpoints: only the adapter is kept
    history = train_kto(model, feedback, KTOConfig(lr=LR, beta=BETA, max_steps=STEPS, batch_size=BATCH, save_every=0),
                        run, reference="base", eval_pairs=held, pad_id=pad_id_for(tok))
after = accuracy(model, tok, TASK)
print(f"greedy accuracy on {after.n} held-out reviews: {before.accuracy:.3f} before -> {after.accuracy:.3f} after")
mc.save_adapter(model, OUT, base_model_name_or_path=str(MODEL))
report(f"preference accuracy on {len(held)} held-out pairs", history[0]["eval_policy_accuracy"],
       history[-1]["eval_policy_accuracy"], params, OUT, sample=after)
