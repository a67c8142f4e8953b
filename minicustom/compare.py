"""The ladder side by side: every customization method on one model and one task, accuracy against cost.

    minicustom compare --task examples/data/tasks/sentiment --out runs/compare [--methods lora,few-shot]

Each method gets the same budget: the first `examples` training records, seen for `epochs` epochs by the
trained methods and offered as the example pool of few-shot prompting; DPO (after a LoRA SFT on that
budget) also gets the preference pairs of those records. Every method answers the same test split,
greedily, scored by the task's scorer (exact match, label or number). Each method runs in a fresh
process, so its peak memory (the process's maximum resident set, the model included) is its own; its
result is written to OUT/<method>/result.json as soon as it is known, and a later run with the same
OUT reuses it (a crash loses at most the method under way). The table (comparison.md, .json) gives test
accuracy, trainable parameters, training time, peak memory, training tokens and prompt tokens per
test question, the answers' relevance (token F1, ROUGE-L) and response time (p50/p95 latency, tokens/s),
and on a label task the accuracy of the most likely label by log-likelihood; comparison.png plots accuracy
against trainable parameters and against training time (with matplotlib, `pip install 'minicustom[plot]'`;
the same rows are in comparison.csv either way). A method whose worker was killed after its training saved
resumes from that checkpoint on the next run.

The methods, their options and learning rates come from the registry (methods/registry.py), with r and
alpha of CompareConfig for the LoRA family: each method's own lr, the usual order of magnitude for it (prompt
learning and IA3 want far larger steps than LoRA, full fine-tuning far smaller), not tuned on the test split.
Left out: tuning each method's hyperparameters on the validation split, repeated seeds and error bars.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .checkpoint import load_model, save_model
from .data import PreferencePair, make_example, make_pair, pad_id_for
from .files import atomic_write
from .methods import adapter_configs, count_parameters
from .methods.registry import ORIGINS, REGISTRY, apply_method, get_method, save_adapter
from .plot import write_compare_chart, write_compare_csv
from .prompt_library import Variant, evaluate_variant
from .prompting import default_stop_ids
from .tasks import TaskFolder, load_task
from .tokenizer import load_tokenizer
from .train import DPOConfig, TrainConfig, train, train_dpo

PROMPTING = ("zero-shot", "few-shot", "cot")  # the prompt-engineering rungs: nothing trained
ALIGNMENT = ("dpo",)  # LoRA SFT on the budget, then DPO on the budget's preference pairs
# DPO after compare's short LoRA SFT: a few dozen steps, so a larger step than DPOConfig's 5e-5 (for long runs).
DPO_LR = 2e-4


def all_methods() -> list[str]:
    """Every method compare can run: the prompting rungs, every registered method, and DPO."""
    return [*PROMPTING, *REGISTRY, *ALIGNMENT]


def default_methods() -> list[str]:
    """What `compare` runs when not told: every rung, with one method of each registered family (rsLoRA,
    PiSSA, ... are variants: ask for them by name)."""
    return [*PROMPTING, *(m.name for m in REGISTRY.values() if m.variant_of is None), *ALIGNMENT]


class CompareError(RuntimeError):
    """A method's worker process failed; the message names its log file."""


@dataclass
class CompareConfig:
    examples: int = 64  # training records per method (and the few-shot pool)
    epochs: float = 2.0
    batch_size: int = 4
    shots: int = 4  # few-shot examples per question (fewer when the context budget is short)
    test_limit: int | None = None  # the first N test records (None: all)
    max_length: int = 512
    seed: int = 0
    r: int = 8
    alpha: float = 16.0
    num_virtual_tokens: int = 20


# -- one method, in its own process ---------------------------------------------------------------------

def peak_mb() -> float:
    """This process's peak resident memory so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _saved(run: Path) -> bool:
    """A training folder whose run saved a checkpoint (a worker killed after it): resume, not start again."""
    return (run / "checkpoints" / "latest").is_file()


def _train_tokens(out: Path) -> int:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return sum(r.get("tokens", 0) for r in rows)


def prompt_variant(method: str, task: TaskFolder, config: CompareConfig) -> Variant:
    """How a method's answers are prompted: the prompting rungs as library variants, every trained method
    zero-shot with the records' own system prompt."""
    if method == "few-shot":
        return Variant(method, shots=config.shots)
    if method == "cot":
        return Variant(method, chain_of_thought=True, shots=config.shots if task.chain_of_thought_data else 0)
    return Variant(method)


def save_artifact(model, out: Path, variant: Variant):
    """What a rung leaves to use: its adapter (OUT/adapter), its whole model (OUT/model, full fine-tuning), or
    for a prompting rung its prompt as a library line (OUT/prompt.json)."""
    if variant.name in PROMPTING:
        atomic_write(out / "prompt.json", lambda p: p.write_text(json.dumps(variant.to_json()) + "\n"))
    elif adapter_configs(model):
        save_adapter(model, out / "adapter")
    else:
        save_model(model, out / "model")


def run_method(method: str, model_path, task: TaskFolder, config: CompareConfig, out, splits=(),
               keep: bool = False) -> dict:
    """Train (or not) and evaluate one method; returns its row of the table: test accuracy and the other
    columns, and `<split>_accuracy` for each of `splits`. keep: save_artifact into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    model, tok = load_model(model_path), load_tokenizer(model_path)
    budget = task.train[:config.examples]
    test = task.test[:config.test_limit] if config.test_limit else task.test
    stop = default_stop_ids(model, tok)
    t0, tokens = time.perf_counter(), 0
    if method not in PROMPTING:
        examples = [make_example(r, tok, f"{task.folder}/train.jsonl:{i + 1}") for i, r in enumerate(budget)]
        sft = get_method("lora" if method == "dpo" else method)
        # r and alpha mean LoRA's rank and scale in the LoRA family only (OFT's r counts blocks, VeRA's rank is
        # 256 by default): every other method keeps its registry defaults, which are PEFT's.
        shared = {"num_virtual_tokens": config.num_virtual_tokens,
                  **({"r": config.r, "alpha": config.alpha} if sft.peft_type == "LORA" else {})}
        apply_method(model, sft.name, tokenizer=tok, **{o.name: shared[o.name] for o in sft.options if o.name in shared})
        steps = max(1, math.ceil(config.epochs * len(examples) / config.batch_size))
        train_config = TrainConfig(lr=sft.lr, max_steps=steps, batch_size=config.batch_size, packing=False,
                                   max_length=config.max_length, seed=config.seed, exact_match=0, log_every=10,
                                   save_every=0)  # never resumed: one checkpoint at the end, not a tenth each
        train(model, examples, train_config, out / "sft", pad_id=pad_id_for(tok), stop_ids=stop,
              resume=_saved(out / "sft"))
        tokens += _train_tokens(out / "sft")
        if method == "dpo":
            pairs: list[PreferencePair] = [make_pair(r, tok, f"{task.folder}/prefs_train.jsonl:{i + 1}")
                                           for i, r in enumerate(task.prefs[:config.examples])]
            if not pairs:
                raise ValueError(f"{task.folder}: method 'dpo' needs prefs_train.jsonl")
            dpo_steps = max(1, math.ceil(config.epochs * len(pairs) / config.batch_size))
            train_dpo(model, pairs, DPOConfig(lr=DPO_LR, max_steps=dpo_steps, batch_size=config.batch_size,
                                              seed=config.seed, log_every=10, save_every=0), out / "dpo",
                      reference="snapshot", pad_id=pad_id_for(tok), resume=_saved(out / "dpo"))
            tokens += _train_tokens(out / "dpo")
    train_seconds = time.perf_counter() - t0
    trainable = count_parameters(model)[0] if method not in PROMPTING else 0
    t1 = time.perf_counter()
    variant = prompt_variant(method, task, config)
    result = evaluate_variant(model, tok, variant, task, test, pool=budget, seed=config.seed)
    m = result.metrics
    row = {"method": method, "accuracy": result.accuracy, "n_test": result.n, "trainable_params": trainable,
           "train_seconds": round(train_seconds, 1), "eval_seconds": round(time.perf_counter() - t1, 1),
           "peak_mb": round(peak_mb()), "train_tokens": tokens,
           "prompt_tokens": round(sum(r["prompt_tokens"] for r in result.records) / max(result.n, 1), 1),
           "latency_p50_s": round(m["latency_p50_s"], 3), "latency_p95_s": round(m["latency_p95_s"], 3),
           "tokens_per_s": round(m["tokens_per_s"], 1), "token_f1": round(m["token_f1"], 4),
           "rouge_l": round(m["rouge_l"], 4), "loglik_accuracy": m.get("loglik_acc")}
    for split in splits:  # accuracy on other splits (the ladder decides on validation)
        row[f"{split}_accuracy"] = evaluate_variant(model, tok, variant, task, getattr(task, split), pool=budget,
                                                    seed=config.seed, score_choices=False).accuracy
    if keep:
        save_artifact(model, out, variant)
    (out / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in result.records))
    return row


# -- the harness ------------------------------------------------------------------------------------------

def compare(model_path, task_folder, out, methods=None, config: CompareConfig | None = None,
            report=print) -> list[dict]:
    """Run each method in a fresh process (results kept in OUT/<method>/result.json and reused), then write
    comparison.json, comparison.md and comparison.png; returns the rows."""

    config = config or CompareConfig()
    methods = default_methods() if methods is None else list(methods)
    if unknown := [m for m in methods if m not in all_methods()]:
        raise ValueError(f"unknown method {unknown}; choose from {', '.join(all_methods())}")
    # A method registered from outside the package: its worker imports the module that registered it.
    imports = sorted({ORIGINS[m] for m in methods if m in ORIGINS})
    if "__main__" in imports:
        raise ValueError("a method registered by the main script cannot reach compare's worker processes: "
                         "register it in a module and import that")
    task = load_task(task_folder)  # errors in the task come now, not from a worker
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, method in enumerate(methods):
        path = out / method / "result.json"
        if not path.is_file():
            report(f"[{i + 1}/{len(methods)}] {method} ...")
            cmd = [sys.executable, "-m", "minicustom.compare", "--worker", method, "--model", str(model_path),
                   "--task", str(task.folder), "--out", str(out / method), "--config", json.dumps(asdict(config)),
                   *(f"--import={name}" for name in imports)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                (out / method).mkdir(parents=True, exist_ok=True)
                (out / method / "error.txt").write_text(proc.stderr)
                raise CompareError(f"method {method} failed (exit {proc.returncode}); its output is in "
                                   f"{out / method / 'error.txt'}:\n{proc.stderr[-2000:]}")
        else:
            report(f"[{i + 1}/{len(methods)}] {method}: reusing {path}")
        rows.append(json.loads(path.read_text()))
        report(f"    accuracy {rows[-1]['accuracy']:.3f}, {rows[-1]['trainable_params']:,} trainable, "
               f"{rows[-1]['train_seconds']:.0f} s training, peak {rows[-1]['peak_mb']:,} MB")
    meta = {"model": str(model_path), "task": task.name, "config": asdict(config), "rows": rows}
    atomic_write(out / "comparison.json", lambda p: p.write_text(json.dumps(meta, indent=1) + "\n"))
    atomic_write(out / "comparison.md", lambda p: p.write_text(markdown(rows, task.name, len(task.test))))
    write_compare_csv(out / "comparison.csv", rows)
    write_compare_chart(out / "comparison.png", rows, task.name)
    return rows


def _cell(row: dict, key: str, form: str) -> str:
    """A number of the row, or a dash (a result.json written before the column existed, or no labels)."""
    return "–" if row.get(key) is None else format(row[key], form)


def markdown(rows: list[dict], task: str, n_test: int) -> str:
    """The table: accuracy and cost, then relevance (token F1 and ROUGE-L of the whole answer against the
    reference) and response time (per answer, generated in batches of 8), and for a label task the accuracy
    of the most likely label by log-likelihood."""
    lines = [f"Task `{task}`, test accuracy on {rows[0]['n_test'] if rows else n_test} questions.", "",
             "| method | test accuracy | trainable params | training time (s) | peak memory (MB) | training tokens "
             "| prompt tokens / question | token F1 | ROUGE-L | p50 / p95 latency (s) | tokens/s | log-lik. accuracy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['accuracy']:.3f} | {r['trainable_params']:,} | {r['train_seconds']:.0f} "
                     f"| {r['peak_mb']:,} | {r['train_tokens']:,} | {r['prompt_tokens']:.0f} "
                     f"| {_cell(r, 'token_f1', '.3f')} | {_cell(r, 'rouge_l', '.3f')} "
                     f"| {_cell(r, 'latency_p50_s', '.2f')} / {_cell(r, 'latency_p95_s', '.2f')} "
                     f"| {_cell(r, 'tokens_per_s', '.0f')} | {_cell(r, 'loglik_accuracy', '.3f')} |")
    return "\n".join(lines) + "\n"


def _worker(argv=None):
    p = argparse.ArgumentParser(prog="python -m minicustom.compare")
    p.add_argument("--worker", required=True)
    p.add_argument("--import", dest="imports", action="append", default=[])
    p.add_argument("--model", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--config", required=True)
    args = p.parse_args(argv)

    for name in args.imports:  # modules that register methods defined outside the package
        importlib.import_module(name)
    if args.worker not in all_methods():
        p.error(f"unknown method {args.worker!r}")

    row = run_method(args.worker, args.model, load_task(args.task), CompareConfig(**json.loads(args.config)),
                     args.out)
    atomic_write(Path(args.out) / "result.json", lambda f: f.write_text(json.dumps(row, indent=1) + "\n"))


if __name__ == "__main__":
    _worker()
