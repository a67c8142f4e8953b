"""Forward and generation throughput, minicustom vs transformers, on a real model (CPU): SmolLM2-135M-Instruct
by default, or any converted folder (Gemma 3 270M: --model ~/.cache/minicustom/gemma-3-270m after
`minicustom fetch-demo-model --name gemma3-270m`).

Both load the same converted checkpoint folder. Runs are interleaved (minicustom, transformers,
minicustom, ...) after a warm-up, and the median of each is reported with the ratio
minicustom / transformers (> 1 means minicustom is faster). Besides forward and greedy decoding, a GRPO-style
rollout: 4 different prompts x 8 samples each, temperature 0.5, left-padded.

--precision bf16 runs both under torch.autocast(bfloat16) with the weights in fp32, as a mixed-precision
trainer runs its rollouts (refused where the CPU has no fast bf16 matmul, unless --force).

    python benchmarks/bench_inference.py [--model DIR] [--repeats 5] [--threads 2] [--precision fp32|bf16]
"""

import argparse
import contextlib
import statistics
import sys
import time

import torch

import minicustom as mc
from minicustom.generate import left_pad
from minicustom.gguf import fetch_demo_model
from minicustom.precision import describe_cpu, resolve

QUESTIONS = ("Write a short poem about the sea.", "What is 17 * 23? Think step by step.",
             "Name three rivers in Europe.", "Explain what a KV cache is in one sentence.")


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(name, tokens, ours, theirs, repeats):
    ours(), theirs()  # warm-up
    t_ours, t_theirs = [], []
    for _ in range(repeats):
        t_ours.append(timed(ours))
        t_theirs.append(timed(theirs))
    a, b = tokens / statistics.median(t_ours), tokens / statistics.median(t_theirs)
    print(f"| {name} | {a:,.0f} | {b:,.0f} | {a / b:.2f}x |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder (default: the demo model)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--force", action="store_true", help="bf16 even where the CPU emulates it (slow)")
    args = parser.parse_args()
    auto = resolve("auto", "cpu")
    if args.precision == "bf16" and auto.name != "bf16" and not args.force:
        sys.exit(f"bench_inference: {auto.reason}; --force to run bf16 anyway")

    import transformers

    torch.set_num_threads(args.threads)
    path = args.model or str(fetch_demo_model())
    ours = mc.load_model(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    theirs.generation_config.pad_token_id = ours.config.eos_token_id
    tok = mc.load_tokenizer(path)
    print(f"# {path}\n# {describe_cpu(args.threads)}, transformers "
          f"{transformers.__version__}, {args.precision}{' (autocast, fp32 weights)' if args.precision == 'bf16' else ''}"
          f", median of {args.repeats}\n")
    print("| workload | minicustom tokens/s | transformers tokens/s | ratio |\n|---|---|---|---|")

    g = torch.Generator().manual_seed(0)
    mixed = torch.autocast("cpu", torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()
    with torch.inference_mode(), mixed:
        for B, T in ((1, 512), (4, 256)):
            ids = torch.randint(0, ours.config.vocab_size, (B, T), generator=g)
            compare(f"forward, batch {B} x {T} tokens", B * T, lambda ids=ids: ours(ids),
                    lambda ids=ids: theirs(ids), args.repeats)

        prompt = tok.apply_chat_template([{"role": "user", "content": "Write a short poem about the sea."}],
                                         add_generation_prompt=True)
        n = args.new_tokens
        for B in (1, 4):
            ids = torch.tensor([prompt] * B)
            compare(f"greedy generation, batch {B}, {len(prompt)}-token prompt + {n} new", B * n,
                    lambda ids=ids: ours.generate(ids, max_new_tokens=n),
                    lambda ids=ids: theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                                    min_new_tokens=n, do_sample=False),
                    args.repeats)
        prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
                   for q in QUESTIONS]
        ids, mask = left_pad([p for p in prompts for _ in range(8)], ours.config.eos_token_id)
        compare(f"sampled rollout, {len(prompts)} prompts x 8 samples, {ids.shape[1]}-token padded prompt + {n} new",
                ids.shape[0] * n,
                lambda: ours.generate(ids, n, attention_mask=mask, temperature=0.5, generator=g),
                lambda: theirs.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=True,
                                        temperature=0.5, top_k=None, top_p=None),
                args.repeats)
        # Same greedy tokens from both, so the two generation loops did the same work.
        ids = torch.tensor([prompt])
        same = torch.equal(ours.generate(ids, max_new_tokens=n),
                           theirs.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False))
        print(f"\n# identical greedy tokens: {same}")


if __name__ == "__main__":
    main()
