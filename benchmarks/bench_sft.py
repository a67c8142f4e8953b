"""LoRA / QLoRA SFT training step, minicustom vs transformers + peft, on SmolLM2-135M-Instruct (CPU or CUDA).

The step: LoRA r=8, alpha=16 on all 7 linear projections of every layer, a batch of 4 x 256 tokens,
forward, backward, AdamW. Two workloads over the same ids and labels for both libraries:
  chat  - multi-turn chats of the shipped city task (examples/data), only assistant tokens trained
  all   - the same rows with every token trained (language-model pretraining style)
With --method qlora every linear but lm_head is NF4 with double quantization: the model is quantized once
into a temporary checkpoint folder (bitsandbytes' serialization) that both libraries load, minicustom by
itself and transformers through bitsandbytes, computing in fp32. Neither process ever holds the fp32
linears, so peak memory is the 4-bit model's, and identical 4-bit bytes give both the same first loss.
minicustom runs its trainer's own step (minicustom.train.loop.accumulate_gradients: chunked cross-entropy
at trained positions only); transformers+peft runs `model(input_ids, labels=labels).loss.backward()`.

Each (library, workload) runs in a fresh process, so that peak memory (ru_maxrss) is its own; processes
alternate minicustom, transformers, minicustom, ... for `--rounds` rounds, each timing `--steps` steps after
a warm-up step; the median step time gives tokens/s, and the ratio is the median over rounds of the two
neighbouring runs' ratio. "train mem" is the peak RSS minus the RSS after
loading the model and attaching LoRA: what the training step itself adds. `--gradient-checkpointing` turns on
activation checkpointing per block in both (minicustom's `gradient_checkpointing`, transformers'
`gradient_checkpointing_enable`, both non-reentrant): each block keeps only its input and recomputes the rest
in backward, so the memory left is mostly the loss's and the model's.
`--memory` traces the allocations of one more step per run and prints the tensors alive at its peak, grouped by
the op that made them (benchmarks/memory_peak.py), beside the RSS the step added.
`--malloc minicustom|both` tells glibc, in minicustom's process or in both, to keep the memory a step frees
for the next one (minicustom/train/heap.py); the default leaves both with glibc's defaults.

`--precision bf16` (or fp16 on CUDA) trains in mixed precision: minicustom through its trainer's own path
(minicustom.precision: the frozen base stored in bf16, autocast, fp32 adapters), transformers+peft with its
fp32 model under `torch.autocast`, as its Trainer does with bf16=True. The peer is then also measured in
fp32, in the same rounds, and each row gives both ratios. The first losses of the two libraries must agree
(1e-3 relative in fp32; 1e-2 in bf16, whose logits each carry up to 2^-8 relative rounding).

On CUDA (`--device cuda`, run by scripts/gpu_check.sh) the Linear4bit layers run minicustom's Triton kernels,
times are taken after torch.cuda.synchronize(), and the memory columns are torch.cuda.max_memory_allocated
(peak) and that peak minus what was allocated after loading ("train mem"). Where the demo model is not
installed (a GPU machine cannot fetch it) `--model random` is taken: SmolLM2-135M's architecture with random
weights and random token rows, the "chat" workload then training the last quarter of each row; the step
costs the same, only the first loss is meaningless. A peer that cannot be imported (bitsandbytes for
QLoRA) is reported as such and minicustom is measured alone.

    python benchmarks/bench_sft.py [--method lora|qlora] [--model DIR|random] [--device cpu|cuda]
                                   [--precision fp32|bf16|fp16] [--gradient-checkpointing]
                                   [--malloc default|minicustom|both] [--profile] [--memory]
                                   [--rounds 2] [--steps 3] [--threads 2]
"""

import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from memory_peak import live_at_peak  # benchmarks/, the script's folder

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
B, T = 4, 256


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


# SmolLM2-135M-Instruct's config.json (the fields that shape the step), for --model random
SMOLLM2 = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=576,
               intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
               head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
               tie_word_embeddings=True, hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=2)


def random_checkpoint(folder: Path) -> str:
    """SmolLM2-135M's architecture with random weights (std 0.02), written as a checkpoint folder."""
    import torch

    import minicustom as mc

    torch.manual_seed(0)
    model = mc.Transformer(mc.ModelConfig.from_dict(SMOLLM2, source="SmolLM2-135M (random weights)"))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(std=0.02)
            else:  # RMSNorm weights
                p.fill_(1.0)
    mc.save_model(model, folder)
    return str(folder)


def batch(path, workload):
    """(input_ids, labels), each (B, T): multi-turn chats of the city task cut to T tokens (random rows for a
    random model)."""
    import torch

    if (Path(path) / "RANDOM").exists():
        ids = torch.randint(3, SMOLLM2["vocab_size"], (B, T), generator=torch.Generator().manual_seed(0))
        labels = ids.clone()
        if workload == "chat":
            labels[:, : 3 * T // 4] = -100
        labels[:, 0] = -100
        return ids, labels
    import minicustom as mc
    from minicustom.data import IGNORE, make_example, read_jsonl

    tok = mc.load_tokenizer(path)
    records = [r for _, r in read_jsonl(Path(__file__).parents[1] / "examples/data/city_train.jsonl")]
    rows, k = [], 0
    for _ in range(B):
        messages = records[k]["messages"][:1]  # the system prompt, then turns until T tokens
        while len(make_example({"messages": messages + [{"role": "user", "content": "x"},
                                                        {"role": "assistant", "content": "y"}]}, tok)) < T + 40:
            messages += records[k]["messages"][1:]
            k += 1
        rows.append(make_example({"messages": messages}, tok))
    ids = torch.tensor([e.input_ids[:T] for e in rows])
    labels = torch.tensor([e.labels[:T] for e in rows])
    if workload == "all":
        labels = ids.clone()
    labels[:, 0] = IGNORE
    return ids, labels


# torch.profiler's ops by the part of the step they do, first match wins (self time, so nothing counts twice)
CATEGORIES = [
    ("matmuls (linears, LoRA, lm_head)", ("mm", "addmm", "bmm", "baddbmm", "linear", "matmul", "mkldnn", "onednn")),
    ("attention (SDPA, one-token attention)", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
    ("loss (log-softmax, cross-entropy)", ("log_softmax", "logsumexp", "nll_loss", "cross_entropy", "softmax")),
    ("optimizer (AdamW)", ("_foreach", "adam", "lerp", "addcdiv", "addcmul")),
    ("norms", ("rms_norm", "norm", "rsqrt")),
    ("copies, casts, views", ("copy_", "_to_copy", "to", "contiguous", "clone", "cat", "index", "gather", "scatter",
                              "transpose", "view", "reshape", "expand", "slice", "select", "t", "permute", "empty",
                              "zeros", "fill_", "zero_", "as_strided", "unsqueeze", "split", "chunk", "narrow")),
    ("elementwise (RoPE, SwiGLU, residuals, grads)", ("mul", "add", "sub", "div", "neg", "silu", "gelu", "sigmoid",
                                                       "exp", "pow", "mean", "sum", "where", "masked_fill", "sqrt")),
]


def categorize(name: str) -> str:
    op = name.removeprefix("aten::").lower()
    for category, keys in CATEGORIES:
        if any(op == k or op.startswith(k + "_") or op.startswith("_" + k) or (len(k) > 4 and k in op)
               for k in keys):
            return category
    return "other (autograd engine, Python, ...)"


def profile(step) -> dict[str, float]:
    """One step under torch.profiler (CPU activities): seconds of self time per category of CATEGORIES."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    seconds: dict[str, float] = {}
    for event in prof.key_averages():
        category = categorize(event.key)
        seconds[category] = seconds.get(category, 0.0) + event.self_cpu_time_total / 1e6
    return seconds


def worker(library, workload, path, model_path, steps, threads, device, precision, checkpointing=False,
           profiled=False, malloc="default", memory=False):
    import contextlib

    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if device == "cpu" and (malloc == "both" or malloc == library):
        from minicustom.train.heap import keep_freed_memory

        keep_freed_memory()
    ids, labels = (t.to(device) for t in batch(path, workload))
    cuda = device.startswith("cuda")

    def used_mb() -> float:
        return torch.cuda.memory_allocated() / 2**20 if cuda else rss_mb()

    if library == "minicustom":
        import minicustom as mc
        from minicustom.precision import DTYPES, store_frozen
        from minicustom.train.loop import accumulate_gradients
        from minicustom.train.sft import SFTLoss

        model = mc.load_model(model_path, device=device)
        mc.apply_lora(model, r=8, alpha=16, targets=TARGETS, verbose=False)
        model.train()
        model.gradient_checkpointing = checkpointing  # each block recomputed in backward
        if precision != "fp32":
            store_frozen(model, DTYPES[precision])  # as train.loop.run does
        wrapper = SFTLoss(model, chunk=512)

        def loss_backward():
            return accumulate_gradients(wrapper, [{"input_ids": ids, "labels": labels}], device)[0]
    else:
        import peft
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                                  device_map=device)
        if checkpointing:  # non-reentrant, as minicustom's, so the frozen embedding output needs no grad hook
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
        model.train()

        def loss_backward():
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            return float(loss)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        from minicustom.precision import DTYPES

        mixed = precision != "fp32"  # fp16: no loss scaler, timing only
        with torch.autocast(device.split(":")[0], dtype=DTYPES[precision]) if mixed else contextlib.nullcontext():
            loss = loss_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    base = used_mb()
    first_loss = step()  # warm-up; also the loss of the untouched model, the same for both libraries
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({"median_s": statistics.median(times), "peak_mb": peak, "train_mb": peak - base,
                      "first_loss": first_loss, "trained": int((labels[:, 1:] != -100).sum()),
                      "profile": profile(step) if profiled else None,
                      "memory": live_at_peak(step) if memory else None}))


def print_profiles(measured: dict) -> None:
    """Per workload, the median over rounds of each category's seconds in one profiled step, per library."""
    for workload, runs in measured.items():
        kinds = list(runs)
        table = {kind: {} for kind in kinds}
        for kind, results in runs.items():
            for category in {c for r in results for c in r["profile"]}:
                table[kind][category] = statistics.median(r["profile"].get(category, 0.0) for r in results)
        names = [f"{library} {precision}" for library, precision in kinds]
        print(f"\n{workload}: seconds of one profiled step (torch.profiler self CPU time; the profiler adds its own "
              f"overhead)\n\n| part of the step | " + " | ".join(names) + " |\n|---|" + "---|" * len(kinds))
        order = sorted(table[kinds[0]], key=table[kinds[0]].get, reverse=True)
        order += sorted({c for t in table.values() for c in t} - set(order))
        for category in order + ["total"]:
            cells = [sum(table[k].values()) if category == "total" else table[k].get(category, 0.0) for k in kinds]
            print(f"| {category} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")


def print_memory(measured: dict) -> None:
    """Per workload and library (first round): the step's peak RSS growth, its tensors' peak, and what holds it."""
    for workload, runs in measured.items():
        for (library, precision), results in runs.items():
            r = results[0]
            m = r["memory"]
            print(f"\n{workload}, {library} {precision}: the step adds {r['train_mb']:,.0f} MB of RSS at its peak; its "
                  f"tensors peak at {m['peak_mb']:,.0f} MB. Alive there, by the op that made them:\n\n| made in | op | MB |"
                  "\n|---|---|---|")
            for phase, op, mb in m["groups"]:
                print(f"| {phase} | {op} | {mb:,.1f} |")
            print(f"| (the rest) | | {m['rest_mb']:,.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder, or 'random' (default: the demo model if installed, "
                                        "else random)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--method", choices=["lora", "qlora"], default="lora")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="both libraries recompute each block in backward (activation checkpointing)")
    parser.add_argument("--profile", action="store_true",
                        help="after the timed steps each run profiles one more with torch.profiler; a table per "
                             "workload gives the seconds of each part of the step, for both libraries")
    parser.add_argument("--malloc", choices=["default", "minicustom", "both"], default="default",
                        help="whose process keeps freed memory for the next step (train/heap.py): neither, "
                             "minicustom's, or both")
    parser.add_argument("--memory", action="store_true",
                        help="after the timed steps each run traces one more step's allocations: the tensors "
                             "alive at its peak, by the op that made them (benchmarks/memory_peak.py)")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker[:2], args.model, args.worker[2], args.steps, args.threads, args.device,
                      args.worker[3], args.gradient_checkpointing,
                      args.profile, args.malloc, args.memory)

    import tempfile

    import peft
    import torch
    import transformers

    from minicustom.gguf import fetch_demo_model

    path = args.model
    if path is None:
        try:
            path = str(fetch_demo_model(install=False))
        except FileNotFoundError:
            path = "random"
    if path == "random":
        path = random_checkpoint(Path(tempfile.mkdtemp(prefix="bench-random-")))
        (Path(path) / "RANDOM").touch()
    peers = ["transformers"]
    if args.method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        print("# bitsandbytes is not importable: transformers+peft QLoRA is not measured, minicustom alone")
        peers = []
    model_path = path
    if args.method == "qlora":
        import minicustom as mc

        model_path = tempfile.mkdtemp(prefix="bench-qlora-")
        model = mc.load_model(path, quantize="nf4")
        mc.save_model(model, model_path)
        print(f"# {mc.memory_report(model)}")
        del model

    from minicustom.precision import describe_cpu

    P = args.precision
    where = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}" if args.device.startswith("cuda")
             else describe_cpu(args.threads))
    print(f"# {path}{' (random weights)' if (Path(path) / 'RANDOM').exists() else ''}\n# {where}, transformers {transformers.__version__}, peft {peft.__version__}, precision {P}, "
          f"{args.method} r=8 on 7 projections{', activation checkpointing per block' if args.gradient_checkpointing else ''}, "
          f"malloc {args.malloc}, "
          f"batch {B} x {T}, median of {args.rounds} x {args.steps} steps\n")
    baseline = P != "fp32" and bool(peers)  # the peer in fp32 too, for minicustom-in-P vs peer-in-fp32
    print(f"| workload | trained tokens | minicustom {P} tokens/s | transformers+peft {P} tokens/s | ratio | "
          + (f"transformers+peft fp32 tokens/s | minicustom {P} / peer fp32 | " if baseline else "")
          + "minicustom peak / train mem (MB) | transformers+peft peak / train mem (MB) | peak ratio |")
    print("|---|---|---|---|---|" + ("---|---|" if baseline else "") + "---|---|---|")
    measured = {}
    for workload in ("chat", "all"):
        kinds = [("minicustom", P)] + [(peer, P) for peer in peers] + ([("transformers", "fp32")] if baseline else [])
        runs = {kind: [] for kind in kinds}
        for _ in range(args.rounds):
            for library, precision in runs:
                cmd = [sys.executable, __file__, "--worker", library, workload, model_path, precision, "--model", path,
                       "--steps", str(args.steps), "--threads", str(args.threads), "--device", args.device]
                cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
                cmd += ["--profile"] if args.profile else []
                cmd += ["--memory"] if args.memory else []
                cmd += ["--malloc", args.malloc]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                runs[library, precision].append(json.loads(out.strip().splitlines()[-1]))
        ours = runs["minicustom", P]
        measured[workload] = runs
        mem = lambda x: (max(r["peak_mb"] for r in x), max(r["train_mb"] for r in x))  # noqa: E731
        a = B * T / statistics.median(r["median_s"] for r in ours)
        if not peers:
            print(f"| {workload} | {ours[0]['trained']} of {B * (T - 1)} | {a:,.0f} | not measured | - | "
                  f"{mem(ours)[0]:,.0f} / {mem(ours)[1]:,.0f} | - | - |")
            continue
        theirs = runs["transformers", P]
        tolerance = 1e-3 if P == "fp32" else 1e-2
        if abs(ours[0]["first_loss"] - theirs[0]["first_loss"]) > tolerance * abs(theirs[0]["first_loss"]):
            raise SystemExit(f"the two libraries disagree on the loss: {ours[0]['first_loss']} vs "
                             f"{theirs[0]['first_loss']}")

        def speed(runs_):
            return B * T / statistics.median(r["median_s"] for r in runs_)

        def ratio(other, ours=ours):
            # the ratio of each round's neighbouring runs, then the median: robust to the machine's speed
            # drifting over minutes (a shared host), which moves both libraries' figures between rounds
            return statistics.median(t["median_s"] / o["median_s"] for o, t in zip(ours, other))

        extra = ""
        if baseline:
            fp32 = runs["transformers", "fp32"]
            extra = f"{speed(fp32):,.0f} | {ratio(fp32):.2f}x | "
        (m0, t0), (m1, t1) = mem(ours), mem(theirs)
        print(f"| {workload} | {ours[0]['trained']} of {B * (T - 1)} | {a:,.0f} | {speed(theirs):,.0f} | "
              f"{ratio(theirs):.2f}x | {extra}{m0:,.0f} / {t0:,.0f} | {m1:,.0f} / {t1:,.0f} | {m0 / m1:.2f} |",
              flush=True)
    if args.profile:
        print_profiles(measured)
    if args.memory:
        print_memory(measured)
    if model_path != path:
        import shutil

        shutil.rmtree(model_path)
    if (Path(path) / "RANDOM").exists():
        import shutil

        shutil.rmtree(path)


if __name__ == "__main__":
    main()
