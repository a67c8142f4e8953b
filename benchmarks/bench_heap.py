"""What keeping freed memory (minicustom/train/heap.py) buys a CPU training step, at the batch it is for.

The SFT warm start of examples/rlhf_demo.py: LoRA r=8 alpha=16 on every linear of SmolLM2-135M-Instruct,
the arithmetic task packed into 8 rows of 1024 tokens, fp32 (or --precision bf16), AdamW. The same run in
fresh processes, alternating: "kept", a process that called keep_freed_memory first (glibc keeps the pages a
step frees), and "glibc default", the same `train` call in a process that did not. For each: tokens/s of the median
step after the first (the first pays one-time costs), the process's user and system CPU seconds and minor
page faults over the whole run (model loading included), and its peak RSS.

    python benchmarks/bench_heap.py [--steps 4] [--rounds 1] [--batch-size 8] [--precision fp32|bf16]
"""

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("kept", "glibc default")


def worker(mode: str, steps: int, batch_size: int, precision: str) -> None:
    import torch
    from demo_lora import demo_lora_model  # benchmarks/, the script's folder

    from minicustom.data import load_examples
    from minicustom.train import TrainConfig, train
    from minicustom.train.heap import keep_freed_memory

    torch.set_num_threads(2)
    if mode == "kept":
        keep_freed_memory()
    model, tok = demo_lora_model()
    examples = load_examples(ROOT / "examples/data/tasks/arithmetic/train.jsonl", tok, max_length=1024)
    config = TrainConfig(lr=1e-3, max_steps=steps, batch_size=batch_size, max_length=1024, save_every=0,
                         exact_match=0, precision=precision, seed=0)
    with tempfile.TemporaryDirectory() as out:
        train(model, examples, config, out)
        metrics = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    speeds = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m][1:]
    print(json.dumps({"tokens_s": statistics.median(speeds), "user_s": usage.ru_utime, "system_s": usage.ru_stime,
                      "faults": usage.ru_minflt, "peak_mb": usage.ru_maxrss / 1024,
                      "loss": [m["loss"] for m in metrics if "loss" in m]}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step is not timed")
    if args.worker:
        return worker(args.worker, args.steps, args.batch_size, args.precision)
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        sys.exit("bench_heap.py: keep_freed_memory sets glibc's malloc; this C library is not glibc")
    from minicustom.precision import describe_cpu

    print(f"# {describe_cpu(2)}, {args.precision}, LoRA r=8 on every linear of SmolLM2-135M-Instruct, "
          f"batch {args.batch_size} x 1024 packed, {args.steps} steps, {args.rounds} round(s), alternating\n")
    runs = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            cmd = [sys.executable, __file__, "--worker", mode, "--steps", str(args.steps), "--batch-size",
                   str(args.batch_size), "--precision", args.precision]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
    print("| malloc | tokens/s (median step) | user CPU s | system CPU s | system share | minor page faults | "
          "peak RSS (MB) |\n|---|---|---|---|---|---|---|")
    med = {mode: {k: statistics.median(r[k] for r in rs) for k in ("tokens_s", "user_s", "system_s", "faults",
                                                                    "peak_mb")} for mode, rs in runs.items()}
    for mode, m in med.items():
        share = m["system_s"] / (m["user_s"] + m["system_s"])
        print(f"| {mode} | {m['tokens_s']:,.0f} | {m['user_s']:,.0f} | {m['system_s']:,.0f} | {share:.0%} | "
              f"{m['faults']:,.0f} | {m['peak_mb']:,.0f} |")
    same = all(a["loss"] == b["loss"] for a, b in zip(runs["kept"], runs["glibc default"]))
    print(f"\nkept / default tokens/s: {med['kept']['tokens_s'] / med['glibc default']['tokens_s']:.2f}x; "
          f"losses {'identical' if same else 'DIFFER'} step for step")


if __name__ == "__main__":
    main()
