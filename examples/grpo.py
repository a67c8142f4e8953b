"""GRPO on SmolLM2-135M-Instruct: reinforcement learning from a verifiable reward, no labels to imitate.

    python examples/grpo.py                     # MINICUSTOM_SMOKE=1: a tiny random model, in seconds

For each sentiment review the policy samples G = 4 answers; the reward is 1 when an answer's first label is the
right one (the task's own scorer), else 0; each answer's advantage is its reward against its group's mean,
over the group's std (Shao et al. 2024), and the clipped policy-gradient objective trains a LoRA adapter.
The model never sees a right answer, only its own samples and their rewards. Prints greedy accuracy on
held-out reviews before and after, and the sampled reward at the start and the end; saves the adapter.
Implementation: minicustom/train/rl.py (sampling and scoring: minicustom/train/rollout.py, minicustom/rewards.py)
"""

import tempfile

from common import accuracy, held_out, model_path, out_dir, report, size

import minicustom as mc
from minicustom.data import pad_id_for
from minicustom.prompting import default_stop_ids
from minicustom.rewards import build_reward
from minicustom.train import RLConfig, train_rl
from minicustom.train.rollout import load_prompts

MODEL = model_path()
TASK = held_out("sentiment", n_test=size(30, 4))
STEPS, LR = size(24, 2), 3e-4
PROMPTS_PER_STEP, G, MAX_NEW_TOKENS = 4, 4, 8  # 16 sampled answers a step
OUT = out_dir("grpo")

model, tok = mc.load_model(MODEL), mc.load_tokenizer(MODEL)
prompts = load_prompts(TASK.folder / "train.jsonl", tok, max_prompt_length=256)  # the answers are left out
reward = build_reward("label", labels=TASK.labels)  # 1.0 when the first label named is the record's `answer`
before = accuracy(model, tok, TASK)
mc.apply_lora(model, r=8, alpha=16, targets="all-linear")
params = mc.count_parameters(model)
config = RLConfig(lr=LR, max_steps=STEPS, batch_size=PROMPTS_PER_STEP * G, num_generations=G, temperature=1.0,
                  max_new_tokens=MAX_NEW_TOKENS, max_length=256 + MAX_NEW_TOKENS, save_every=0, log_completions=0)
with tempfile.TemporaryDirectory() as run:  # the run's checkpoints: only the adapter is kept
    history = train_rl(model, prompts, config, run, reward=reward, tokenizer=tok, stop_ids=default_stop_ids(model, tok),
                       pad_id=pad_id_for(tok))
first, last = (sum(h["reward"] for h in part) / len(part) for part in (history[:5], history[-5:]))
print(f"GRPO: {STEPS} steps of {PROMPTS_PER_STEP} x {G} samples, mean sampled reward {first:.2f} (first 5 steps) -> "
      f"{last:.2f} (last 5)")
after = accuracy(model, tok, TASK)
mc.save_adapter(model, OUT, base_model_name_or_path=str(MODEL))
report("accuracy", before, after, params, OUT)
