"""Relevance (token F1, ROUGE-L against Google's rouge-score), percentiles (against numpy), response-time
fields of the evaluator, and log-likelihood scoring of choices (against a hand computation from full logits).

Tolerances: token F1 and ROUGE-L are ratios of the same integer counts on both sides, computed in the same
float operations (2PR / (P + R)), so they are compared exactly. Percentiles interpolate as numpy does; one
rounding of a product apart at most: rel 1e-12. Log-likelihoods: one forward of the right-padded rows with an
fp32 log-softmax, against one forward of each row alone with a float64 log-softmax; the same math in another
batch shape (matmul blocking) and precision: a few fp32 ulps of |log p| ~ 6 per token and of the logits, on sums
of <= 4 tokens, ~1e-5. Tolerance 1e-4 absolute. Measured (5 prompts x 7 choices): at most 8.5e-6.
"""

import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer, tokenize

from minicustom import evaluate, metrics
from minicustom.evaluate import choice_logprobs, evaluate_choices, evaluate_generation, evaluate_task

PAIRS = [
    ("The cat sat on the mat.", "the cat was on a mat"),
    ("Paris", "Paris"),
    ("paris, FRANCE!!", "Paris France"),
    ("", "something"),
    ("something", ""),
    ("...", "!!!"),
    ("a a a b", "a b b"),
    ("The answer is 42.", "42"),
    ("Total: 3+4=7, so 7 apples", "There are 7 apples in total"),
    ("naïve café déjà-vu", "naive cafe deja vu"),  # accented letters are separators to rouge-score too
    ("x y z w v u", "u v w x y z"),
    ("one two three four five six seven eight", "two four six eight one three five seven"),
    ("positive positive negative", "negative"),
    ("It's 9:30 — isn't it?", "it s 9 30 isn t it"),
]


@pytest.mark.parametrize("pred, ref", PAIRS)
def test_token_f1_and_rouge_l_equal_rouge_score(pred, ref):
    oracle = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    expected = oracle.score(ref, pred)  # score(target, prediction)
    assert metrics.tokens(pred) == tokenize.tokenize(pred, None)
    assert metrics.token_f1(pred, ref) == expected["rouge1"].fmeasure
    assert metrics.rouge_l(pred, ref) == expected["rougeL"].fmeasure


def test_lcs_against_brute_force():
    import itertools

    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        a = [str(t) for t in torch.randint(0, 3, (int(torch.randint(0, 7, (1,), generator=g)),), generator=g).tolist()]
        b = [str(t) for t in torch.randint(0, 3, (int(torch.randint(0, 7, (1,), generator=g)),), generator=g).tolist()]
        best = max((k for k in range(len(a) + 1) for sub in itertools.combinations(a, k)
                    if _is_subsequence(sub, b)), default=0)
        assert metrics.lcs_length(a, b) == best, (a, b)


def _is_subsequence(sub, seq):
    it = iter(seq)
    return all(x in it for x in sub)


def test_relevance_is_the_mean_and_checks_lengths():
    out = metrics.relevance(["the cat", None], ["the cat", "dog"])
    assert out == {"token_f1": 0.5, "rouge_l": 0.5}
    with pytest.raises(ValueError, match="1 predictions for 2 references"):
        metrics.relevance(["a"], ["a", "b"])


@pytest.mark.parametrize("values", [[3.0], [1.0, 2.0], [0.5, 0.1, 0.9, 0.3, 0.7], list(range(20))[::-1]])
@pytest.mark.parametrize("q", [0, 50, 95, 100])
def test_percentile_equals_numpy(values, q):
    assert metrics.percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12, abs=0)


def test_percentile_refuses_nothing_and_out_of_range():
    with pytest.raises(ValueError, match="percentile of no values"):
        metrics.percentile([], 50)
    with pytest.raises(ValueError, match=r"q must be in \[0, 100\], got 101"):
        metrics.percentile([1.0], 101)


def test_generation_reports_relevance_and_response_time(tok, model):
    prompts = [tok.encode(q) for q in ("Where is Paris?", "Name a city.", "I live in Lima.")]
    refs = ["In Paris.", "Lima", "Lima"]
    result = evaluate_generation(model, tok, prompts, refs, batch_size=2, max_new_tokens=6, progress=False)
    outputs = [r["output"] for r in result.records]
    assert result.metrics["token_f1"] == pytest.approx(np.mean([metrics.token_f1(o, r) for o, r in zip(outputs, refs)]))
    assert result.metrics["rouge_l"] == pytest.approx(np.mean([metrics.rouge_l(o, r) for o, r in zip(outputs, refs)]))
    for r in result.records:
        assert 1 <= r["new_tokens"] <= 6
        assert 0 < r["first_token_s"] <= r["latency_s"]
    lat = [r["latency_s"] for r in result.records]
    assert result.metrics["latency_p50_s"] == pytest.approx(float(np.percentile(lat, 50)))
    assert result.metrics["latency_p95_s"] >= result.metrics["latency_p50_s"]
    assert result.metrics["tokens_per_s"] > 0


def test_new_tokens_stop_at_the_first_stop_token():
    assert evaluate._until_stop([5, 6, 2, 2, 2], [2]) == 3
    assert evaluate._until_stop([5, 6, 7], [2]) == 3
    assert evaluate._until_stop([2, 0], [9, 2]) == 1


def _by_hand(model, prompt, choice):
    """log p(choice | prompt) from the full logits of the unpadded row, token by token."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + choice]))[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(logp[len(prompt) - 1 + t, c].item() for t, c in enumerate(choice))


def test_choice_logprobs_equal_a_hand_computation(tok, model):
    prompt = tok.encode("Where is Lima? It is in")
    choices = [tok.encode(c, add_special_tokens=False) for c in (" Peru", " South America", " a", " Oslo city")]
    assert len({len(c) for c in choices}) > 1  # rows of different lengths: padding is exercised
    got = choice_logprobs(model, prompt, choices)
    for c, g in zip(choices, got):
        assert g == pytest.approx(_by_hand(model, prompt, c), abs=1e-4)


def test_evaluate_choices_acc_and_length_normalized_acc(tok, model):
    labels = ["positive", "negative", "neutral"]
    prompts = [tok.encode(q) for q in ("I loved it.", "I hated it.", "It was a film.", "Great!")]
    refs = ["positive", "negative", "neutral", "Positive"]
    result = evaluate_choices(model, tok, prompts, refs, labels, progress=False)
    hits = hits_norm = 0
    for p, ref, record in zip(prompts, refs, result.records):
        lls = [_by_hand(model, p, tok.encode(c, add_special_tokens=False)) for c in labels]
        assert list(record["loglikelihoods"].values()) == pytest.approx(lls, abs=1e-4)
        hits += labels[int(np.argmax(lls))] == ref.lower()
        hits_norm += labels[int(np.argmax([ll / len(c) for ll, c in zip(lls, labels)]))] == ref.lower()
    assert result.accuracy == hits / 4 and result.metrics["acc_norm"] == hits_norm / 4


def test_evaluate_choices_refuses_bad_input(tok, model):
    with pytest.raises(ValueError, match=r"references \['maybe'\] are not among the choices"):
        evaluate_choices(model, tok, [[1, 2]], ["maybe"], ["yes", "no"])
    with pytest.raises(ValueError, match="at least two different answers"):
        evaluate_choices(model, tok, [[1, 2]], ["yes"], ["yes", "YES"])
    with pytest.raises(ValueError, match="2 prompts and 1 references"):
        evaluate_choices(model, tok, [[1, 2], [3]], ["yes"], ["yes", "no"])
    with pytest.raises(ValueError, match="at least one token"):
        choice_logprobs(model, [], [[1]])


def test_evaluate_task_reports_log_likelihood_beside_generation(tok, model):
    records = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
               for q, a in (("Is it good?", "positive"), ("Is it bad?", "negative"))]
    result = evaluate_task(model, tok, records, scorer="label", labels=["positive", "negative"],
                           max_new_tokens=4, progress=False, score_choices=True)
    prompts = [r["prompt_tokens"] for r in result.records]
    from minicustom import prompting
    ids = [prompting.render(tok, prompting.build_messages(r["messages"][0]["content"])) for r in records]
    assert [len(i) for i in ids] == prompts  # the same prompts, scored both ways
    by_ll = evaluate_choices(model, tok, ids, ["positive", "negative"], ["positive", "negative"], progress=False)
    assert result.metrics["loglik_acc"] == by_ll.accuracy and result.metrics["loglik_acc_norm"] == by_ll.metrics["acc_norm"]
    assert "rouge_l" in result.metrics
    with pytest.raises(ValueError, match="give labels"):
        evaluate_task(model, tok, records, max_new_tokens=4, progress=False, score_choices=True)
