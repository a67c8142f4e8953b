"""A reward model from SmolLM2-135M-Instruct: the decoder with a scalar head, trained on preference pairs.

    python examples/reward_model.py             # MINICUSTOM_SMOKE=1: a tiny random model, in seconds

The score r(x, y) is read at the last token; training lowers -log sigma(r(x, y_w) - r(x, y_l)) (Bradley-Terry,
as InstructGPT's reward model) on the sentiment task's pairs (a review with its right and a wrong label),
with LoRA on every linear and the new head trained whole. Prints the pairwise accuracy on held-out pairs
before and after, the scores of one held-out pair, and saves the merged model as a transformers
sequence-classification folder (a `--reward` for `minicustom train ppo|grpo`).
Implementation: minicustom/reward_model.py (its training: minicustom/train/rm.py)
"""

import tempfile

import torch
from common import held_out, model_path, out_dir, report, size

import minicustom as mc
from minicustom.data import load_preferences, pad_id_for
from minicustom.train import RMConfig, train_rm

MODEL = model_path()
TASK = held_out("sentiment", n_test=0)
STEPS, BATCH, LR = size(30, 2), 8, 5e-4  # batch: pairs per step
N_HELD_OUT = size(40, 4)  # validation pairs
OUT = out_dir("reward_model")

tok = mc.load_tokenizer(MODEL)
torch.manual_seed(0)  # the head's draw
rm = mc.RewardModel.from_causal_lm(mc.load_model(MODEL), pad_token_id=pad_id_for(tok))
mc.apply_lora(rm, r=8, alpha=16, targets="all-linear")
pairs = load_preferences(TASK.folder / "prefs_train.jsonl", tok)
held = load_preferences(TASK.folder / "prefs_validation.jsonl", tok)[:N_HELD_OUT]
with tempfile.TemporaryDirectory() as run:  # the run's checkpoints: only the merged model is kept
    history = train_rm(rm, pairs, RMConfig(lr=LR, max_steps=STEPS, batch_size=BATCH, save_every=0), run,
                       eval_pairs=held, pad_id=pad_id_for(tok))
params = mc.count_parameters(rm)  # LoRA and the score head
with torch.no_grad():
    r_w, r_l = (rm(torch.tensor([ex.input_ids])).item() for ex in (held[0].chosen, held[0].rejected))
text = lambda ex: tok.decode(ex.input_ids[ex.answer_start:], skip_special_tokens=True).strip()  # noqa: E731
sample = f"r({text(held[0].chosen)!r}) = {r_w:+.2f}, r({text(held[0].rejected)!r}) = {r_l:+.2f}"
mc.save_reward_model(rm, OUT)  # LoRA merged in: plain weights and score.weight
tok.save(OUT)
report(f"pairwise accuracy on {len(held)} held-out pairs", history[0]["eval_accuracy"], history[-1]["eval_accuracy"],
       params, OUT, sample)
