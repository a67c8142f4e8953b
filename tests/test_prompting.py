"""Prompting: shot parsing and selection, message building against the chat template by hand, the token
budget, answer extraction, majority vote and self-consistency (with a stubbed and a real tiny model)."""

import json

import pytest
import torch

import minicustom as mc
from minicustom import prompting
from minicustom.data import DataError
from minicustom.generate import left_pad
from minicustom.prompting import (
    ALPACA_INSTRUCTION,
    Shot,
    build_messages,
    extract_answer,
    fit_to_budget,
    majority_vote,
    render,
    select_shots,
)

ARITH = Shot("What is 7 + 5 - 3?", "9", "7 + 5 = 12. 12 - 3 = 9.")
CITY = Shot("Which city is mentioned? I flew to Paris.", "Paris.")


def test_shots_from_records_and_file_errors(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"},
                          {"role": "assistant", "content": "2 + 2 = 4. The answer is 4."}],
             "answer": 4, "rationale": "2 + 2 = 4."},
            {"messages": [{"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": "Lima"}]}]
    assert prompting.shots_from_records(rows) == [Shot("2 + 2?", "4", "2 + 2 = 4.", "Be brief."),
                                                  Shot("Capital of Peru?", "Lima")]
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(DataError, match=r"task\.jsonl:3: expected a task record.*found \['prompt'\]"):
        prompting.load_shots(path)
    with pytest.raises(DataError, match="record 0: no reference answer"):
        prompting.shots_from_records([{"messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(DataError, match="record 0: no user message"):
        prompting.shots_from_records([{"messages": [{"role": "assistant", "content": "a"}]}])


def test_few_shot_messages_render_as_the_chat_template(tok):
    shots = [Shot("q1", "a1"), Shot("q2", "a2")]
    messages = build_messages("q3", system="Be brief.", shots=shots)
    by_hand = [{"role": "system", "content": "Be brief."},
               {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
               {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"},
               {"role": "user", "content": "q3"}]
    assert messages == by_hand
    assert render(tok, messages) == tok.apply_chat_template(by_hand, add_generation_prompt=True, tokenize=True)
    assert tok.decode(render(tok, messages)).endswith("<|im_start|>user\nq3<|im_end|>\n<|im_start|>assistant\n")
    assert build_messages("q")[0] == {"role": "user", "content": "q"}  # no system turn unless given


def test_chain_of_thought_formats():
    messages = build_messages("What is 2 + 3 * 4?", shots=[ARITH, CITY], chain_of_thought=True)
    assert [m["content"] for m in messages] == [
        ARITH.question, "7 + 5 = 12. 12 - 3 = 9. The answer is 9.",
        CITY.question, "The answer is Paris.",  # no rationale: the final form alone, one period
        "What is 2 + 3 * 4?\nLet's think step by step."]
    # without chain of thought the shots answer plainly and the query has no trigger
    assert [m["content"] for m in build_messages("q", shots=[ARITH])] == [ARITH.question, "9", "q"]


def test_instruction_wraps_every_user_turn():
    messages = build_messages("Name a {color}.", shots=[CITY], instruction=ALPACA_INSTRUCTION)
    assert messages[0]["content"] == ALPACA_INSTRUCTION.replace("{question}", CITY.question)
    assert messages[0]["content"].startswith("Below is an instruction that describes a task. Write")
    assert messages[2]["content"].endswith("### Instruction:\nName a {color}.\n\n### Response:\n")
    assert messages[1]["content"] == "Paris."
    cot = build_messages("q", instruction="Q: {question} {json: 1}", chain_of_thought=True)
    assert cot[0]["content"] == "Q: q\nLet's think step by step. {json: 1}"  # other braces stay literal
    with pytest.raises(ValueError, match=r"no \{question\} placeholder"):
        build_messages("q", instruction="Answer this:")


def test_plain_text_fallback_without_chat_template(setup):
    tok = mc.load_tokenizer(setup[1])
    tok.chat_template = None
    messages = build_messages("q3", system="Be brief.", shots=[Shot("q1", "a1"), Shot("q2", "a2")])
    text = "Be brief.\n\nQ: q1\nA: a1\n\nQ: q2\nA: a2\n\nQ: q3\nA:"
    assert prompting.plain_text(messages) == text
    assert render(tok, messages) == tok.encode(text, add_special_tokens=True)
    assert render(tok, messages)[0] == tok.bos_token_id
    with pytest.raises(ValueError, match="must end with the user's question"):
        prompting.plain_text(messages[:-1])


POOL = [Shot("What is the capital of France?", "Paris"),
        Shot("How many legs does a spider have?", "8"),
        Shot("What is 12 plus 30?", "42"),
        Shot("What is the capital city of Peru?", "Lima"),
        Shot("Name a fruit that is yellow.", "banana"),
        Shot("What is 7 plus 5?", "12")]


def test_similar_selection_picks_similar_and_orders_most_similar_last():
    picked = select_shots("What is the capital city of Norway?", POOL, k=2, strategy="similar")
    assert [s.answer for s in picked] == ["Paris", "Lima"]  # Peru shares "city" too: most similar, last
    picked = select_shots("What is 3 plus 4?", POOL, k=2, strategy="similar")
    assert {s.answer for s in picked} == {"42", "12"}
    # ties go to the earlier pool entry, which then sits last (closest to the query)
    twins = [Shot("alpha beta", "first"), Shot("alpha beta", "second"), Shot("gamma", "other")]
    assert [s.answer for s in select_shots("alpha", twins, k=2, strategy="similar")] == ["second", "first"]


@pytest.mark.parametrize("strategy", ["random", "similar"])
def test_selection_never_returns_the_query(strategy):
    query = "  what is 12 PLUS 30? "  # the same question up to case and spaces
    for seed in range(10):
        picked = select_shots(query, POOL, k=len(POOL), strategy=strategy, seed=seed)
        assert len(picked) == len(POOL) - 1 and POOL[2] not in picked


def test_random_selection_is_seeded():
    draws = [select_shots("q", POOL, k=3, seed=s) for s in (0, 0, 1)]
    assert draws[0] == draws[1] and draws[0] != draws[2]
    assert select_shots("q", POOL, k=0) == [] and len(select_shots("q", POOL, k=99)) == len(POOL)
    with pytest.raises(ValueError, match="unknown shot selection strategy 'best'"):
        select_shots("q", POOL, k=1, strategy="best")


def test_fit_to_budget_drops_least_relevant_first(tok):
    shots = POOL[:3]
    lengths = [len(render(tok, build_messages("Final question?", system="S", shots=shots[3 - n:])))
               for n in range(4)]
    assert lengths == sorted(set(lengths))  # each shot costs tokens
    ids, kept = fit_to_budget(tok, "Final question?", shots, lengths[2], system="S")
    assert kept == shots[1:] and len(ids) == lengths[2]
    ids, kept = fit_to_budget(tok, "Final question?", shots, lengths[2] - 1, system="S")
    assert kept == shots[2:] and len(ids) == lengths[1] <= lengths[2] - 1
    assert fit_to_budget(tok, "Final question?", shots, lengths[3], system="S")[1] == shots
    with pytest.raises(ValueError, match=rf"is {lengths[0]} tokens even with no shots.*budget of {lengths[0] - 1}"):
        fit_to_budget(tok, "Final question?", shots, lengths[0] - 1, system="S")


@pytest.mark.parametrize("text, number, plain", [
    ("The answer is 12.", "12", "12"),
    ("so 3 + 4 = 7", "7", "so 3 + 4 = 7"),
    ("-5", "-5", "-5"),
    ("1,234", "1234", "1,234"),
    ("answer is forty", None, "forty"),
    ("The answer is 12 apples (3 x 4)", "12", "12 apples (3 x 4)"),  # the stated answer's first number
    ("7 + 5 = 12. 12 - 3 = 9. The answer is 9.", "9", "9"),
    ("The answer is 12. Wait: the ANSWER IS 13!", "13", "13"),
    ("The answer is 3.5.", "3.5", "3.5"),
    ("It costs $1,234.50 in total", "1234.5", "It costs $1,234.50 in total"),
    ("9.0", "9", "9.0"),
    ("pages 3-4", "4", "pages 3-4"),
    ("x = -0", "0", "x = -0"),
    ("The answer is **Paris**.\nMore text", None, "Paris"),
    ("\n\n  Lima  \nPeru", None, "Lima"),
    ("", None, None),
])
def test_extract_answer(text, number, plain):
    assert extract_answer(text, "number") == number
    assert extract_answer(text, "text") == plain


def test_majority_vote():
    assert majority_vote(["4", "5", "5", "4"]) == "4"  # a tie goes to the answer seen first
    assert majority_vote(["5", None, "4", "4"]) == "4"
    assert majority_vote([None, None, "x"]) == "x"
    assert majority_vote([None]) is None and majority_vote([]) is None


def test_self_consistency_votes_over_sampled_chains(tok, model, monkeypatch):
    chains = ["3 + 3 = 6. The answer is 6.", "The answer is 7.", "2 * 3 = 6, so 6", "The answer is 7.",
              "The answer is 6."]
    eos = tok.eos_token_id
    calls = []

    def fake_generate(model, rows, max_new_tokens, **kw):
        calls.append((rows, max_new_tokens, kw))
        # rows that stopped early are padded with the stop id, as generate does
        new = [tok.encode(c, add_special_tokens=False) + [eos] for c in chains]
        width = max(map(len, new))
        return torch.cat([left_pad(rows)[0], torch.tensor([n + [eos] * (width - len(n)) for n in new])], dim=1)

    monkeypatch.setattr(prompting, "generate", fake_generate)
    ids = render(tok, build_messages("What is 2 * 3?", chain_of_thought=True))
    answer, got = prompting.self_consistency(model, tok, ids, n=5, temperature=0.8, max_new_tokens=16, seed=3)
    assert answer == "6" and got == chains
    rows, max_new_tokens, kw = calls[0]
    assert rows == [ids] * 5 and max_new_tokens == 16 and kw["temperature"] == 0.8
    assert isinstance(kw["generator"], torch.Generator) and eos in kw["stop"]
    with pytest.raises(ValueError, match="temperature must be > 0"):
        prompting.self_consistency(model, tok, ids, temperature=0.0)


def test_self_consistency_on_tiny_model_is_seeded(tok, model):
    ids = render(tok, build_messages("Where is Paris?", chain_of_thought=True))
    first = prompting.self_consistency(model, tok, ids, n=3, max_new_tokens=6, seed=1, kind="text")
    assert len(first[1]) == 3
    assert prompting.self_consistency(model, tok, ids, n=3, max_new_tokens=6, seed=1, kind="text") == first
