"""DPO on SmolLM2-135M-Instruct: preference pairs (a right and a wrong label) teach the model, no reward model.

    python examples/dpo.py                      # MINICUSTOM_SMOKE=1: a tiny random model, in seconds

Each pair of the shipped sentiment task holds a review, the right label (chosen) and a wrong one (rejected).
DPO (Rafailov et al. 2023) trains a LoRA adapter so that the implicit reward beta * (log pi - log pi_ref) of
the chosen answer rises above the rejected one's, the reference pi_ref being the base model (the adapter
disabled: no second copy). Prints the held-out pairs' preference accuracy (how often log pi(right label) >
log pi(wrong label)) and greedy accuracy on held-out reviews before and after; saves the adapter. The pairs
teach which label, not the one-word format: DPO usually follows an SFT run (`minicustom compare` does that),
and RPO_ALPHA = 1.0 adds the chosen answers' NLL to the loss (RPO, Pang et al. 2024), which teaches both.
Implementation: minicustom/train/dpo.py (the losses: minicustom/losses.py)
"""

import tempfile

from common import accuracy, held_out, model_path, out_dir, report, size

import minicustom as mc
from minicustom.data import load_preferences, pad_id_for
from minicustom.train import DPOConfig, train_dpo

MODEL = model_path()
TASK = held_out("sentiment", n_test=size(30, 4))
STEPS, BATCH, LR, BETA = size(30, 2), 4, 5e-4, 0.1  # batch: pairs per step
RPO_ALPHA = None  # or 1.0: RPO
N_HELD_OUT = size(40, 4)  # validation pairs
OUT = out_dir("dpo")

model, tok = mc.load_model(MODEL), mc.load_tokenizer(MODEL)
pairs = load_preferences(TASK.folder / "prefs_train.jsonl", tok)
held = load_preferences(TASK.folder / "prefs_validation.jsonl", tok)[:N_HELD_OUT]
before = accuracy(model, tok, TASK)
mc.apply_lora(model, r=8, alpha=16, targets="all-linear")
params = mc.count_parameters(model)
config = DPOConfig(lr=LR, beta=BETA, rpo_alpha=RPO_ALPHA, max_steps=STEPS, batch_size=BATCH, save_every=0)
with tempfile.TemporaryDirectory() as run:  # the run's checkpoints: only the adapter is kept
    history = train_dpo(model, pairs, config, run, reference="base", eval_pairs=held, pad_id=pad_id_for(tok))
after = accuracy(model, tok, TASK)
print(f"greedy accuracy on {after.n} held-out reviews: {before.accuracy:.3f} before -> {after.accuracy:.3f} after")
mc.save_adapter(model, OUT, base_model_name_or_path=str(MODEL))
report(f"preference accuracy on {len(held)} held-out pairs", history[0]["eval_policy_accuracy"],
       history[-1]["eval_policy_accuracy"], params, OUT, sample=after)
