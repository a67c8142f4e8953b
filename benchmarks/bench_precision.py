"""bf16 mixed precision tracks fp32: 50 steps of LoRA SFT on the city task, once in each, on SmolLM2-135M-Instruct.

The same run twice (seed, data order, LoRA r=8 alpha=16 on every linear, lr 1e-3, batch 4 x 256 packed),
once with --precision fp32 and once with bf16 (minicustom.precision: the frozen base stored in bf16,
autocast, fp32 adapters and AdamW). Checked:

  loss curve   each step's training loss, bf16 against fp32, within a band derived from two effects:
               - one forward's rounding. Rounding a logit z_j to bf16 moves it by at most U|z_j|
                 (U = 2^-8, bf16's unit roundoff), and a token's cross-entropy logsumexp(z) - z_y moves
                 by sum_j (p_j - [j = y]) e_j, at most 2 (1 - p_y) U max|z| <= 2 U max|z| CE (as
                 1 - p_y <= -log p_y). Averaged over the trained tokens: a relative error of at most
                 RHO = 2 U max|z| of the loss, max|z| the largest logit magnitude over the first batch's
                 trained tokens, at the start and at the end of the fp32 run (the larger).
               - the trajectory. The two runs' weights part from the first update on: Adam's first step
                 is lr * sign(g) in every coordinate, and a coordinate whose gradient is near zero may
                 take the other sign after bf16's rounding. What that changes is how far one step goes,
                 not where training heads, so bf16's loss at step t must lie within fp32's losses at
                 steps t-1..t+1 (one step ahead or behind), widened by RHO on each side.
               A run whose progress lags by two steps or more, or which stalls, leaves the band.
               The final eval losses must agree within RHO of fp32's.
  exact match  greedy answers to the 60 held-out questions: bf16 within one answer of fp32.

On a CPU without AVX512-BF16 or AMX, bf16 is emulated and about 100x slower; the script says so and stops
unless --force. Prints the CPU, the precision of each run, RHO, the curves against the band, and the times.

    python benchmarks/bench_precision.py [--steps 50] [--threads 2] [--force]
"""

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
U = 2.0**-8


def run(precision: str, steps: int, out: Path):
    from demo_lora import demo_lora_model  # benchmarks/, the script's folder

    from minicustom.data import load_examples
    from minicustom.train import TrainConfig, train

    model, tok = demo_lora_model()
    examples = load_examples(ROOT / "examples/data/city_train.jsonl", tok, max_length=256)
    held_out = load_examples(ROOT / "examples/data/city_eval.jsonl", tok, max_length=256)
    config = TrainConfig(lr=1e-3, max_steps=steps, batch_size=4, max_length=256, save_every=0, exact_match=60,
                         max_new_tokens=16, precision=precision, seed=0)
    t0 = time.perf_counter()
    history = train(model, examples, config, out, eval_examples=held_out, tokenizer=tok,
                    stop_ids=[tok.eos_token_id])
    return history, time.perf_counter() - t0, model, examples, tok


def largest_logit(model, examples, tok) -> float:
    """max |z| over the trained tokens of the first four examples, at the weights given (fp32)."""
    from minicustom.data import collate
    from minicustom.losses import trained_positions

    batch = collate([[e] for e in examples[:4]], tok.pad_token_id or 0)
    with torch.no_grad():
        h = model.forward_hidden(batch["input_ids"], attention_mask=batch.get("attention_mask"))
        hs, _ = trained_positions(h, batch["labels"])
        return float(model.head()(hs).abs().max())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--force", action="store_true", help="run even where bf16 is emulated (slow)")
    parser.add_argument("--out", default="runs/bench-precision")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from minicustom.precision import describe_cpu, resolve

    auto = resolve("auto", "cpu")
    print(f"# {describe_cpu(args.threads)}; auto would pick {auto.name}: {auto.reason}")
    if auto.name != "bf16" and not args.force:
        sys.exit("bench_precision: this CPU runs bf16 emulated (about 100x slower than fp32); --force to run anyway")
    import minicustom as mc
    from minicustom.gguf import fetch_demo_model

    results = {}
    for precision in ("fp32", "bf16"):
        history, seconds, model, examples, tok = run(precision, args.steps, Path(args.out) / precision)
        results[precision] = history, seconds, model
    fresh_max = largest_logit(mc.load_model(fetch_demo_model(install=False)), examples, tok)
    trained_max = largest_logit(results["fp32"][2], examples, tok)
    rho = 2 * U * max(fresh_max, trained_max)
    (h32, s32, _), (h16, s16, _) = results["fp32"], results["bf16"]
    train32 = [r["loss"] for r in h32 if "loss" in r]
    train16 = [r["loss"] for r in h16 if "loss" in r]
    bands = [(min(train32[max(t - 1, 0):t + 2]) * (1 - rho), max(train32[max(t - 1, 0):t + 2]) * (1 + rho))
             for t in range(len(train32))]
    outside = [t + 1 for t, (lo, hi) in enumerate(bands) if not lo <= train16[t] <= hi]
    gaps = [abs(a - b) for a, b in zip(train32, train16)]
    ev32, ev16 = h32[-1], h16[-1]
    em32, em16 = round(ev32["exact_match"] * 60), round(ev16["exact_match"] * 60)
    print(f"\nmax|z|: {fresh_max:.2f} at the start, {trained_max:.2f} after fp32's training  ->  RHO = 2 U max|z| "
          f"= {rho:.4f} (relative)")
    print("| step | fp32 loss | bf16 loss | band: fp32 steps t-1..t+1, widened by RHO |")
    print("|---|---|---|---|")
    for i in sorted({0, 1, 2, 3, 4, 9, 19, 29, 39, len(gaps) - 1}):
        if i < len(gaps):
            print(f"| {i + 1} | {train32[i]:.4f} | {train16[i]:.4f} | {bands[i][0]:.4f} .. {bands[i][1]:.4f} |")
    print(f"\nsteps outside the band: {outside or 'none'}; largest absolute gap {max(gaps):.4f} (step "
          f"{gaps.index(max(gaps)) + 1}), over the last {len(gaps) // 2} steps {max(gaps[len(gaps) // 2:]):.4f}")
    print(f"eval loss: fp32 {ev32['eval_loss']:.4f}, bf16 {ev16['eval_loss']:.4f} (gap "
          f"{abs(ev32['eval_loss'] - ev16['eval_loss']):.4f}); start {h32[0]['eval_loss']:.4f}")
    print(f"exact match on the 60 held-out questions: fp32 {em32}/60, bf16 {em16}/60 (start "
          f"{round(h32[0]['exact_match'] * 60)}/60)")
    print(f"time: fp32 {s32 / 60:.1f} min, bf16 {s16 / 60:.1f} min ({s32 / s16:.2f}x), evaluations included")
    ok = not outside and abs(ev32["eval_loss"] - ev16["eval_loss"]) <= rho * ev32["eval_loss"] and abs(em32 - em16) <= 1
    print("PASS: bf16 tracks fp32" if ok else "FAIL: bf16 does not track fp32 within the tolerance")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
