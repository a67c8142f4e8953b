"""Prompt engineering, the rung below any training: few-shot examples, chain of thought, self-consistency.

- Few-shot in-context learning (Brown et al. 2020, "Language Models are Few-Shot Learners"): k solved
  examples ("shots") precede the question, each as a user turn and an assistant turn.
- Shot selection: a seeded random draw, or the k most similar to the query (Liu et al. 2022, "What Makes
  Good In-Context Examples for GPT-3?"), the most similar placed last, next to the query.
- Chain of thought: few-shot with worked rationales (Wei et al. 2022), answers in the fixed form
  "<rationale> The answer is X.", and the zero-shot trigger "Let's think step by step." after the query
  (Kojima et al. 2022, "Large Language Models are Zero-Shot Reasoners").
- Self-consistency (Wang et al. 2023): sample n chains at temperature > 0, extract each final answer,
  take the majority.

The formats (all in `build_messages` and `render`):
    user turn       instruction.replace("{question}", question)   (just the question without instruction)
    query with CoT  question + "\\nLet's think step by step."      (the trigger goes on the query only)
    shot answer     answer; with CoT "The answer is {answer}." preceded by "{rationale} " when there is one
    no template     "{system}\\n\\n" + "Q: {question}\\nA: {answer}\\n\\n" per shot + "Q: {query}\\nA:"

Left out: Liu et al.'s retrieval uses sentence embeddings (RoBERTa); here similarity is TF-IDF-weighted
bag-of-words cosine over the pool, which needs no second model. Also left out: calibration of label
priors, automatic prompt search (APE, DSPy), least-to-most and tree-of-thought decoding, and scoring
answers by log-likelihood (lm-evaluation-harness' multiple-choice path); answers here are generated.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import ALPACA, DataError, read_jsonl
from .generate import generate

COT_TRIGGER = "Let's think step by step."
# The plain-text fallback's next question starts here: a completion is cut at it (see completion_text).
PLAIN_STOP = "\nQ:"
# Stanford Alpaca's prompt as an `instruction` wrapper for build_messages.
ALPACA_INSTRUCTION = ALPACA.format(instruction="{question}", with_input="", input_block="")


@dataclass
class Shot:
    """One solved example: the question, its reference answer, an optional worked rationale (for chain
    of thought) and the record's own system message."""

    question: str
    answer: str
    rationale: str | None = None
    system: str | None = None


def shots_from_records(records: Iterable) -> list[Shot]:
    """Task records -> shots. A record is {"messages": [system?, user, assistant?], "answer"?, "rationale"?}
    or a ("file:line", record) pair as read_jsonl returns; the question is the last user message, the
    answer record["answer"] if present, else the last assistant message (earlier turns are ignored)."""
    shots = []
    for i, item in enumerate(records):
        if isinstance(item, Shot):
            shots.append(item)
            continue
        where, record = item if isinstance(item, tuple) else (f"record {i}", item)
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                      for m in messages):
            found = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{where}: expected a task record {{'messages': [{{'role', 'content'}}, ...], "
                            f"'answer'?, 'rationale'?}}, found {found}")
        turns = {role: [m["content"] for m in messages if m["role"] == role]
                 for role in ("system", "user", "assistant")}
        if not turns["user"]:
            raise DataError(f"{where}: no user message (the question)")
        answer = record.get("answer", turns["assistant"][-1] if turns["assistant"] else None)
        if answer is None:
            raise DataError(f"{where}: no reference answer: add an 'answer' field or a final assistant message")
        system = turns["system"][0] if turns["system"] else None
        shots.append(Shot(turns["user"][-1], str(answer), record.get("rationale"), system))
    return shots


def load_shots(path) -> list[Shot]:
    """Shots from a JSONL file of task records; errors name file:line."""
    return shots_from_records(read_jsonl(Path(path)))


# -- selection -------------------------------------------------------------------------------------------

def question_key(text: str) -> str:
    """The leak guard's notion of "the same question": case and whitespace do not count."""
    return " ".join(text.split()).casefold()


def _words(text: str) -> Counter:
    return Counter(re.findall(r"\w+", text.casefold()))


def select_shots(query: str, pool: Sequence[Shot], k: int, strategy: str = "random", seed: int = 0) -> list[Shot]:
    """Up to k shots from pool for query, never one whose question is the query itself.

    random: a draw seeded by (seed, query), so each query gets its own shots, as in Brown et al., and the
    same ones on every run. similar: the k highest cosine similarities of TF-IDF bag-of-words vectors
    (idf = ln((1 + N) / (1 + df)) + 1 over the N candidates), ties going to the earlier pool entry;
    returned least similar first, so the most similar sits next to the query and is the last one
    fit_to_budget drops. fixed: the first k of the pool, in its order (a prompt's chosen demonstrations).
    """
    if strategy not in ("random", "similar", "fixed"):
        raise ValueError(f"unknown shot selection strategy {strategy!r}: use 'random', 'similar' or 'fixed'")
    if k < 0:
        raise ValueError(f"k (the number of shots) must be >= 0, got {k}")
    candidates = [s for s in pool if question_key(s.question) != question_key(query)]
    k = min(k, len(candidates))
    if k == 0:
        return []
    if strategy == "fixed":
        return candidates[:k]
    if strategy == "random":
        return random.Random(f"{seed}:{query}").sample(candidates, k)
    counts = [_words(s.question) for s in candidates]
    df = Counter(w for c in counts for w in c)
    idf = {w: math.log((1 + len(counts)) / (1 + d)) + 1 for w, d in df.items()}

    def vector(c: Counter) -> dict[str, float]:
        return {w: n * idf.get(w, math.log(1 + len(counts)) + 1) for w, n in c.items()}

    def cosine(a: dict, b: dict) -> float:
        norms = math.sqrt(sum(x * x for x in a.values())) * math.sqrt(sum(x * x for x in b.values()))
        return sum(x * b.get(w, 0.0) for w, x in a.items()) / norms if norms else 0.0

    q = vector(_words(query))
    scores = [cosine(q, vector(c)) for c in counts]
    best = sorted(range(len(candidates)), key=lambda i: (-scores[i], i))[:k]
    return [candidates[i] for i in reversed(best)]


# -- prompt building -------------------------------------------------------------------------------------

def _shot_answer(shot: Shot, chain_of_thought: bool) -> str:
    if not chain_of_thought:
        return shot.answer
    final = f"The answer is {shot.answer.strip().rstrip('.')}."  # "Paris." must not become "Paris.."
    return f"{shot.rationale.strip()} {final}" if shot.rationale else final


def build_messages(query: str, *, system: str | None = None, shots: Sequence[Shot] = (),
                   chain_of_thought: bool = False, instruction: str | None = None) -> list[dict]:
    """[system?] + (user, assistant) per shot + the query's user turn; formats in the module docstring."""
    if instruction is not None and "{question}" not in instruction:
        raise ValueError(f"instruction template has no {{question}} placeholder: {instruction!r}")

    def user(text: str) -> dict:
        # replace, not str.format: braces elsewhere in the template (JSON, code) stay literal
        return {"role": "user", "content": instruction.replace("{question}", text) if instruction else text}

    messages = [{"role": "system", "content": system}] if system else []
    for shot in shots:
        messages += [user(shot.question), {"role": "assistant", "content": _shot_answer(shot, chain_of_thought)}]
    messages.append(user(f"{query}\n{COT_TRIGGER}" if chain_of_thought else query))
    return messages


def plain_text(messages: Sequence[dict]) -> str:
    """The fallback for a tokenizer without a chat template: "{system}\\n\\n", then "Q: {user}\\nA: {assistant}
    \\n\\n" per exchange, ending "Q: {query}\\nA:" for the model to complete."""
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("the prompt's messages must end with the user's question")
    form = {"system": "{}\n\n", "user": "Q: {}\nA:", "assistant": " {}\n\n"}
    return "".join(form[m["role"]].format(m["content"]) for m in messages)


def render(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Prompt token ids: the chat template with the generation prompt, or plain_text + the tokenizer's
    own special tokens (BOS) when it has no template."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    return tokenizer.encode(plain_text(messages), add_special_tokens=True)


def fit_to_budget(tokenizer, query: str, shots: Sequence[Shot], max_prompt_tokens: int,
                  **build_kwargs) -> tuple[list[int], list[Shot]]:
    """(ids, kept shots) with len(ids) <= max_prompt_tokens, dropping shots from the front (the least
    relevant under select_shots' order). The caller sets max_prompt_tokens to the context window minus
    max_new_tokens, so the answer has room."""
    shots = list(shots)
    while True:
        ids = render(tokenizer, build_messages(query, shots=shots, **build_kwargs))
        if len(ids) <= max_prompt_tokens:
            return ids, shots
        if not shots:
            raise ValueError(f"the prompt is {len(ids)} tokens even with no shots, over the budget of "
                             f"{max_prompt_tokens} prompt tokens (question {query[:60]!r}); raise "
                             "max_prompt_tokens or lower max_new_tokens")
        shots = shots[1:]


# -- answers ---------------------------------------------------------------------------------------------

# "answer is X" up to the end of its sentence or line; "3.5." ends after 3.5, a period needs a space or the end
_ANSWER_IS = re.compile(r"\banswer is\s*:?\s*(.*?)\s*(?:[.!?](?=\s|$)|\n|$)", re.IGNORECASE)
# -12, 1,234.5, 3.14; a minus counts only when no word character precedes it ("3-4" is 3 and 4)
_NUMBER = re.compile(r"(?:(?<!\w)-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


def normalize_number(text: str) -> str:
    """Canonical form of a matched number: no thousands commas, no leading zeros, no trailing fractional
    zeros ("1,234.50" -> "1234.5", "9.0" -> "9", "-0" -> "0"), so string equality is numeric equality."""
    sign, digits = ("-", text[1:]) if text.startswith("-") else ("", text)
    whole, _, frac = digits.replace(",", "").partition(".")
    out = (whole.lstrip("0") or "0") + ("." + frac.rstrip("0") if frac.rstrip("0") else "")
    return out if out == "0" else sign + out


def extract_answer(text: str | None, kind: str = "number") -> str | None:
    """The final answer in a model's output, or None.

    If the text says "answer is X" (case-insensitive; the last occurrence wins), the answer comes from X
    alone: for kind "number" its first number (None when X has none, e.g. "answer is forty"), for "text"
    X without surrounding quotes/asterisks and trailing punctuation. Otherwise "number" takes the last
    number in the text and "text" the first non-empty line, stripped. Numbers go through normalize_number.
    """
    if kind not in ("number", "text"):
        raise ValueError(f"unknown answer kind {kind!r}: use 'number' or 'text'")
    if not text:
        return None
    stated = [m.group(1) for m in _ANSWER_IS.finditer(text)]
    if kind == "number":
        found = _NUMBER.findall(stated[-1]) if stated else _NUMBER.findall(text)[-1:]
        return normalize_number(found[0]) if found else None
    if stated:
        answer = stated[-1].strip(" \t*\"'`").rstrip(".,;:!?")
        return answer or None
    return next((line.strip() for line in text.splitlines() if line.strip()), None)


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most common answer that is not None; a tie goes to the one seen first. None if all are None."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == top)


# -- generation ------------------------------------------------------------------------------------------

def default_stop_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS and the model config's eos_token_id (an int or a list)."""
    eos = getattr(model.config, "eos_token_id", None)
    ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])}
    return sorted(i for i in ids if i is not None)


def turn_tail(tokenizer) -> list[int]:
    """The ids a chat template writes after an assistant turn's end-of-turn token (ChatML's newline): what
    follows every completion of a rendered conversation. [] without a template or an EOS."""
    eos = tokenizer.eos_token_id
    if not tokenizer.chat_template or eos is None:
        return []
    ids = list(tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                                             add_generation_prompt=False, tokenize=True))
    return ids[len(ids) - ids[::-1].index(eos):] if eos in ids else []


def completion_text(tokenizer, ids: Sequence[int], stop_ids: Iterable[int] = (), stop_text: str | None = None) -> str:
    """Generated ids -> text: cut before the first stop id (padding follows it), decode without special
    tokens, and cut at stop_text (e.g. PLAIN_STOP, where a plain-text prompt's next question begins)."""
    ids, stop = list(ids), set(stop_ids)
    end = next((i for i, t in enumerate(ids) if t in stop), len(ids))
    text = tokenizer.decode(ids[:end], skip_special_tokens=True)
    return text.split(stop_text, 1)[0] if stop_text else text


def self_consistency(model, tokenizer, ids: Sequence[int], n: int = 5, temperature: float = 0.7,
                     top_p: float | None = None, max_new_tokens: int = 128, kind: str = "number", seed: int = 0,
                     stop_ids: Sequence[int] | None = None) -> tuple[str | None, list[str]]:
    """(majority answer, the n sampled chains): one batched generate over n copies of the prompt with a
    seeded generator, each chain's answer by extract_answer(kind), then majority_vote."""
    if n < 1:
        raise ValueError(f"self-consistency needs n >= 1 samples, got {n}")
    if temperature <= 0:
        raise ValueError(f"self-consistency samples, so temperature must be > 0 (got {temperature}); "
                         "at 0 all n chains would be the same greedy one")
    stop = list(stop_ids) if stop_ids is not None else default_stop_ids(model, tokenizer)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    out = generate(model, [list(ids)] * n, max_new_tokens, temperature=temperature, top_p=top_p, stop=stop,
                   pad_token_id=stop[0] if stop else 0, generator=generator)
    stop_text = None if tokenizer.chat_template else PLAIN_STOP
    chains = [completion_text(tokenizer, row, stop, stop_text) for row in out[:, len(ids):].tolist()]
    return majority_vote([extract_answer(c, kind) for c in chains]), chains
