"""A prompt library: named prompt variants for a task, scored on its validation split, with their history.

The seeds' first rule is to experiment with prompts before training anything, and to keep what was learned.
A library is a JSONL file, one variant a line:

    {"name": "similar-4", "system": "Classify the review: positive, negative or neutral.", "shots": 4,
     "strategy": "similar", "instruction": "Review: {question}"}

Fields (every one but name optional):
    name              unique, non-empty
    system            the system prompt; null or absent: each record's own
    instruction       the user turn, a template holding {question}; absent: the question alone
    shots             k examples drawn from the train split for each question (0: zero-shot)
    strategy          how they are drawn: "similar" (TF-IDF nearest, prompting.select_shots) or "random"
    answer_format     how to answer, added on its own line after the question ("Answer with one word.")
    demos             fixed examples instead of drawn ones: [{"question": ..., "answer": ...}, ...]
    chain_of_thought  worked rationales in the shots and "Let's think step by step." after the question
    self_consistency  n > 1: the majority answer of n chains sampled at temperature 0.7 (0 or 1: greedy)
    notes             free text
An unknown field, a wrong type or a template without {question} is an error naming the file, line and field.

`evaluate_library` scores every variant on the validation split (shots from the train split; the test split
is not read) with the same evaluator as `compare`: accuracy, and beside it the answers' relevance (token F1,
ROUGE-L), response time, for label tasks the log-likelihood accuracy, and if asked a judge model's rating.
Each variant's result is appended, as soon as it is known, to the history file beside the library
(LIBRARY.history.jsonl: the variant as scored, model, task, split, date and the metrics); the library itself
is never written. `best_variant` ranks the variants by their history ("learning from past performance"),
and prompt search starts from that best entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .data import DataError, read_jsonl
from .evaluate import EvalResult, evaluate_task
from .judge import judge_answers
from .prompting import Shot
from .tasks import TaskFolder

STRATEGIES = ("similar", "random")
SELF_CONSISTENCY_TEMPERATURE = 0.7


@dataclass
class Variant:
    name: str
    system: str | None = None
    instruction: str | None = None
    answer_format: str | None = None
    shots: int = 0
    strategy: str = "similar"
    demos: list[dict] | None = None
    chain_of_thought: bool = False
    self_consistency: int = 0
    notes: str = ""

    def to_json(self) -> dict:
        """The fields that differ from the defaults (a library line)."""
        default = Variant(self.name)
        return {k: v for k, v in asdict(self).items() if k == "name" or v != getattr(default, k)}


_TYPES = {"name": (str,), "system": (str, type(None)), "instruction": (str, type(None)),
          "answer_format": (str, type(None)), "shots": (int,),
          "strategy": (str,), "demos": (list, type(None)), "chain_of_thought": (bool,), "self_consistency": (int,),
          "notes": (str,)}


def parse_variant(record, where: str) -> Variant:
    """One library line -> Variant; every problem is a DataError naming `where` (file:line) and the field."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a variant is a JSON object, found {type(record).__name__}")
    if unknown := sorted(set(record) - set(_TYPES)):
        raise DataError(f"{where}: unknown field {unknown[0]!r}; a variant has {', '.join(_TYPES)}")
    if not isinstance(record.get("name"), str) or not record["name"].strip():
        raise DataError(f"{where}: 'name' must be a non-empty string, got {record.get('name')!r}")
    for key, value in record.items():
        if not isinstance(value, _TYPES[key]) or (isinstance(value, bool) and bool not in _TYPES[key]):
            kinds = " or ".join("null" if t is type(None) else t.__name__ for t in _TYPES[key])
            raise DataError(f"{where}: {key!r} must be {kinds}, got {value!r}")
    v = Variant(**record)
    if v.instruction is not None and "{question}" not in v.instruction:
        raise DataError(f"{where}: 'instruction' must hold {{question}} where the question goes, got {v.instruction!r}")
    if v.shots < 0 or v.self_consistency < 0:
        raise DataError(f"{where}: 'shots' and 'self_consistency' must be >= 0, got {v.shots} and {v.self_consistency}")
    if v.strategy not in STRATEGIES:
        raise DataError(f"{where}: 'strategy' must be one of {', '.join(STRATEGIES)}, got {v.strategy!r}")
    if v.demos is not None:
        if v.shots:
            raise DataError(f"{where}: give 'shots' (drawn from the train split) or 'demos' (fixed), not both")
        for k, d in enumerate(v.demos):
            if not (isinstance(d, dict) and set(d) >= {"question", "answer"} and set(d) <= {"question", "answer", "rationale"}
                    and all(isinstance(x, str) for x in d.values())):
                raise DataError(f"{where}: demos[{k}] must be {{\"question\": str, \"answer\": str}} (and an optional "
                                f"\"rationale\"), got {d!r}")
    return v


def read_library(path) -> list[Variant]:
    """The variants of a library file, checked; names must be unique."""
    path = Path(path)
    variants, seen = [], {}
    for where, record in read_jsonl(path):
        v = parse_variant(record, where)
        if v.name in seen:
            raise DataError(f"{where}: variant name {v.name!r} is already used at {seen[v.name]}")
        seen[v.name] = where
        variants.append(v)
    return variants  # read_jsonl refuses a file with no line


def history_path(library) -> Path:
    library = Path(library)
    return library.with_name(library.name + ".history.jsonl")


def read_log(path) -> list[dict]:
    """The records of an append-only JSONL log (a library's history, a search's trace); [] if there is none.
    A last line a crash cut short (no newline at its end) is cut from the file, so the next append starts on
    a line of its own."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
    return [r for _, r in read_jsonl(path)] if path.stat().st_size else []


def append_log(path, records: list[dict]) -> None:
    """Append records, one JSON line each, in one write, flushed and synced to disk."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def records_digest(*splits) -> str:
    """A short hash of task records: which data a result was measured on."""
    return hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest()[:16]


def model_digest(model, sample: int = 4096) -> str:
    """A short hash of a model's config and weights (an evenly strided sample of each tensor): which model a
    result was measured with, so that another context length or other weights (a fine-tuned copy) count as
    another model."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        picked = flat[:: max(1, flat.numel() // sample)].float().cpu()
        h.update(name.encode() + picked.numpy().tobytes())
    return h.hexdigest()[:16]


def read_history(library) -> list[dict]:
    return read_log(history_path(library))


def _same(record: dict, variant: Variant, task: str, model: str | None) -> bool:
    """A history line of this variant as it is now (an edited variant starts afresh), on `task`, by `model`."""
    return record.get("name") == variant.name and record.get("variant") == variant.to_json() and \
        record.get("task") == task and (model is None or record.get("model") == model)


def best_variant(library, task: str, model: str | None = None) -> Variant | None:
    """The variant of the library with the highest mean validation accuracy in its history on `task` (and
    `model` if given); ties go to the one listed first. None when nothing has been scored yet."""
    variants = {v.name: v for v in read_library(library)}
    scores: dict[str, list[float]] = {}
    for r in read_history(library):
        if r.get("name") in variants and _same(r, variants[r["name"]], task, model):
            scores.setdefault(r["name"], []).append(r["accuracy"])
    if not scores:
        return None
    order = list(variants)
    name = max(scores, key=lambda n: (sum(scores[n]) / len(scores[n]), -order.index(n)))
    return variants[name]


def evaluate_variant(model, tokenizer, variant: Variant, task: TaskFolder, records, *, limit: int | None = None,
                     batch_size: int = 8, seed: int = 0, progress: bool = False,
                     max_prompt_tokens: int | None = None, pool=None, score_choices: bool = True) -> EvalResult:
    """The variant's prompts for `records` (shots drawn from `pool`, default task.train), answered and scored
    as `compare` does; max_prompt_tokens drops shots (the least relevant first) from a prompt that would be
    longer; score_choices adds log-likelihood accuracy on a label task."""
    records = records[:limit] if limit else records
    if variant.demos:
        pool = [Shot(d["question"], d["answer"], rationale=d.get("rationale")) for d in variant.demos]
    elif pool is None:
        pool = task.train
    k = len(variant.demos) if variant.demos else variant.shots
    instruction = variant.instruction
    if variant.answer_format:
        instruction = (instruction or "{question}") + "\n" + variant.answer_format
    return evaluate_task(model, tokenizer, records, shots_pool=pool if k else None, k=k,
                         strategy="fixed" if variant.demos else variant.strategy,
                         chain_of_thought=variant.chain_of_thought, system=variant.system,
                         instruction=instruction, self_consistency=variant.self_consistency,
                         temperature=SELF_CONSISTENCY_TEMPERATURE, scorer=task.scorer, labels=task.labels,
                         max_new_tokens=max(task.max_new_tokens, 96 if variant.chain_of_thought else 0),
                         batch_size=batch_size, seed=seed, progress=progress, max_prompt_tokens=max_prompt_tokens,
                         score_choices=score_choices and task.labels is not None and not variant.chain_of_thought)


@dataclass
class Scored:
    variant: Variant
    result: EvalResult
    seconds: float
    history: list[float] = field(default_factory=list)  # earlier validation accuracies of this variant
    judge: float | None = None  # the judge model's mean rating (1-10) of the answers, if one was asked

    def row(self) -> dict:
        r, m = self.result, self.result.metrics
        return {"name": self.variant.name, "accuracy": r.accuracy, "n": r.n,
                "loglik_accuracy": m.get("loglik_acc"), "token_f1": m.get("token_f1"), "rouge_l": m.get("rouge_l"),
                "first_token_p50_s": m.get("first_token_p50_s"), "latency_p50_s": m.get("latency_p50_s"),
                "latency_p95_s": m.get("latency_p95_s"), "tokens_per_s": m.get("tokens_per_s"), "judge": self.judge,
                "prompt_tokens": sum(x["prompt_tokens"] for x in r.records) / max(r.n, 1),
                "seconds": round(self.seconds, 1), "past_runs": len(self.history),
                "past_best": max(self.history) if self.history else None}


def evaluate_library(model, tokenizer, library, task: TaskFolder, *, model_name: str, limit: int | None = None,
                     seed: int = 0, judge=None, report=print) -> list[Scored]:
    """Score every variant on the validation split, append the results to the history, and return them
    ranked (accuracy, then fewer prompt tokens). judge: a (model, tokenizer) pair that also rates every
    answer against its reference (judge.judge_answers)."""
    variants = read_library(library)
    if not task.validation:
        raise DataError(f"{task.folder}: the validation split is empty")
    past = read_history(library)
    scored = []
    for i, v in enumerate(variants):
        report(f"[{i + 1}/{len(variants)}] {v.name} ...")
        t0 = time.perf_counter()
        result = evaluate_variant(model, tokenizer, v, task, task.validation, limit=limit, seed=seed)
        history = [r["accuracy"] for r in past if _same(r, v, task.name, model_name) and r.get("n") == result.n]
        rating = None
        if judge is not None:  # a self-consistency answer is its majority prediction, not the chains
            answers = [r["output"] if isinstance(r["output"], str) else r["prediction"] for r in result.records]
            rating = judge_answers(*judge, [r["question"] for r in result.records], answers,
                                   [r["reference"] for r in result.records]).mean
        s = Scored(v, result, time.perf_counter() - t0, history, rating)
        scored.append(s)
        append_log(history_path(library), [{  # at once: a crash later keeps this variant's result
            "name": v.name, "variant": v.to_json(), "model": model_name, "task": task.name, "split": "validation",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seed": seed,
            **{k: x for k, x in s.row().items() if k not in ("name", "past_runs", "past_best")}}])
        report(f"    validation accuracy {result.accuracy:.3f}" + (f", judge {rating:.1f}" if rating else ""))
    return sorted(scored, key=lambda s: (-s.result.accuracy, s.row()["prompt_tokens"]))


def _num(value, form: str) -> str:
    return "–" if value is None else format(value, form)


def ranking_markdown(scored: list[Scored], task: str) -> str:
    lines = [f"Prompt variants on `{task}`, validation split ({scored[0].result.n if scored else 0} questions), "
             "best first.", "",
             "| rank | variant | accuracy | log-lik. accuracy | token F1 | ROUGE-L | judge (1-10) | first token (s) "
             "| p50 / p95 latency (s) | prompt tokens | earlier runs (best) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, s in enumerate(scored, 1):
        r = s.row()
        lines.append(f"| {k} | {r['name']} | {r['accuracy']:.3f} | {_num(r['loglik_accuracy'], '.3f')} "
                     f"| {_num(r['token_f1'], '.3f')} | {_num(r['rouge_l'], '.3f')} | {_num(r['judge'], '.1f')} "
                     f"| {_num(r['first_token_p50_s'], '.2f')} | {_num(r['latency_p50_s'], '.2f')} / "
                     f"{_num(r['latency_p95_s'], '.2f')} | {r['prompt_tokens']:.0f} "
                     f"| {r['past_runs']} ({_num(r['past_best'], '.3f')}) |")
    return "\n".join(lines) + "\n"
