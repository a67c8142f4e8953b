"""LLM-as-a-judge: a local model rates each answer against its reference with a rubric prompt.

Single-answer grading with a reference, as MT-Bench does it (Zheng et al. 2023, "Judging LLM-as-a-Judge with
MT-Bench and Chatbot Arena", §3.1, its prompt for grading with a reference): the judge reads the rubric, the question, the
reference answer and the assistant's answer, explains briefly, and ends with "Rating: [[N]]" on a 1-10 scale.
The rating is the number in the last "[[N]]" of the judge's greedy output, or failing that the number after
the last "Rating:"; a number outside 1-10 or no number leaves the answer unrated, and how many were rated
is reported beside the mean. Any checkpoint can judge (a larger one than the model judged, ideally); a
135M judge is a weak one, so the rating is reported beside accuracy, never instead of it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from . import prompting
from .generate import generate
from .model import eval_mode

RUBRIC = ("Please act as an impartial judge and evaluate the correctness and helpfulness of the answer given "
          "by an AI assistant to the user question below. You are given a reference answer: compare the "
          "assistant's answer with it, identify any mistake, and be as objective as possible. After a short "
          "explanation, rate the answer on a scale of 1 to 10 in exactly this format: \"Rating: [[5]]\".\n\n"
          "[Question]\n{question}\n\n[Reference answer]\n{reference}\n\n[Assistant's answer]\n{answer}")
_BRACKETS = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_RATING = re.compile(r"rating\s*:?\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


@dataclass
class Judgement:
    ratings: list[float | None]  # one per answer; None: the judge gave no rating in 1..10
    outputs: list[str]  # the judge's own words

    @property
    def rated(self) -> int:
        return sum(r is not None for r in self.ratings)

    @property
    def mean(self) -> float | None:
        return sum(r for r in self.ratings if r is not None) / self.rated if self.rated else None


def parse_rating(text: str) -> float | None:
    """The last "[[N]]" (else the last "Rating: N") of a judge's output, if it is within 1..10."""
    found = _BRACKETS.findall(text) or _RATING.findall(text)
    if not found:
        return None
    value = float(found[-1])
    return value if 1 <= value <= 10 else None


def judge_answers(model, tokenizer, questions: Sequence[str], answers: Sequence[str | None],
                  references: Sequence[str], *, rubric: str = RUBRIC, max_new_tokens: int = 96,
                  batch_size: int = 8) -> Judgement:
    """Rate each answer with the judge `model` (greedy); the rubric holds {question}, {answer}, {reference}."""
    if not len(questions) == len(answers) == len(references):
        raise ValueError(f"{len(questions)} questions, {len(answers)} answers and {len(references)} references: "
                         "one of each per item")
    if missing := [k for k in ("{question}", "{answer}", "{reference}") if k not in rubric]:
        raise ValueError(f"the judge's rubric must hold {', '.join(missing)}")
    prompts = [prompting.render(tokenizer, [{"role": "user", "content": rubric.replace("{question}", q).replace(
        "{reference}", r).replace("{answer}", a or "")}]) for q, a, r in zip(questions, answers, references)]
    stop = prompting.default_stop_ids(model, tokenizer)
    outputs: list[str] = []
    with eval_mode(model):
        for start in range(0, len(prompts), batch_size):
            rows = prompts[start:start + batch_size]
            out = generate(model, rows, max_new_tokens, stop=stop, pad_token_id=stop[0] if stop else 0)
            T = max(map(len, rows))
            outputs += [prompting.completion_text(tokenizer, new, stop) for new in out[:, T:].tolist()]
    return Judgement([parse_rating(o) for o in outputs], outputs)
