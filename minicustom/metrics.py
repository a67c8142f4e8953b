"""Relevance and response time: what the seeds ask of a prompt beside accuracy.

Relevance of a generated answer to its reference, on the tokens of Lin's ROUGE as Google's `rouge-score`
package makes them (lowercase, every run of characters other than a-z and 0-9 a separator; no stemming):

    token F1 = 2·P·R / (P + R),  P = |pred ∩ ref| / |pred|,  R = |pred ∩ ref| / |ref|   (∩ of multisets)
    ROUGE-L  = 2·P·R / (P + R),  P = LCS(pred, ref) / |pred|,  R = LCS(pred, ref) / |ref|

(Lin, 2004, "ROUGE: A Package for Automatic Evaluation of Summaries", §3.1 with β = 1). Token F1 is then
rouge-score's ROUGE-1 F-measure; either is 0 when a side has no token. Text in other scripts than Latin
letters and digits has no token under this tokenizer, as under rouge-score's.

Response time: `latency_summary` takes per-answer seconds and gives p50 / p95 as numpy's default
(linear interpolation between the order statistics).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_SEPARATOR = re.compile(r"[^a-z0-9]+")


def tokens(text: str) -> list[str]:
    """rouge-score's tokenizer without a stemmer: lowercase, split on anything but a-z and 0-9."""
    return [t for t in _SEPARATOR.split(text.lower()) if t]


def _f(overlap: int, n_pred: int, n_ref: int) -> float:
    if not overlap:
        return 0.0
    p, r = overlap / n_pred, overlap / n_ref
    return 2 * p * r / (p + r)


def token_f1(pred: str | None, ref: str) -> float:
    """Unigram F1 over the multisets of tokens (rouge-score's ROUGE-1 F-measure)."""
    p, r = tokens(pred or ""), tokens(ref)
    overlap = sum((Counter(p) & Counter(r)).values())
    return _f(overlap, len(p), len(r))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, by the usual table kept one row at a time: O(|a|·|b|)."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # table[i-1][j-1]; row[j] is table[i-1][j] until overwritten with table[i][j]
        for j, y in enumerate(b, 1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(above, row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l(pred: str | None, ref: str) -> float:
    """ROUGE-L F-measure (β = 1) of the prediction against one reference."""
    p, r = tokens(pred or ""), tokens(ref)
    return _f(lcs_length(r, p), len(p), len(r))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100), interpolating linearly between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    s = sorted(values)
    at = (len(s) - 1) * q / 100
    lo = math.floor(at)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (at - lo)


def latency_summary(seconds: Sequence[float], first_token: Sequence[float], new_tokens: Sequence[int],
                    wall: float) -> dict:
    """Per-answer latencies and times to first token (seconds) and the new tokens of each answer, over a run
    of `wall` seconds of generation -> p50/p95 latency, p50 time to first token, and tokens/s overall."""
    return {"latency_p50_s": percentile(seconds, 50), "latency_p95_s": percentile(seconds, 95),
            "first_token_p50_s": percentile(first_token, 50),
            "tokens_per_s": sum(new_tokens) / wall if wall > 0 else 0.0}


def relevance(predictions: Sequence[str | None], references: Sequence[str]) -> dict:
    """Mean token F1 and ROUGE-L of the predictions against their references."""
    n = len(references)
    if n == 0 or len(predictions) != n:
        raise ValueError(f"{len(predictions)} predictions for {n} references: one each, at least one")
    return {"token_f1": sum(map(token_f1, predictions, references)) / n,
            "rouge_l": sum(map(rouge_l, predictions, references)) / n}
