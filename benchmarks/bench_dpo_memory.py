"""DPO + LoRA training-step memory under two reference policies, minicustom vs TRL + PEFT, on
SmolLM2-135M-Instruct (CPU, fp32).

The step: LoRA r=8, alpha=16, dropout 0 on all 7 linear projections of every layer, a batch of 8 preference
pairs of the shipped city task (examples/data/city_prefs_train.jsonl, its first 8 records, every step), the
reference forward, the policy forward and backward over the 16 rows, gradient clipping at 1.0, AdamW.
The reference policy pi_ref is either
  base  - the policy with its adapters disabled: minicustom `reference="base"`; TRL's DPOTrainer given the
          base model with a peft_config and ref_model=None, which computes the reference under
          `use_adapter(model, adapter_name=None)`, i.e. `PeftModel.disable_adapter()` (checked below: no
          ref_model, and no "ref" adapter, which TRL would add for a model passed already PEFT-wrapped)
  copy  - a separate frozen model loaded from the same folder: minicustom `reference=<folder>`; TRL
          `ref_model=AutoModelForCausalLM.from_pretrained(<folder>)`
minicustom runs its trainer's own step (minicustom.train.dpo.DPOLoss through minicustom.train.loop.accumulate_gradients,
then clip and AdamW); TRL runs DPOTrainer.train() for 1 + `--steps` steps (no gradient checkpointing, no
bf16, reference log-probs computed live, no checkpoints saved), a callback timing each step from
on_step_begin to on_step_end. Both see the same 8 pairs: the mean log-prob of the chosen completions at the
first step (policy = reference there) must agree, which checks that both tokenized the chats alike.

Each (reference, library) runs in a fresh process, so that peak memory (ru_maxrss) is its own; processes
alternate minicustom, TRL for each reference, for `--rounds` rounds, each timing `--steps` steps after a
warm-up step. "after load" is the RSS once the model is loaded, LoRA attached and the reference created
(for TRL: once DPOTrainer is constructed, which attaches LoRA itself), so whatever loading a separate copy
allocates is counted there; "train mem" is the peak RSS minus that: what the training steps add. Both processes' RSS include their
imports (TRL's: transformers, peft, datasets, accelerate), which is part of what using the library costs.

The weights of an fp32 checkpoint loaded in fp32 are not copied by either library: the tensors are views of
the mmapped .safetensors file, paged in by the first forward. So "after load" holds almost none of them and
"train mem" holds them all, and a separate copy loaded from the same folder maps the same file again: the
same physical page-cache pages, which RSS counts once per mapping (so once more for the copy) and PSS once.
The table gives the RSS and PSS of the weights' file pages at the end, and the peak with them counted once
(peak RSS - their RSS + their PSS): with it, what the copy costs in physical memory. A checkpoint stored in
another dtype (most are bf16) is converted on load: then each copy is private memory, in "after load".

    python benchmarks/bench_dpo_memory.py [--model DIR] [--rounds 2] [--steps 3] [--batch-size 8] [--threads 2]
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DATA = Path(__file__).parents[1] / "examples/data/city_prefs_train.jsonl"
MAX_LENGTH, LR = 512, 5e-5
REFERENCES = {"base": "adapters disabled", "copy": "separate copy"}
LIBRARIES = {"minicustom": "minicustom", "trl": "TRL+PEFT"}


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mapped_weights_mb(folder) -> tuple[float, float]:
    """(RSS, PSS) of this process's mappings of the folder's .safetensors files. An fp32 checkpoint loaded as
    fp32 is not copied by either library: its tensors stay views of the mmapped file, paged in on first use.
    RSS counts a page once per mapping, PSS divides it among them, so two models mapping one file are two
    RSS but one PSS."""
    folder, rss, pss, ours = str(Path(folder).resolve()), 0, 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if not line[0].isupper():  # a mapping's header: address perms offset dev inode [path]
                ours = len(fields) >= 6 and fields[5].startswith(folder) and fields[5].endswith(".safetensors")
            elif ours and fields[0] == "Rss:":
                rss += int(fields[1])
            elif ours and fields[0] == "Pss:":
                pss += int(fields[1])
    return rss / 1024, pss / 1024


def run_minicustom(reference, path, steps, batch_size):
    """(RSS after load, step times, mean log-prob of the chosen completions at the first step, the mapped
    weights' (RSS, PSS) at the end, read while the models are alive)."""
    import torch

    import minicustom as mc
    from minicustom.data import load_preferences, pad_id_for
    from minicustom.train.dpo import DPOConfig, DPOLoss, make_reference, pair_batch
    from minicustom.train.loop import accumulate_gradients

    model = mc.load_model(path)
    tok = mc.load_tokenizer(path)
    mc.apply_lora(model, r=8, alpha=16, targets=TARGETS, verbose=False)
    pairs = load_preferences(DATA, tok, max_length=MAX_LENGTH, report=lambda *a: None)[:batch_size]
    ref = make_reference(model, "base" if reference == "base" else str(path))  # "copy": a second frozen model
    after_load = rss_mb()
    wrapper = DPOLoss(model, ref, DPOConfig(batch_size=batch_size, lr=LR))
    model.train()
    batch = pair_batch(pairs, pad_id_for(tok))
    batch["pair_mask"] = torch.ones(len(pairs), dtype=torch.long)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)

    def step():
        _, _, _, stats = accumulate_gradients(wrapper, [batch], "cpu", weight=lambda b: int(b["pair_mask"].sum()))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return stats

    first = step()["logps/chosen"]  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return after_load, times, first, mapped_weights_mb(path)


def run_trl(reference, path, steps, batch_size):
    """The same for TRL's DPOTrainer + PEFT; the step times come from a callback around each step."""
    import datasets
    import peft
    import torch
    import transformers
    import trl

    from minicustom.data import read_jsonl

    records = [r for _, r in read_jsonl(DATA)][:batch_size]
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ref_model = (transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
                 if reference == "copy" else None)
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")

    class Timer(transformers.TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    timer = Timer()
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as out:
        args = trl.DPOConfig(output_dir=out, per_device_train_batch_size=batch_size, max_steps=1 + steps,
                             learning_rate=LR, lr_scheduler_type="constant", optim="adamw_torch", max_grad_norm=1.0,
                             max_length=MAX_LENGTH, gradient_checkpointing=False, bf16=False, fp16=False,
                             use_cpu=True, precompute_ref_log_probs=False, report_to=[], logging_steps=1,
                             save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0)
        trainer = trl.DPOTrainer(model=model, ref_model=ref_model, args=args,
                                 train_dataset=datasets.Dataset.from_list(records), processing_class=tok,
                                 peft_config=lora, callbacks=[timer])
        if reference == "base":  # the reference is the PEFT model with every adapter disabled
            assert trainer.ref_model is None and peft.PeftModel in type(trainer.model).__mro__
            assert "ref" not in trainer.model.peft_config, "TRL added a 'ref' adapter"
        else:
            assert trainer.ref_model is not None
        after_load = rss_mb()
        trainer.train()
        mapped = mapped_weights_mb(path)
    assert len(timer.times) == 1 + steps, timer.times
    first = next(h["logps/chosen"] for h in trainer.state.log_history if "logps/chosen" in h)
    return after_load, timer.times[1:], first, mapped


def worker(library, reference, path, steps, threads, batch_size):
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    run = run_minicustom if library == "minicustom" else run_trl
    after_load, times, first, (weights_rss, weights_pss) = run(reference, path, steps, batch_size)
    peak = peak_mb()
    print(json.dumps({"after_load_mb": after_load, "peak_mb": peak, "train_mb": peak - after_load,
                      "weights_rss_mb": weights_rss, "weights_pss_mb": weights_pss,
                      "median_s": statistics.median(times), "first_logps_chosen": first}))


def launch(library, reference, path, args):
    cmd = [sys.executable, __file__, "--worker", library, reference, "--model", path, "--steps", str(args.steps),
           "--threads", str(args.threads), "--batch-size", str(args.batch_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:  # reported in the table, never replaced by numbers
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return {"error": lines[-1] if lines else f"exit status {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summary(runs):
    """Max of the memory figures, median of the step times over the rounds; None if any run failed."""
    if any("error" in r for r in runs):
        return None
    out = {k: max(r[k] for r in runs) for k in ("after_load_mb", "peak_mb", "train_mb", "weights_rss_mb",
                                                 "weights_pss_mb")}
    # the peak with the checkpoint's shared file pages counted once (their PSS instead of their RSS): they are
    # all mapped by the end of the first step, before the peak, so the peak holds them
    out["peak_shared_once_mb"] = max(r["peak_mb"] - r["weights_rss_mb"] + r["weights_pss_mb"] for r in runs)
    return {**out, "median_s": statistics.median(r["median_s"] for r in runs),
            "first_logps_chosen": runs[0]["first_logps_chosen"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder (default: the demo model)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8, help="preference pairs per step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from minicustom.gguf import fetch_demo_model

    path = args.model or str(fetch_demo_model())
    if args.worker:
        return worker(*args.worker, path, args.steps, args.threads, args.batch_size)

    import peft
    import transformers
    import trl

    from minicustom.precision import describe_cpu

    print(f"# {path}\n# {describe_cpu(args.threads)}, transformers {transformers.__version__}, peft "
          f"{peft.__version__}, trl "
          f"{trl.__version__}, fp32, LoRA r=8 on 7 projections, {args.batch_size} pairs per step, "
          f"{args.rounds} round(s) x {args.steps} steps after a warm-up step\n")
    runs = {(ref, lib): [] for ref in REFERENCES for lib in LIBRARIES}
    for _ in range(args.rounds):
        for key in runs:
            runs[key].append(launch(key[1], key[0], path, args))
    results = {key: summary(r) for key, r in runs.items()}

    print("| reference | library | after load (MB) | peak RSS (MB) | train mem (MB) | weights' file pages: RSS / "
          "PSS (MB) | peak, shared pages once (MB) | step (s) | chosen log-prob |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (ref, lib), res in results.items():
        if res is None:
            error = next(r["error"] for r in runs[ref, lib] if "error" in r)
            print(f"| {REFERENCES[ref]} | {LIBRARIES[lib]} | failed: {error} |||||||")
            continue
        print(f"| {REFERENCES[ref]} | {LIBRARIES[lib]} | {res['after_load_mb']:,.0f} | {res['peak_mb']:,.0f} | "
              f"{res['train_mb']:,.0f} | {res['weights_rss_mb']:,.0f} / {res['weights_pss_mb']:,.0f} | "
              f"{res['peak_shared_once_mb']:,.0f} | {res['median_s']:.2f} | {res['first_logps_chosen']:.4f} |")
    print()
    for lib, name in LIBRARIES.items():
        base, copy = results["base", lib], results["copy", lib]
        if base and copy:
            print(f"{name}: separate copy / adapters disabled, peak RSS {copy['peak_mb'] / base['peak_mb']:.2f}x "
                  f"({copy['peak_mb'] - base['peak_mb']:+,.0f} MB; {copy['after_load_mb'] - base['after_load_mb']:+,.0f}"
                  f" MB after load), shared pages once {copy['peak_shared_once_mb'] / base['peak_shared_once_mb']:.2f}x "
                  f"({copy['peak_shared_once_mb'] - base['peak_shared_once_mb']:+,.0f} MB)")
    for ref, name in REFERENCES.items():
        ours, theirs = results[ref, "minicustom"], results[ref, "trl"]
        if ours and theirs:
            # the ratio of each round's neighbouring runs, then the median: robust to the machine's drift
            speed = statistics.median(o["median_s"] / t["median_s"] for o, t in zip(runs[ref, "minicustom"],
                                                                                  runs[ref, "trl"]))
            print(f"{name}: minicustom / TRL, peak RSS {ours['peak_mb'] / theirs['peak_mb']:.2f}x, train mem "
                  f"{ours['train_mb'] / theirs['train_mb']:.2f}x, step time {speed:.2f}x")
            a, b = ours["first_logps_chosen"], theirs["first_logps_chosen"]
            if abs(a - b) > 1e-3 * abs(b):
                print(f"  WARNING: the libraries disagree on the chosen log-prob at the first step ({a:.5f} vs "
                      f"{b:.5f}): they did not train on the same tokens")


if __name__ == "__main__":
    main()
