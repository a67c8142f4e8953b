"""`minicustom ladder`: the seeds' rule as a command. Experiment with prompts first, and train only when the
task demands it.

    minicustom ladder --task examples/data/tasks/sentiment --target 0.9 --out runs/ladder [--budget-minutes 30]

The rungs, cheapest first: zero-shot, few-shot (the most similar training examples as shots), chain of
thought, prompt search (prompt_search.py, from the best prompt so far), prompt tuning, LoRA, QLoRA, full
fine-tuning. Each rung runs in its own process (its peak memory is its own, as in `compare`, whose budget
and settings it shares: the first `examples` training records, `epochs` epochs) and is judged on the
validation split; the climb stops at the first rung whose validation accuracy reaches the target. Test
accuracy is reported for every rung tried but never decides anything.

Each rung's result and artifact (a prompt as a library line, or an adapter / model folder) stay in
OUT/<rung>/, so a second call with a higher target reuses the rungs already climbed and continues; a call
with other settings on the same OUT is refused. `--budget-minutes` stops the climb before a rung starts
once the rungs so far (reused ones included) have taken that long.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .checkpoint import load_model
from .compare import CompareConfig, CompareError, peak_mb, run_method
from .data import DataError
from .files import atomic_write, read_json
from .prompt_library import Variant, evaluate_variant
from .prompt_search import SearchConfig, search
from .tasks import load_task
from .tokenizer import load_tokenizer

RUNGS = ("zero-shot", "few-shot", "cot", "prompt-search", "prompt", "lora", "qlora", "full")
PROMPT_RUNGS = ("zero-shot", "few-shot", "cot")
ROW_KEYS = ("rung", "validation_accuracy", "accuracy", "trainable_params", "seconds", "peak_mb", "artifact")


class LadderError(CompareError):
    """A rung's worker failed, or OUT holds something that is not this ladder's."""


@dataclass
class LadderResult:
    rows: list[dict]
    reached: str | None  # the first rung that reached the target, or None
    stopped: str  # why the climb ended: "target reached", "budget spent", "top of the ladder"
    artifacts: dict = field(default_factory=dict)


def check_target(target: float, budget_minutes: float | None):
    if not (isinstance(target, (int, float)) and 0 < target <= 1):
        raise ValueError(f"--target is a validation accuracy in (0, 1], got {target}")
    if budget_minutes is not None and not budget_minutes > 0:
        raise ValueError(f"--budget-minutes must be > 0, got {budget_minutes}")


def ladder(model_path, task_folder, out, target: float, *, budget_minutes: float | None = None,
           config: CompareConfig | None = None, search_config: SearchConfig | None = None, rungs=RUNGS,
           report=print) -> LadderResult:
    """Climb `rungs` until one reaches `target` on the validation split; see the module docstring."""
    check_target(target, budget_minutes)
    if unknown := [r for r in rungs if r not in RUNGS]:
        raise ValueError(f"unknown rung {unknown}; the rungs are {', '.join(RUNGS)}")
    config, search_config = config or CompareConfig(), search_config or SearchConfig(max_calls=2000)
    search_config.check()
    task = load_task(task_folder, splits=("train", "validation", "test", "prefs_train"))
    out = Path(out)
    settings = {"model": str(model_path), "task": str(task.folder), "config": asdict(config),
                "search": asdict(search_config)}
    if (out / "settings.json").is_file():
        if read_json(out / "settings.json", DataError) != settings:
            raise LadderError(f"{out}: a ladder with other settings (model, task, budget or search) was climbed "
                              "here; use another --out to climb with these")
    elif out.is_dir() and any(out.iterdir()):
        raise LadderError(f"{out} already holds files that are not a ladder's (no settings.json): use a new or "
                          "empty --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "settings.json", lambda p: p.write_text(json.dumps(settings, indent=1) + "\n"))
    rows, reached, stopped, spent = [], None, "top of the ladder", 0.0
    for i, rung in enumerate(rungs):
        path = out / rung / "result.json"
        if path.is_file():
            report(f"[{i + 1}/{len(rungs)}] {rung}: reusing {path}")
        elif budget_minutes is not None and spent >= budget_minutes * 60:
            stopped = "budget spent"
            report(f"budget of {budget_minutes} minutes spent ({spent / 60:.1f} min): stopping before {rung}")
            break
        else:
            report(f"[{i + 1}/{len(rungs)}] {rung} ...")
            _run_worker(rung, model_path, task.folder, out, config, search_config)
        row = read_json(path, DataError)
        if not (isinstance(row, dict) and all(k in row for k in ROW_KEYS)):
            raise LadderError(f"{path}: not a ladder rung's result (it needs {', '.join(ROW_KEYS)})")
        rows.append(row)
        spent += row["seconds"]
        report(f"    validation {row['validation_accuracy']:.3f}, test {row['accuracy']:.3f}, "
               f"{row['seconds']:.0f} s, peak {row['peak_mb']:,} MB")
        if row["validation_accuracy"] >= target:
            reached, stopped = rung, "target reached"
            break
    result = LadderResult(rows, reached, stopped, {r["rung"]: r["artifact"] for r in rows})
    atomic_write(out / "ladder.json", lambda p: p.write_text(json.dumps(
        {"settings": settings, "target": target, "reached": reached, "stopped": stopped, "rows": rows},
        indent=1) + "\n"))
    atomic_write(out / "ladder.md", lambda p: p.write_text(markdown(result, task.name, target)))
    return result


def markdown(result: LadderResult, task: str, target: float) -> str:
    end = f"reached by **{result.reached}**" if result.reached else f"not reached ({result.stopped})"
    lines = [f"Ladder on `{task}`, target validation accuracy {target:g}: {end}.", "",
             "| rung | validation accuracy | test accuracy | trainable params | time (s) | peak memory (MB) | artifact |",
             "|---|---|---|---|---|---|---|"]
    for r in result.rows:
        lines.append(f"| {r['rung']} | {r['validation_accuracy']:.3f} | {r['accuracy']:.3f} | {r['trainable_params']:,} "
                     f"| {r['seconds']:.0f} | {r['peak_mb']:,} | {r['artifact']} |")
    return "\n".join(lines) + "\n"


def _run_worker(rung: str, model_path, task_folder, out: Path, config: CompareConfig, search_config: SearchConfig):
    cmd = [sys.executable, "-m", "minicustom.ladder", "--worker", rung, "--model", str(model_path), "--task",
           str(task_folder), "--out", str(out), "--config", json.dumps(asdict(config)),
           "--search", json.dumps(asdict(search_config))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        (out / rung).mkdir(parents=True, exist_ok=True)
        (out / rung / "error.txt").write_text(proc.stderr)
        raise LadderError(f"rung {rung} failed (exit {proc.returncode}); its output is in "
                           f"{out / rung / 'error.txt'}:\n{proc.stderr[-2000:]}")


def _best_prompt(out: Path) -> Variant:
    """The prompting rung with the best validation accuracy so far (the earlier among equals)."""
    rows = [json.loads((out / r / "result.json").read_text()) for r in PROMPT_RUNGS
            if (out / r / "result.json").is_file()]
    if not rows:
        return Variant("zero-shot")
    best = max(rows, key=lambda r: r["validation_accuracy"])
    return Variant(**json.loads((out / best["rung"] / "prompt.json").read_text()))


def run_rung(rung: str, model_path, task_folder, out: Path, config: CompareConfig, search_config: SearchConfig) -> dict:
    """One rung, in this process: its row (validation and test accuracy, cost, artifact)."""
    folder = out / rung
    t0 = time.perf_counter()
    if rung != "prompt-search":
        task = load_task(task_folder, splits=("train", "validation", "test", "prefs_train"))
        row = run_method(rung, model_path, task, config, folder, splits=("validation",), keep=True)
        artifact = {"prompt.json", "adapter", "model"} & {p.name for p in folder.iterdir()}
        return {**row, "rung": rung, "seconds": round(time.perf_counter() - t0, 1),
                "artifact": str(folder / sorted(artifact)[0])}
    model, tok = load_model(model_path), load_tokenizer(model_path)
    base = _best_prompt(out)
    searched = load_task(task_folder, splits=("train", "validation"))  # the search never reads test.jsonl
    searched.train = searched.train[:config.examples]  # the few-shot rungs' pool: one budget for every rung
    found = search(model, tok, searched, base, search_config, folder / "search", report=lambda _: None)
    test = load_task(task_folder, splits=("train", "test"))
    tests = test.test[:config.test_limit] if config.test_limit else test.test
    result = evaluate_variant(model, tok, found.best, test, tests, seed=config.seed, score_choices=False)
    atomic_write(folder / "prompt.json", lambda p: p.write_text(json.dumps(found.best.to_json()) + "\n"))
    return {"rung": rung, "method": rung, "validation_accuracy": found.accuracy, "accuracy": result.accuracy,
            "n_test": result.n, "trainable_params": 0, "train_seconds": round(found.minutes * 60, 1),
            "seconds": round(time.perf_counter() - t0, 1), "peak_mb": round(peak_mb()), "calls": found.calls,
            "artifact": str(folder / "prompt.json")}


def _worker(argv=None):
    p = argparse.ArgumentParser(prog="python -m minicustom.ladder")
    for flag in ("--worker", "--model", "--task", "--out", "--config", "--search"):
        p.add_argument(flag, required=True)
    args = p.parse_args(argv)
    out = Path(args.out)
    row = run_rung(args.worker, args.model, args.task, out, CompareConfig(**json.loads(args.config)),
                   SearchConfig(**json.loads(args.search)))
    atomic_write(out / args.worker / "result.json", lambda f: f.write_text(json.dumps(row, indent=1) + "\n"))


if __name__ == "__main__":
    _worker()
