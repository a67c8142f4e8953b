"""Automatic prompt search on a task's validation split: APE instructions and bootstrapped demonstrations.

- Instruction induction and refinement, APE (Zhou et al. 2023, "Large Language Models Are Human-Level
  Prompt Engineers", §3: forward generation, then iterative Monte Carlo search). The model reads a few
  input/output pairs of the train split and proposes instructions (sampled, APE's forward template); each
  becomes the variant's system prompt and is scored by validation accuracy; the `keep` best are resampled
  as paraphrases (APE's resampling template) in the next round; after `rounds` rounds the best is kept.
- Bootstrapped demonstrations, after DSPy (Khattab et al. 2024, "DSPy: Compiling Declarative Language Model
  Calls into Self-Improving Pipelines"): as its BootstrapFewShot, the candidates are train records the current
  best prompt answers correctly (each answered with shots drawn from the other records); unlike DSPy, the
  demonstration is the record's own reference answer (and rationale), not the model's output, and the set is
  chosen by greedy forward selection on validation accuracy (DSPy's BootstrapFewShotWithRandomSearch scores
  random subsets instead): walking the candidates in a seeded order, one is kept when adding it to those
  already kept raises validation accuracy, up to `max_demos`. The fixed set replaces the drawn shots.

Every candidate's score is validation accuracy (the task's scorer); ties keep the earlier candidate, so the
starting variant (the library's best) wins unless something beats it. The test split is never read: the
task is loaded with train and validation only. Two budgets bound the search: model calls (each answer
generated and each proposal is one call; a step that would pass it is not started) and tokens (prompt and
generated tokens of every call; no step starts once they are spent); `max_prompt_tokens` caps one prompt's
length (the least relevant shots are dropped to fit). When a budget stops it, the search keeps what it has;
a later run with a larger budget and the same OUT continues it.

Seeded and resumable: every step (a round's proposals, a candidate's score) is appended to OUT/trace.jsonl
when done (flushed to disk), with the calls, tokens and seconds it took; a second run with the same OUT, model
and data replays the recorded steps and continues, so an interrupted search ends where an uninterrupted one
would (a last line cut by a crash is dropped and redone). The result (OUT/best.json) is the
best variant, as a library line, with its validation accuracy, the calls and the minutes of the whole search.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from . import prompting
from .data import DataError
from .files import atomic_write
from .generate import generate
from .prompt_library import Variant, append_log, evaluate_variant, model_digest, read_log, records_digest
from .prompting import shots_from_records
from .tasks import TaskFolder

# APE's templates (Zhou et al. 2023, Figure 3 / Appendix), for a chat model's user turn.
PROPOSE = ("I gave a friend an instruction and {n} inputs. The friend read the instruction and wrote an output "
           "for every one of the inputs. Here are the input-output pairs:\n\n{pairs}\n\nWhat was the "
           "instruction? Write the instruction only.")
RESAMPLE = ("Generate a variation of the following instruction while keeping the semantic meaning.\n\n"
            "Input: {instruction}\n\nWrite the new instruction only.")
PROPOSAL_TEMPERATURE = 0.9
PROPOSAL_TOKENS = 48


@dataclass
class SearchConfig:
    method: str = "both"  # "ape", "bootstrap" or "both" (APE, then demonstrations on its best)
    rounds: int = 3  # APE rounds
    candidates: int = 6  # instructions proposed per round
    keep: int = 2  # the best instructions resampled in the next round
    pairs: int = 5  # input/output pairs shown to the proposer
    max_demos: int = 4  # bootstrap: demonstrations kept at most
    demo_candidates: int = 12  # bootstrap: train records tried
    max_calls: int | None = None  # budget of model calls (None: unbounded)
    max_tokens: int | None = None  # budget of prompt + generated tokens over the search (None: unbounded)
    max_prompt_tokens: int | None = None  # longest prompt a candidate may use (None: the model's context)
    limit: int | None = None  # score on the first N validation records (None: all)
    seed: int = 0

    def check(self):
        if self.method not in ("ape", "bootstrap", "both"):
            raise ValueError(f"search method must be ape, bootstrap or both, got {self.method!r}")
        for name in ("rounds", "candidates", "keep", "pairs", "max_demos", "demo_candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"search {name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_calls", "max_tokens", "max_prompt_tokens", "limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"search budget {name} must be >= 1 (or unset), got {getattr(self, name)}: "
                                 "a search with no budget cannot score a single candidate")


class BudgetReached(Exception):
    pass


BUDGETS = ("max_calls", "max_tokens")  # may change between runs of one search: a larger one continues it


class Trace:
    """The search's steps, appended to OUT/trace.jsonl as they finish; replayed by key on a resumed run. The
    header names the settings (budgets aside), the starting prompt, the model and the data searched on."""

    def __init__(self, out: Path, config: SearchConfig, base: Variant, identity: dict):
        self.path = out / "trace.jsonl"
        self.config = config
        settings = {k: v for k, v in asdict(config).items() if k not in BUDGETS}
        header = {"key": "header", "settings": settings, "base": base.to_json(), **identity}
        lines = read_log(self.path)
        if lines:
            if {k: lines[0].get(k) for k in header} != header:
                raise DataError(f"{self.path}: a search with other settings, another starting prompt, model or data "
                                "is recorded here; use another --out (or delete it to start over)")
            self.steps = {r["key"]: r for r in lines[1:]}
        else:
            out.mkdir(parents=True, exist_ok=True)
            self.steps = {}
            append_log(self.path, [header])
        self.calls = sum(r["calls"] for r in self.steps.values())
        self.tokens = sum(r["tokens"] for r in self.steps.values())
        self.seconds = sum(r["seconds"] for r in self.steps.values())
        self.replayed = len(self.steps)

    def step(self, key: str, calls: int, compute) -> dict:
        """The recorded result of `key`, or compute() -> {..., "tokens": n} (which makes at most `calls` model
        calls), recorded; raises BudgetReached when those calls would pass max_calls or the tokens are spent."""
        if key in self.steps:
            return self.steps[key]
        c = self.config
        if (c.max_calls is not None and self.calls + calls > c.max_calls) or \
                (c.max_tokens is not None and self.tokens >= c.max_tokens):
            raise BudgetReached
        t0 = time.perf_counter()
        record = {"key": key, **compute(), "calls": calls}
        record["seconds"] = round(time.perf_counter() - t0, 2)
        self.calls += calls
        self.tokens += record["tokens"]
        self.seconds += record["seconds"]
        self.steps[key] = record
        append_log(self.path, [record])
        return record


def _clean(text: str) -> str | None:
    """A proposal's first paragraph, without quotes or an "Instruction:" label; None if nothing is left."""
    text = text.strip().split("\n\n")[0].strip()
    for label in ("The instruction was", "Instruction:", "Output:"):
        if text.lower().startswith(label.lower()):
            text = text[len(label):].strip(" :")
    text = text.strip().strip("\"'“”").strip()
    return text[:400] or None


def _sample(model, tokenizer, user_text: str, n: int, seed: int) -> dict:
    """n sampled completions of one user turn (a seeded generator: the same n texts on every run):
    {"instructions": the distinct cleaned texts, in order, "tokens": prompt and generated tokens}."""
    ids = prompting.render(tokenizer, [{"role": "user", "content": user_text}])
    stop = prompting.default_stop_ids(model, tokenizer)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    out = generate(model, [ids] * n, PROPOSAL_TOKENS, temperature=PROPOSAL_TEMPERATURE, stop=stop,
                   pad_token_id=stop[0] if stop else 0, generator=generator)
    stop_text = None if tokenizer.chat_template else prompting.PLAIN_STOP
    rows = out[:, len(ids):].tolist()
    texts = [_clean(prompting.completion_text(tokenizer, row, stop, stop_text)) for row in rows]
    generated = sum(next((k + 1 for k, t in enumerate(row) if t in stop), len(row)) for row in rows)
    return {"instructions": list(dict.fromkeys(t for t in texts if t)), "tokens": n * len(ids) + generated}


def _tokens(result) -> int:
    """Prompt and generated tokens of an evaluation's answers."""
    return sum(r["prompt_tokens"] + r.get("new_tokens", 0) for r in result.records)


@dataclass
class SearchResult:
    best: Variant
    accuracy: float
    base_accuracy: float
    calls: int
    tokens: int
    minutes: float
    candidates: list[dict]  # every scored candidate in order: variant, accuracy, stage
    stopped_by_budget: bool


class Search:
    """One search: the task, the trace, and every candidate scored so far."""

    def __init__(self, model, tokenizer, task: TaskFolder, config: SearchConfig, trace: Trace, report):
        self.model, self.tokenizer, self.task, self.config, self.trace, self.report = \
            model, tokenizer, task, config, trace, report
        self.train = shots_from_records(task.train)
        self.scored: list[dict] = []  # {"variant", "accuracy", "stage"}, first time scored first

    def score(self, v: Variant, stage: str) -> float:
        """Validation accuracy of v (recorded, or computed and recorded; n_val answers a call each)."""
        c = self.config
        key = "score " + json.dumps({**v.to_json(), "name": ""}, sort_keys=True, ensure_ascii=False)
        n_val = min(len(self.task.validation), c.limit or len(self.task.validation))

        def run():
            result = evaluate_variant(self.model, self.tokenizer, v, self.task, self.task.validation, limit=c.limit,
                                      seed=c.seed, max_prompt_tokens=c.max_prompt_tokens, score_choices=False)
            return {"variant": v.to_json(), "accuracy": result.accuracy, "stage": stage, "tokens": _tokens(result)}
        record = self.trace.step(key, n_val * max(1, v.self_consistency), run)
        if all(s["variant"] != record["variant"] for s in self.scored):
            self.scored.append({k: record[k] for k in ("variant", "accuracy", "stage")})
            self.report(f"  {record['stage']}: {record['accuracy']:.3f}  {_describe(v)}")
        return record["accuracy"]

    def best(self) -> tuple[Variant, float]:
        top = max(self.scored, key=lambda s: s["accuracy"])  # max keeps the first of equal scores
        return Variant(**top["variant"]), top["accuracy"]

    def propose(self, key: str, text: str, n: int, seed: int) -> list[str]:
        return self.trace.step(key, n, lambda: _sample(self.model, self.tokenizer, text, n, seed))["instructions"]

    def ape(self, base: Variant):
        """APE: propose instructions from input/output pairs, score them as the system prompt, resample the
        best `keep` as paraphrases, for `rounds` rounds."""
        c = self.config
        pairs = random.Random(c.seed).sample(self.train, min(c.pairs, len(self.train)))
        room = self.model.config.max_position_embeddings - PROPOSAL_TOKENS
        while True:  # as many of the pairs as the context holds, with room for the proposal
            text = PROPOSE.format(n=len(pairs), pairs="\n\n".join(f"Input: {s.question}\nOutput: {s.answer}"
                                                                   for s in pairs))
            length = len(prompting.render(self.tokenizer, [{"role": "user", "content": text}]))
            if length <= room:
                break
            if len(pairs) == 1:
                why = (f"APE's proposal prompt with one input/output pair is {length} tokens, over the model's "
                       f"context of {room + PROPOSAL_TOKENS} minus {PROPOSAL_TOKENS} for the proposal")
                if c.method == "ape":
                    raise ValueError(why)
                self.report(f"  APE skipped: {why}")
                return
            pairs = pairs[:-1]
        proposals = self.propose("propose round 1", text, c.candidates, c.seed)
        for r in range(1, c.rounds + 1):
            for instruction in proposals:
                self.score(replace(base, system=instruction), f"APE round {r}")
            by_system: dict[str, float] = {}
            for s in self.scored:  # the best distinct instructions so far, the earliest first among equals
                system = s["variant"].get("system")
                if system and system not in by_system:
                    by_system[system] = s["accuracy"]
            kept = sorted(by_system, key=lambda k: -by_system[k])[:c.keep]
            if r == c.rounds or not kept:
                return
            each = max(1, c.candidates // len(kept))
            proposals = [p for j, instruction in enumerate(kept) for p in self.propose(
                f"resample round {r + 1} of {instruction!r}", RESAMPLE.format(instruction=instruction), each,
                c.seed + 1000 * r + j)]

    def bootstrap(self):
        """DSPy-style demonstrations on the best prompt so far: the train records it answers correctly, each
        kept when adding it raises validation accuracy (greedy), at most max_demos."""
        c = self.config
        start, start_acc = self.best()
        demo_questions = {d["question"] for d in start.demos or []}
        free = [i for i, s in enumerate(self.train) if s.question not in demo_questions]
        picked = random.Random(c.seed + 1).sample(free, min(c.demo_candidates, len(free)))

        def answer():  # the records answered are kept out of the shots they are answered with
            pool = [r for i, r in enumerate(self.task.train) if i not in set(picked)]
            result = evaluate_variant(self.model, self.tokenizer, start, self.task, [self.task.train[i] for i in picked],
                                      pool=pool, seed=c.seed, max_prompt_tokens=c.max_prompt_tokens,
                                      score_choices=False)
            return {"correct": [i for i, r in zip(picked, result.records) if r["score"] == 1.0],
                    "tokens": _tokens(result)}
        correct = self.trace.step("bootstrap: answer train records", len(picked) * max(1, start.self_consistency),
                                  answer)["correct"]
        base = replace(start, shots=0, demos=None)
        current = self.score(base, "demos 0") if start.shots or start.demos else start_acc
        demos: list[dict] = []
        for i in correct:
            if len(demos) == c.max_demos:
                break
            s = self.train[i]
            demo = {"question": s.question, "answer": s.answer, **({"rationale": s.rationale} if s.rationale else {})}
            acc = self.score(replace(base, demos=demos + [demo]), f"demos {len(demos) + 1}")
            if acc > current:
                demos, current = demos + [demo], acc


def search(model, tokenizer, task: TaskFolder, base: Variant, config: SearchConfig, out, report=print) -> SearchResult:
    """Search from `base` (e.g. the library's best) on task.validation; see the module docstring."""
    config.check()
    if not task.validation:
        raise DataError(f"{task.folder}: prompt search needs a validation split (validation.jsonl)")
    if task.test:
        raise ValueError("prompt search never looks at the test split: load the task with "
                         "splits=('train', 'validation')")
    out = Path(out)
    trace = Trace(out, config, base, {"model": model_digest(model), "task": task.name,
                                      "data": records_digest(task.train, task.validation)})
    if trace.replayed:
        report(f"resuming: {trace.replayed} recorded steps in {trace.path}")
    s = Search(model, tokenizer, task, config, trace, report)
    stopped = False
    try:
        s.score(base, "start")
        if config.method in ("ape", "both"):
            s.ape(base)
        if config.method in ("bootstrap", "both"):
            s.bootstrap()
    except BudgetReached:
        if not s.scored:
            raise ValueError(f"the budget (max_calls {config.max_calls}, max_tokens {config.max_tokens}) cannot score "
                             "even the starting prompt (one call per validation answer)") from None
        stopped = True
        report(f"budget reached ({trace.calls} model calls, {trace.tokens:,} tokens): keeping the best so far")
    top, acc = s.best()
    top = replace(top, name=f"{base.name}+search", notes=f"prompt search ({config.method}) from {base.name}")
    result = SearchResult(top, acc, s.scored[0]["accuracy"], trace.calls, trace.tokens, round(trace.seconds / 60, 2),
                          s.scored, stopped)
    atomic_write(out / "best.json", lambda p: p.write_text(json.dumps(
        {"variant": top.to_json(), "validation_accuracy": acc, "start_accuracy": result.base_accuracy,
         "calls": trace.calls, "tokens": trace.tokens, "minutes": result.minutes, "stopped_by_budget": stopped,
         "candidates": len(s.scored)}, indent=1, ensure_ascii=False) + "\n"))
    return result


def _describe(v: Variant) -> str:
    system = (v.system or "(records' own system prompt)")[:70]
    demos = f", {len(v.demos)} demos" if v.demos else f", {v.shots} {v.strategy} shots" if v.shots else ""
    return f"{system!r}{demos}"
