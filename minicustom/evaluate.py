"""Generation-based evaluation: greedy answers to prompts, scored against references.

`evaluate_generation` takes prompts already tokenized; `evaluate_task` builds them from task records with
minicustom.prompting (system prompt, few-shot, chain of thought, self-consistency) and is the path the
comparison harness uses, so every method is measured by the same code. Prompts are generated in batches
sorted by length (less left padding), and results come back in the input order.

Scorers: "exact" (exact_match), "label" (label_accuracy over a label set), "number" (number_match), or any
callable (prediction, reference) -> bool | float. Left out, on purpose: log-likelihood scoring of
multiple-choice options (lm-evaluation-harness' loglikelihood requests), BLEU/ROUGE, LLM-as-judge.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from decimal import Decimal

from . import prompting
from .generate import generate
from .model import eval_mode
from .progress import Progress
from .prompting import Shot, extract_answer


def _normalize(text: str) -> str:
    return " ".join(text.split()).casefold().rstrip(".")


def exact_match(pred: str | None, ref: str) -> bool:
    """Equal after collapsing whitespace, casefolding and dropping a trailing period ("Paris." == "paris")."""
    return pred is not None and _normalize(pred) == _normalize(ref)


def label_accuracy(pred: str | None, ref: str, labels: Sequence[str]) -> bool:
    """The label the prediction mentions first (as a whole word, case-insensitive; at one position the
    longer label wins) equals ref. A prediction naming no label is wrong. Negation is not understood:
    "not positive" predicts "positive"; "nonnegative" names no label ("negative" is not a whole word)."""
    if pred is None:
        return False
    hits = [(m.start(), -len(label), label) for label in labels
            if (m := re.search(rf"(?<!\w){re.escape(label)}(?!\w)", pred, re.IGNORECASE))]
    return bool(hits) and min(hits)[2].casefold() == ref.casefold()


def number_match(pred: str | None, ref: str) -> bool:
    """Both sides through extract_answer(kind="number"), then compared as exact decimals (no float error)."""
    p, r = extract_answer(pred, "number"), extract_answer(ref, "number")
    return p is not None and r is not None and Decimal(p) == Decimal(r)


SCORERS = {"exact": exact_match, "label": label_accuracy, "number": number_match}


@dataclass
class EvalResult:
    """accuracy: mean score over n examples; records: one dict per example, in input order, with question,
    prompt_tokens, output, prediction (after extraction), reference and score."""

    accuracy: float
    n: int
    records: list[dict]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, ensure_ascii=False)


def _scorer(scorer, labels, references) -> Callable:
    if callable(scorer):
        return scorer
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}: use one of {sorted(SCORERS)} or a callable (pred, ref)")
    if scorer != "label":
        return SCORERS[scorer]
    if not labels:
        raise ValueError("scorer 'label' needs labels, the list of allowed answers")
    known = {label.casefold() for label in labels}
    stray = sorted({r for r in references if r.casefold() not in known})
    if stray:
        raise ValueError(f"references {stray[:5]} are not among the labels {list(labels)}")
    return lambda pred, ref: label_accuracy(pred, ref, labels)


def _extractor(extract) -> Callable:
    if extract is None:
        return lambda text: text
    if callable(extract):
        return extract
    if extract not in ("number", "text"):
        raise ValueError(f"unknown extract {extract!r}: use None, 'number', 'text' or a callable (text) -> str")
    return lambda text: extract_answer(text, extract)


def evaluate_generation(model, tokenizer, prompts: Sequence[Sequence[int]], references: Sequence[str], *,
                        scorer="exact", labels: Sequence[str] | None = None, extract=None, batch_size: int = 8,
                        max_new_tokens: int = 32, stop_ids: Sequence[int] | None = None, progress: bool = True,
                        questions: Sequence[str] | None = None, stop_text: str | None = None) -> EvalResult:
    """Greedy answers to token-id prompts, extracted (None, "number", "text" or a callable) and scored.
    stop_text cuts each decoded output where it first appears (prompting.PLAIN_STOP for plain prompts)."""
    if len(prompts) != len(references):
        raise ValueError(f"{len(prompts)} prompts but {len(references)} references: one reference per prompt")
    if questions is not None and len(questions) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(questions)} questions")
    if not prompts:
        raise ValueError("nothing to evaluate: no prompts")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    score, extract = _scorer(scorer, labels, references), _extractor(extract)
    stop = list(stop_ids) if stop_ids is not None else prompting.default_stop_ids(model, tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    records: list[dict | None] = [None] * len(prompts)
    bar, total = Progress(len(prompts), 0, progress), 0.0
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            rows = [list(prompts[i]) for i in batch]
            out = generate(model, rows, max_new_tokens, stop=stop, pad_token_id=stop[0] if stop else 0)
            T = max(len(r) for r in rows)  # left-padded to T; the new tokens follow
            for i, new in zip(batch, out[:, T:].tolist()):
                text = prompting.completion_text(tokenizer, new, stop, stop_text)
                pred = extract(text)
                s = float(score(pred, references[i]))
                total += s
                records[i] = {"question": questions[i] if questions is not None else None,
                              "prompt_tokens": len(prompts[i]), "output": text, "prediction": pred,
                              "reference": references[i], "score": s}
            done = start + len(batch)
            bar.update(done, f"accuracy {total / done:.3f}")
    bar.close()
    return EvalResult(total / len(prompts), len(prompts), records)


def _shots(source) -> list[Shot]:
    if source is None:
        return []
    if isinstance(source, (str, os.PathLike)):
        return prompting.load_shots(source)
    return prompting.shots_from_records(source)


def evaluate_task(model, tokenizer, test_records, *, shots_pool=None, k: int = 0, strategy: str = "random",
                  chain_of_thought: bool = False, system: str | None = None, instruction: str | None = None,
                  self_consistency: int = 0, temperature: float = 0.7, scorer="exact",
                  labels: Sequence[str] | None = None, max_prompt_tokens: int | None = None,
                  max_new_tokens: int = 32, batch_size: int = 8, seed: int = 0, progress: bool = True) -> EvalResult:
    """Build each test record's prompt and evaluate: test_records and shots_pool are task records,
    ("file:line", record) pairs, Shots or a JSONL path.

    The system prompt is `system`, else the record's own. k shots come from shots_pool by `strategy`, and
    shots_pool must share no question with the test records. Each prompt is fit to max_prompt_tokens
    (default: the context window minus max_new_tokens) by dropping the least relevant shots. Answers are
    greedy, or with self_consistency = n > 1 the majority of n chains sampled at `temperature` (meant with
    chain_of_thought). Extraction: numbers for scorer "number", "The answer is X" with chain of thought.
    """
    tests, pool = _shots(test_records), _shots(shots_pool)
    if not tests:
        raise ValueError("nothing to evaluate: test_records is empty")
    if k > 0 and not pool:
        raise ValueError(f"k={k} shots asked for but shots_pool is empty or missing")
    key = prompting.question_key
    leaked = {key(s.question) for s in pool} & {key(t.question) for t in tests}
    if leaked:
        raise ValueError(f"{len(leaked)} of {len(tests)} test questions are also in shots_pool: shots must "
                         "come from another split (e.g. the training file), or the evaluation leaks answers")
    budget = max_prompt_tokens if max_prompt_tokens is not None else \
        model.config.max_position_embeddings - max_new_tokens
    prompts, kept = [], []
    for t in tests:
        shots = prompting.select_shots(t.question, pool, k, strategy, seed) if k > 0 else []
        ids, used = prompting.fit_to_budget(tokenizer, t.question, shots, budget, chain_of_thought=chain_of_thought,
                                            system=system if system is not None else t.system,
                                            instruction=instruction)
        prompts.append(ids)
        kept.append(len(used))
    kind = "number" if scorer == "number" else "text" if chain_of_thought else None
    references, questions = [t.answer for t in tests], [t.question for t in tests]
    stop_text = None if tokenizer.chat_template else prompting.PLAIN_STOP
    if self_consistency > 1:
        result = _vote(model, tokenizer, prompts, references, questions, scorer, labels, kind or "text",
                       self_consistency, temperature, max_new_tokens, seed, progress)
    else:
        result = evaluate_generation(model, tokenizer, prompts, references, scorer=scorer, labels=labels,
                                     extract=kind, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                     progress=progress, questions=questions, stop_text=stop_text)
    for record, n_shots in zip(result.records, kept):
        record["shots"] = n_shots
    return result


def _vote(model, tokenizer, prompts, references, questions, scorer, labels, kind, n, temperature,
          max_new_tokens, seed, progress) -> EvalResult:
    """Self-consistency for each prompt in turn (its n samples are the batch)."""
    score = _scorer(scorer, labels, references)
    bar, total, records = Progress(len(prompts), 0, progress), 0.0, []
    with eval_mode(model):
        for i, (ids, ref) in enumerate(zip(prompts, references)):
            pred, chains = prompting.self_consistency(model, tokenizer, ids, n=n, temperature=temperature,
                                                      max_new_tokens=max_new_tokens, kind=kind, seed=seed + i)
            s = float(score(pred, ref))
            total += s
            records.append({"question": questions[i], "prompt_tokens": len(ids), "output": chains,
                            "prediction": pred, "reference": ref, "score": s})
            bar.update(i + 1, f"accuracy {total / (i + 1):.3f}")
    bar.close()
    return EvalResult(total / len(prompts), len(prompts), records)
