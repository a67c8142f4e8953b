"""bf16 mixed precision tracks fp32: 50 steps of LoRA SFT on the city task, once in each, on SmolLM2-135M-Instruct.

The same run twice (seed, data order, LoRA r=8 alpha=16 on every linear, lr 1e-3, batch 4 x 256 packed),
once with --precision fp32 and once with bf16 (minicustom.precision: the frozen base stored in bf16,
autocast, fp32 adapters and AdamW). Checked:

  loss curve   every step's training loss and the final eval loss of bf16 within TOL of fp32's, where
               TOL = 2 U max|z|, U = 2^-8 bf16's unit roundoff, max|z| the largest logit magnitude over the
               first batch's trained tokens at the start. Rounding the logits z to bf16 moves each by at
               most U|z|, so a token's cross-entropy logsumexp(z) - z_y by at most 2U max|z|: the largest
               single rounding of the forward (the hidden states' own roundings, each U relative, are
               averaged over the 576 terms of the next matmul). A curve within TOL at every step has not
               drifted from fp32's by more than one forward's rounding.
  exact match  greedy answers to the 60 held-out questions: bf16 within one answer of fp32.

On a CPU without AVX512-BF16 or AMX, bf16 is emulated and about 100x slower; the script says so and stops
unless --force. Prints the CPU, the precision of each run, both curves' largest gap, TOL, and the times.

    python benchmarks/bench_precision.py [--steps 50] [--threads 2] [--force]
"""

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
U = 2.0**-8


def run(precision: str, steps: int, out: Path):
    import minicustom as mc
    from minicustom.data import load_examples
    from minicustom.gguf import fetch_demo_model
    from minicustom.train import TrainConfig, train

    path = fetch_demo_model(install=False)
    tok = mc.load_tokenizer(path)
    model = mc.load_model(path)
    torch.manual_seed(0)
    mc.apply_lora(model, r=8, alpha=16, targets="all-linear", verbose=False)
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
    from minicustom.precision import cpu_flags, resolve

    auto = resolve("auto", "cpu")
    units = " ".join(sorted(cpu_flags() & {"avx512_bf16", "amx_bf16"})) or "none"
    print(f"# {platform.processor() or platform.machine()} ({torch.backends.cpu.get_cpu_capability()}; bf16 matmul "
          f"units: {units}), {args.threads} threads, torch {torch.__version__}; auto would pick {auto.name}: "
          f"{auto.reason}")
    if auto.name != "bf16" and not args.force:
        sys.exit("bench_precision: this CPU runs bf16 emulated (about 100x slower than fp32); --force to run anyway")
    import minicustom as mc
    from minicustom.gguf import fetch_demo_model

    results = {}
    for precision in ("fp32", "bf16"):
        history, seconds, model, examples, tok = run(precision, args.steps, Path(args.out) / precision)
        results[precision] = history, seconds
        del model
    fresh_max = largest_logit(mc.load_model(fetch_demo_model(install=False)), examples, tok)
    tol = 2 * U * fresh_max
    (h32, s32), (h16, s16) = results["fp32"], results["bf16"]
    train32 = [r["loss"] for r in h32 if "loss" in r]
    train16 = [r["loss"] for r in h16 if "loss" in r]
    gaps = [abs(a - b) for a, b in zip(train32, train16)]
    ev32, ev16 = h32[-1], h16[-1]
    em32, em16 = round(ev32["exact_match"] * 60), round(ev16["exact_match"] * 60)
    print(f"\nmax|z| at the start {fresh_max:.2f}  ->  TOL = 2 U max|z| = {tol:.4f} nats")
    print("| step | fp32 loss | bf16 loss | gap |")
    print("|---|---|---|---|")
    for i in sorted({0, 4, 9, 19, 29, 39, len(gaps) - 1}):
        if i < len(gaps):
            print(f"| {i + 1} | {train32[i]:.4f} | {train16[i]:.4f} | {gaps[i]:.4f} |")
    print(f"\nlargest training-loss gap {max(gaps):.4f} (step {gaps.index(max(gaps)) + 1}), mean {sum(gaps) / len(gaps):.4f}")
    print(f"eval loss: fp32 {ev32['eval_loss']:.4f}, bf16 {ev16['eval_loss']:.4f} (gap "
          f"{abs(ev32['eval_loss'] - ev16['eval_loss']):.4f}); start {h32[0]['eval_loss']:.4f}")
    print(f"exact match on the 60 held-out questions: fp32 {em32}/60, bf16 {em16}/60 (start "
          f"{round(h32[0]['exact_match'] * 60)}/60)")
    print(f"time: fp32 {s32 / 60:.1f} min, bf16 {s16 / 60:.1f} min ({s32 / s16:.2f}x), evaluations included")
    ok = max(gaps) <= tol and abs(ev32["eval_loss"] - ev16["eval_loss"]) <= tol and abs(em32 - em16) <= 1
    print("PASS: bf16 tracks fp32" if ok else "FAIL: bf16 does not track fp32 within the tolerance")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
