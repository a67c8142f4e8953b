"""The generation evaluator: scorers, batching with order restored (generate stubbed with known answers),
validation errors, the task path (leak guard, budget, extraction), and a smoke run on a tiny model."""

import json

import pytest
import torch

from minicustom import evaluate, prompting
from minicustom.evaluate import (
    EvalResult,
    evaluate_generation,
    evaluate_task,
    exact_match,
    label_accuracy,
    number_match,
)
from minicustom.generate import left_pad

LABELS = ["positive", "negative"]


@pytest.mark.parametrize("pred, ref, expected", [
    ("Paris", "Paris", True), ("  paris.\n", "Paris", True), ("Paris France", "Paris  france", True),
    ("Paris, France", "Paris", False), ("Lima", "Paris", False), (None, "Paris", False)])
def test_exact_match(pred, ref, expected):
    assert exact_match(pred, ref) is expected


@pytest.mark.parametrize("pred, ref, expected", [
    ("Positive!", "positive", True),
    ("negative", "positive", False),
    ("NEGATIVE", "negative", True),
    ("It is not positive", "positive", True),  # documented: negation is not understood
    ("nonnegative", "negative", False),  # not a whole word: names no label, so wrong
    ("negative, not positive", "negative", True),  # the first mention in the text wins
    ("neutral", "negative", False),
    (None, "negative", False)])
def test_label_accuracy(pred, ref, expected):
    assert label_accuracy(pred, ref, LABELS) is expected


def test_label_accuracy_prefers_the_longer_label_at_one_position():
    labels = ["positive", "very positive"]
    assert label_accuracy("Very positive.", "very positive", labels)
    assert not label_accuracy("Very positive.", "positive", labels)


@pytest.mark.parametrize("pred, ref, expected", [
    ("The answer is 1,234.", "1234", True), ("9.0", "9", True), ("so 4 + 5 = 9", "9.00", True),
    ("-5", "5", False), ("no idea", "3", False), (None, "3", False), ("0.1", "0.10", True)])
def test_number_match(pred, ref, expected):
    assert number_match(pred, ref) is expected


QUESTIONS = ["What is 1 + 1?", "Is the sky blue today?", "2?", "Count the legs of a spider, please.",
             "Name it.", "What is the capital of Peru, in South America?"]
ANSWERS = ["2", "yes", "two", "8", "Lima", "Lima."]


@pytest.fixture
def fake_generate(tok, monkeypatch):
    """generate stubbed: each prompt's answer is ANSWERS at its question's index, then EOS padding; calls
    record the prompt lengths of every batch."""
    calls = []
    by_prompt = {tuple(tok.encode(q)): a for q, a in zip(QUESTIONS, ANSWERS)}

    def fake(model, rows, max_new_tokens, *, stop, pad_token_id, **kw):
        assert not model.training
        calls.append([len(r) for r in rows])
        new = [tok.encode(by_prompt[tuple(r)], add_special_tokens=False) + [stop[0]] for r in rows]
        width = max(map(len, new))
        padded = torch.tensor([n + [pad_token_id] * (width - len(n)) for n in new])
        for column in padded.T:  # as generate streams: one call per new column
            kw["on_token"](column)
        return torch.cat([left_pad(rows, pad_token_id)[0], padded], dim=1)

    monkeypatch.setattr(evaluate, "generate", fake)
    return calls


def test_batches_sorted_by_length_and_order_restored(tok, model, fake_generate):
    prompts = [tok.encode(q) for q in QUESTIONS]
    refs = ["2", "no", "two", "8", "Lima", "lima"]
    model.train()
    result = evaluate_generation(model, tok, prompts, refs, batch_size=4, progress=False, questions=QUESTIONS)
    assert model.training  # the caller's mode comes back
    assert [r["output"] for r in result.records] == ANSWERS
    assert [r["question"] for r in result.records] == QUESTIONS
    assert [r["score"] for r in result.records] == [1.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert result.n == 6 and result.accuracy == pytest.approx(5 / 6)
    lengths = [n for batch in fake_generate for n in batch]
    assert [len(b) for b in fake_generate] == [4, 2] and lengths == sorted(len(p) for p in prompts)
    assert json.loads(result.to_json())["records"][4]["prompt_tokens"] == len(prompts[4])


def test_custom_scorer_extractor_and_progress(tok, model, fake_generate, capsys):
    prompts = [tok.encode(q) for q in QUESTIONS]
    result = evaluate_generation(model, tok, prompts, ANSWERS, scorer=lambda p, r: 0.5 * (p == r.upper()),
                                 extract=str.upper, batch_size=5, progress=True)
    assert result.accuracy == pytest.approx(0.5) and result.records[1]["prediction"] == "YES"
    assert "step 6/6" in capsys.readouterr().err
    result = evaluate_generation(model, tok, prompts[:1], ["2"], scorer="number", extract="number", progress=False)
    assert result.accuracy == 1.0 and capsys.readouterr().err == ""


def test_validation_errors(tok, model):
    prompts = [[1, 5, 6]] * 3
    with pytest.raises(ValueError, match="3 prompts but 2 references"):
        evaluate_generation(model, tok, prompts, ["a", "b"])
    with pytest.raises(ValueError, match="scorer 'label' needs labels"):
        evaluate_generation(model, tok, prompts, ["a"] * 3, scorer="label")
    with pytest.raises(ValueError, match=r"references \['maybe'\] are not among the labels"):
        evaluate_generation(model, tok, prompts, ["positive", "maybe", "negative"], scorer="label", labels=LABELS)
    with pytest.raises(ValueError, match=r"unknown scorer 'f1'.*\['exact', 'label', 'number'\]"):
        evaluate_generation(model, tok, prompts, ["a"] * 3, scorer="f1")
    with pytest.raises(ValueError, match="unknown extract 'json'"):
        evaluate_generation(model, tok, prompts, ["a"] * 3, extract="json")


def task(question, answer, rationale=None, system="Answer with a number."):
    record = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": question},
                           {"role": "assistant", "content": answer}]}
    return {**record, "rationale": rationale} if rationale else record


TRAIN = [task(f"What is {a} plus {b}?", str(a + b), f"{a} + {b} = {a + b}.") for a, b in [(1, 2), (3, 4), (10, 5)]]
TEST = [task("What is 2 plus 2?", "4"), task("What is 6 plus 1?", "7")]


def test_evaluate_task_refuses_shots_from_the_test_split(tok, model):
    with pytest.raises(ValueError, match="1 of 2 questions evaluated are also in shots_pool"):
        evaluate_task(model, tok, TEST, shots_pool=TRAIN + TEST[1:], k=2, progress=False)
    with pytest.raises(ValueError, match="shots_pool is empty or missing"):
        evaluate_task(model, tok, TEST, k=2, progress=False)


def test_evaluate_task_builds_fitted_prompts_and_extracts(tok, model, monkeypatch):
    seen = []

    def fake(model, rows, max_new_tokens, *, stop, pad_token_id, **kw):
        seen.extend(rows)
        new = torch.tensor([tok.encode("2 + 2 = 4. The answer is 4.", add_special_tokens=False)] * len(rows))
        for column in new.T:
            kw["on_token"](column)
        return torch.cat([left_pad(rows)[0], new], dim=1)

    monkeypatch.setattr(evaluate, "generate", fake)
    full = len(prompting.render(tok, prompting.build_messages(
        TEST[0]["messages"][1]["content"], system="Answer with a number.", chain_of_thought=True,
        shots=prompting.select_shots(TEST[0]["messages"][1]["content"], prompting.shots_from_records(TRAIN), 3,
                                     "similar"))))
    result = evaluate_task(model, tok, TEST, shots_pool=TRAIN, k=3, strategy="similar", chain_of_thought=True,
                           scorer="number", max_prompt_tokens=full - 1, progress=False)
    assert [r["prediction"] for r in result.records] == ["4", "4"] and result.accuracy == 0.5
    assert all(r["prompt_tokens"] <= full - 1 and r["shots"] < 3 for r in result.records)
    text = tok.decode(seen[0])
    assert "Answer with a number." in text and "The answer is" in text and "Let's think step by step." in text
    # exact scorer with chain of thought: "The answer is X" extraction of text
    result = evaluate_task(model, tok, TEST, chain_of_thought=True, system="Be terse.", progress=False)
    assert result.records[0]["prediction"] == "4" and result.accuracy == 0.5
    assert "Be terse." in tok.decode(seen[-1]) and "Answer with a number." not in tok.decode(seen[-1])


def test_smoke_tiny_model(tok, model):
    """A random model's answers are garbage; this checks the whole path runs and reports sane numbers."""
    records = [task(f"Which city is mentioned? I live in {c}.", c, system="Name the city.") for c in ("Oslo", "Riga")]
    pool = [task(f"Which city is mentioned? We met in {c}.", c, system="Name the city.") for c in ("Lima", "Kyoto")]
    result = evaluate_task(model, tok, records, shots_pool=pool, k=2, strategy="similar", max_new_tokens=4,
                           batch_size=2, progress=False)
    assert isinstance(result, EvalResult) and result.n == 2 and 0.0 <= result.accuracy <= 1.0
    assert all(r["shots"] == 2 and r["prompt_tokens"] <= 256 - 4 for r in result.records)
    voted = evaluate_task(model, tok, records, chain_of_thought=True, self_consistency=3, max_new_tokens=4,
                          progress=False)
    assert voted.n == 2 and all(len(r["output"]) == 3 for r in voted.records)
