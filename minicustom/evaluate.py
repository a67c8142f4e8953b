"""Generation-based evaluation: greedy answers to prompts, scored against references.

`evaluate_generation` takes prompts already tokenized; `evaluate_task` builds them from task records with
minicustom.prompting (system prompt, few-shot, chain of thought, self-consistency) and is the path the
comparison harness uses, so every method is measured by the same code. Prompts are generated in batches
sorted by length (less left padding), and results come back in the input order.

Scorers: "exact" (exact_match), "label" (label_accuracy over a label set), "number" (number_match), or any
callable (prediction, reference) -> bool | float. Beside accuracy, every generated answer's relevance to its
reference (token F1, ROUGE-L: minicustom.metrics) and response time (time to first token, latency, tokens/s)
are reported in `EvalResult.metrics`. Latencies are those of answers generated in batches of `batch_size`:
an answer is ready when its row stops; batch_size=1 gives a single user's latency.

Log-likelihood scoring (`evaluate_choices`, lm-evaluation-harness' multiple-choice requests): each choice c
of a question with prompt x is scored by log p(c | x) = Σ_t log p(c_t | x, c_<t), and the prediction is the
choice of largest score (acc), or of largest score / len(c) in characters (acc_norm, lm-eval's length
normalization). The choice's tokens are the tokenizer's encoding of its text alone, appended to the prompt
(the assistant turn's first tokens under a chat template), or of " " + text after a plain "A:" prompt (lm-eval's
target delimiter). An LLM judge is judge.py. Left out: BLEU.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from decimal import Decimal

import torch

from . import metrics, prompting
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
    prompt_tokens, output, prediction (after extraction), reference and score; metrics: relevance and
    response time of generated answers (token_f1, rouge_l, latency_p50_s, ...), or acc_norm of choices."""

    accuracy: float
    n: int
    records: list[dict]
    metrics: dict = field(default_factory=dict)

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
    bar, total, wall = Progress(len(prompts), 0, progress), 0.0, 0.0
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            rows = [list(prompts[i]) for i in batch]
            ticks = [time.perf_counter()]  # the batch's start, then the moment each new column is out
            out = generate(model, rows, max_new_tokens, stop=stop, pad_token_id=stop[0] if stop else 0,
                           on_token=lambda _, ticks=ticks: ticks.append(time.perf_counter()))
            wall += ticks[-1] - ticks[0]
            T = max(len(r) for r in rows)  # left-padded to T; the new tokens follow
            for i, new in zip(batch, out[:, T:].tolist()):
                n_new = _until_stop(new, stop)
                text = prompting.completion_text(tokenizer, new, stop, stop_text)
                pred = extract(text)
                s = float(score(pred, references[i]))
                total += s
                records[i] = {"question": questions[i] if questions is not None else None,
                              "prompt_tokens": len(prompts[i]), "output": text, "prediction": pred,
                              "reference": references[i], "score": s, "new_tokens": n_new,
                              "first_token_s": ticks[1] - ticks[0], "latency_s": ticks[n_new] - ticks[0]}
            done = start + len(batch)
            bar.update(done, f"accuracy {total / done:.3f}")
    bar.close()
    return EvalResult(total / len(prompts), len(prompts), records, _answer_metrics(records, wall))


def _until_stop(new: list[int], stop: Sequence[int]) -> int:
    """How many of a row's new tokens it generated: up to and including its first stop token (the rest,
    if any, is the padding of a finished row)."""
    return next((k + 1 for k, t in enumerate(new) if t in stop), len(new))


def _answer_metrics(records: list[dict], wall: float) -> dict:
    return {**metrics.relevance([r["output"] for r in records], [r["reference"] for r in records]),
            **metrics.latency_summary([r["latency_s"] for r in records], [r["first_token_s"] for r in records],
                                      [r["new_tokens"] for r in records], wall)}


@torch.inference_mode()
def choice_logprobs(model, prompt: Sequence[int], choices: Sequence[Sequence[int]]) -> list[float]:
    """log p(choice | prompt) for each choice's token ids: one forward over the rows prompt + choice (right
    padded; causal attention keeps the padding out of every scored position)."""
    if not prompt or not choices or any(len(c) == 0 for c in choices):
        raise ValueError("log-likelihood scoring needs a prompt and choices of at least one token each")
    rows = [list(prompt) + list(c) for c in choices]
    T = max(map(len, rows))
    device = model.model.embed_tokens.weight.device
    ids = torch.tensor([r + [0] * (T - len(r)) for r in rows], device=device)  # (K, T)
    with eval_mode(model):
        h = model.forward_hidden(ids)  # (K, T, C)
        head = model.head()
        scores = []
        for k, c in enumerate(choices):  # c_t is predicted at position len(prompt) + t - 1
            at = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(c), device=device)
            logp = torch.log_softmax(head(h[k, at]).float(), dim=-1)  # (len(c), V)
            scores.append(logp.gather(1, torch.as_tensor(c, device=device)[:, None]).sum().item())
    return scores


def evaluate_choices(model, tokenizer, prompts: Sequence[Sequence[int]], references: Sequence[str],
                     choices: Sequence[str], *, questions: Sequence[str] | None = None,
                     progress: bool = True) -> EvalResult:
    """Multiple choice by log-likelihood: accuracy is acc (the most likely choice), metrics["acc_norm"] the
    accuracy of the most likely per character. References must be among the choices (case-insensitive)."""
    if len(prompts) != len(references) or not prompts:
        raise ValueError(f"{len(prompts)} prompts and {len(references)} references: one each, at least one")
    if len(choices) < 2 or len({c.casefold() for c in choices}) != len(choices):
        raise ValueError(f"choices must be at least two different answers, got {list(choices)}")
    index = {c.casefold(): k for k, c in enumerate(choices)}
    stray = sorted({r for r in references if r.casefold() not in index})
    if stray:
        raise ValueError(f"references {stray[:5]} are not among the choices {list(choices)}")
    delimiter = "" if tokenizer.chat_template else " "  # a plain prompt ends "A:"; the answer follows a space
    encoded = [tokenizer.encode(delimiter + c, add_special_tokens=False) for c in choices]
    bar, records, hits, hits_norm = Progress(len(prompts), 0, progress), [], 0, 0
    for i, (ids, ref) in enumerate(zip(prompts, references)):
        lls = choice_logprobs(model, ids, encoded)
        best = max(range(len(choices)), key=lambda k: lls[k])
        best_norm = max(range(len(choices)), key=lambda k: lls[k] / len(choices[k]))
        hits += best == index[ref.casefold()]
        hits_norm += best_norm == index[ref.casefold()]
        records.append({"question": questions[i] if questions is not None else None, "prompt_tokens": len(ids),
                        "loglikelihoods": dict(zip(choices, lls)), "prediction": choices[best],
                        "prediction_norm": choices[best_norm], "reference": ref,
                        "score": float(best == index[ref.casefold()])})
        bar.update(i + 1, f"acc {hits / (i + 1):.3f}")
    bar.close()
    return EvalResult(hits / len(prompts), len(prompts), records, {"acc_norm": hits_norm / len(prompts)})


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
                  max_new_tokens: int = 32, batch_size: int = 8, seed: int = 0, progress: bool = True,
                  score_choices: bool = False) -> EvalResult:
    """Build each test record's prompt and evaluate: test_records and shots_pool are task records,
    ("file:line", record) pairs, Shots or a JSONL path. With score_choices (and labels), the same prompts
    are also scored by log-likelihood over the labels: metrics["loglik_acc"] and ["loglik_acc_norm"].

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
        raise ValueError(f"{len(leaked)} of {len(tests)} questions evaluated are also in shots_pool: shots must "
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
    if score_choices:
        if not labels:
            raise ValueError("score_choices scores the labels by log-likelihood: give labels")
        by_ll = evaluate_choices(model, tokenizer, prompts, references, labels, progress=progress)
        result.metrics.update(loglik_acc=by_ll.accuracy, loglik_acc_norm=by_ll.metrics["acc_norm"])
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
