"""A GRPO update on SmolLM2-135M-Instruct on CPU: minicustom with each prompt run once for its G samples,
minicustom with every row run whole, and transformers + peft computing the log-probs as TRL's GRPOTrainer does.

The rollout of examples/rlhf_demo.py part (b): 4 arithmetic problems x 8 completions sampled at temperature
0.5 with up to 64 new tokens (minicustom's sampler, seeded), LoRA r=8 alpha=16 on every linear, fp32. What is
timed is one optimizer step's work on the 32 rows: the policy's per-token log-probs of the completions,
GRPO's clipped loss (losses.policy_loss, fixed random advantages) and its backward.
  shared prompts  train/rl.PolicyLoss as the trainer calls it: rows in groups, each prompt run once
                  (train/rollout.rows_hidden, model.PromptKV), its gradient summed over its 8 rows
  whole rows      the same module on the rows interleaved (no two neighbours share a prompt), so each row
                  runs prompt + completion: what it computed before
  transformers    TRL 1.16's layout and arithmetic: left-padded prompts + right-padded completions with an
                  attention mask, `model(..., logits_to_keep=C + 1)`, logits / temperature, log-softmax
                  at the completion tokens; the same policy_loss and backward
The no-grad pass a rollout takes for its old log-probs (num_iterations > 1) is timed too, shared and whole.
The variants alternate, `--repeats` times each after a warm-up; the medians and their ratios are printed.

    python benchmarks/bench_grpo.py [--repeats 3] [--threads 2]
"""

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch
from demo_lora import demo_lora_model  # benchmarks/, the script's folder

from minicustom.data import IGNORE, pad_id_for
from minicustom.gguf import fetch_demo_model
from minicustom.losses import policy_loss
from minicustom.precision import describe_cpu, store_frozen
from minicustom.prompting import default_stop_ids
from minicustom.train.rl import PolicyLoss, RLConfig
from minicustom.train.rollout import load_prompts, rows_table, sample, table_logps

ROOT = Path(__file__).resolve().parents[1]
G, PROBLEMS = 8, 4


def rollout(model, tok):
    """The rows (32, L) of one rollout of the demo's recipe, its config, and the groups' prompt lengths."""

    config = RLConfig(batch_size=G * PROBLEMS, num_generations=G, num_iterations=2, max_new_tokens=64,
                      temperature=0.5, max_length=512)
    prompts = load_prompts(ROOT / "examples/data/tasks/arithmetic/train.jsonl", tok, 448)[:PROBLEMS]
    rows = [p for p in prompts for _ in range(G)]
    pad = pad_id_for(tok)
    ids, _ = sample(model, tok, rows, config, default_stop_ids(model, tok), pad, torch.Generator().manual_seed(0))
    table = rows_table([p.ids for p in rows], ids, pad)
    table["advantages"] = torch.randn(len(rows), generator=torch.Generator().manual_seed(1))
    table["weight"] = torch.tensor(len(rows))
    print(f"rollout: {PROBLEMS} prompts of {[len(p.ids) for p in prompts]} tokens, {len(rows)} completions of "
          f"{int((table['labels'] != IGNORE).sum()) / len(rows):.1f} tokens on average, rows of {table['labels'].shape[1]}")
    return table, config, [len(p.ids) for p in rows], ids


def peer_inputs(table, prompt_lengths, completions, pad):
    """TRL's layout of the same rows: prompts left-padded, completions right-padded, and the mask."""
    P, C, N = max(prompt_lengths), max(map(len, completions)), len(completions)
    input_ids = torch.full((N, P + C), pad, dtype=torch.long)
    mask = torch.zeros((N, P + C), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_lengths, completions)):
        input_ids[i, P - p:P] = table["input_ids"][i, :p]
        input_ids[i, P:P + len(c)] = torch.tensor(c)
        mask[i, P - p:P + len(c)] = 1
    return input_ids, mask, mask[:, P:].bool(), input_ids[:, P:]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: both under torch.autocast, minicustom's frozen base stored in bf16 as its trainer "
                             "does (the rollout is sampled in fp32 either way; the gap check too)")
    parser.add_argument("--no-peer", action="store_true", help="minicustom alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import peft
    import transformers

    model, tok = demo_lora_model()
    model.train()
    table, config, prompt_lengths, completions = rollout(model, tok)
    loss_module = PolicyLoss(model, config)
    interleaved = torch.tensor([g * G + i for i in range(G) for g in range(PROBLEMS)])
    whole = {k: v[interleaved] if v.dim() else v for k, v in table.items()}

    if args.precision == "bf16":
        store_frozen(model, torch.bfloat16)  # as the trainer does

    def autocast():
        return torch.autocast("cpu", torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()

    def ours(batch):
        def run():
            loss, _ = loss_module(**batch)
            loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    variants = {"update, shared prompts": ours(table), "update, whole rows": ours(whole)}
    if not args.no_peer:
        hf = transformers.AutoModelForCausalLM.from_pretrained(fetch_demo_model(install=False), dtype=torch.float32)
        hf = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        hf.train()
        ids, mask, completion_mask, completion_ids = peer_inputs(table, prompt_lengths, completions, pad_id_for(tok))

        def peer_logps():
            logits = hf(input_ids=ids, attention_mask=mask, logits_to_keep=completion_ids.shape[1] + 1).logits
            logits = logits[:, :-1].float() / config.temperature  # (N, C, V), as TRL's _get_per_token_logps...
            return logits.log_softmax(-1).gather(-1, completion_ids[..., None]).squeeze(-1)  # (N, C)

        def peer():
            logps = peer_logps()
            loss = policy_loss(logps, logps.detach(), table["advantages"], completion_mask, "grpo", 0.2, None, 0.0)
            (loss * len(completions)).backward()
            hf.zero_grad(set_to_none=True)

        with torch.no_grad():  # both models are the base model (LoRA's B is 0): the same log-probs
            theirs = peer_logps()
            mine = table_logps(model, table, config)
            trained = table["labels"][:, 1:] != IGNORE
            gap = max(float((mine[i][trained[i]] - theirs[i][completion_mask[i]]).abs().max())
                      for i in range(len(completions)))
        print(f"largest gap between the two libraries' completion log-probs: {gap:.2e}")
        variants["update, transformers"] = peer
    variants.update({"old log-probs, shared": lambda: table_logps(model, table, config),
                     "old log-probs, whole": lambda: table_logps(model, whole, config)})
    times = {name: [] for name in variants}
    for round_ in range(args.repeats + 1):
        for name, fn in variants.items():
            start = time.perf_counter()
            with autocast():
                fn()
            if round_:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    print(f"SmolLM2-135M-Instruct, LoRA r=8 all-linear, {args.precision}, {describe_cpu(args.threads)}")
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"| part | seconds (median of {args.repeats}) | vs shared |")
    print("|---|---|---|")
    for name, seconds in median.items():
        base = median["old log-probs, shared" if name.startswith("old") else "update, shared prompts"]
        print(f"| {name} | {seconds:.2f} | {seconds / base:.2f}x |")


if __name__ == "__main__":
    main()
