"""Forward and generation throughput, minicustom vs transformers, on a real model (CPU, fp32): SmolLM2-135M-Instruct
by default, or any converted folder (Gemma 3 270M: --model ~/.cache/minicustom/gemma-3-270m after
`minicustom fetch-demo-model --name gemma3-270m`).

Both load the same converted checkpoint folder. Runs are interleaved (minicustom, transformers,
minicustom, ...) after a warm-up, and the median of each is reported with the ratio
minicustom / transformers (> 1 means minicustom is faster).

    python benchmarks/bench_inference.py [--model DIR] [--repeats 5] [--threads 2]
"""

import argparse
import platform
import statistics
import time

import torch

import minicustom as mc
from minicustom.gguf import fetch_demo_model


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
    args = parser.parse_args()

    import transformers

    torch.set_num_threads(args.threads)
    path = args.model or str(fetch_demo_model())
    ours = mc.load_model(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    theirs.generation_config.pad_token_id = ours.config.eos_token_id
    tok = mc.load_tokenizer(path)
    print(f"# {path}\n# {platform.processor() or platform.machine()}, {args.threads} threads, ATen CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, fp32, median of {args.repeats}\n")
    print("| workload | minicustom tokens/s | transformers tokens/s | ratio |\n|---|---|---|---|")

    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
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
        # Same greedy tokens from both, so the two generation loops did the same work.
        ids = torch.tensor([prompt])
        same = torch.equal(ours.generate(ids, max_new_tokens=n),
                           theirs.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False))
        print(f"\n# identical greedy tokens: {same}")


if __name__ == "__main__":
    main()
