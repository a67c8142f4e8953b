"""LLM-as-a-judge: the rating parser, the rubric prompt each answer gets (generate scripted), the mean over
rated answers, bad input, a real judge on a tiny model, and the judge column of `prompts eval`."""

import pytest
import torch
from test_prompt_library import write_library, write_task

from minicustom import judge, prompting
from minicustom.cli import main
from minicustom.generate import left_pad
from minicustom.judge import judge_answers, parse_rating


@pytest.mark.parametrize("text, rating", [
    ("The answer matches. Rating: [[8]]", 8.0),
    ("Rating: [[ 3 ]] ... on reflection Rating: [[4]]", 4.0),  # the last one counts
    ("Rating: 7", 7.0),
    ("rating 9.5 overall", 9.5),
    ("[[11]]", None),  # outside 1..10
    ("Rating: [[0]]", None),
    ("no number here", None),
    ("I give it [[2]], Rating: 9", 2.0),  # brackets win over a bare "Rating:"
])
def test_parse_rating(text, rating):
    assert parse_rating(text) == rating


def test_each_answer_gets_the_rubric_and_the_mean_is_over_rated_answers(tok, model, monkeypatch):
    replies = iter(["Good. Rating: [[9]]", "Wrong. Rating: [[2]]", "I cannot tell."])
    seen = []

    def fake(model, rows, max_new_tokens, *, stop, pad_token_id, **kw):
        seen.extend(tok.decode(r) for r in rows)
        new = [tok.encode(next(replies), add_special_tokens=False) + [stop[0]] for _ in rows]
        width = max(map(len, new))
        return torch.cat([left_pad(rows, pad_token_id)[0],
                          torch.tensor([n + [pad_token_id] * (width - len(n)) for n in new])], dim=1)
    monkeypatch.setattr(judge, "generate", fake)
    out = judge_answers(model, tok, ["Where is Lima?", "2+2?", "Hi?"], ["Peru", "5", None], ["Peru", "4", "Hello"],
                        batch_size=2)
    assert out.ratings == [9.0, 2.0, None] and out.rated == 2 and out.mean == 5.5
    assert "[Question]\nWhere is Lima?" in seen[0] and "[Reference answer]\nPeru" in seen[0]
    assert "[Assistant's answer]\n5" in seen[1]
    assert out.outputs[2] == "I cannot tell."


def test_bad_input(tok, model):
    with pytest.raises(ValueError, match="2 questions, 1 answers and 2 references"):
        judge_answers(model, tok, ["a", "b"], ["x"], ["y", "z"])
    with pytest.raises(ValueError, match=r"rubric must hold \{reference\}"):
        judge_answers(model, tok, ["a"], ["x"], ["y"], rubric="Q {question} A {answer}")


def test_a_real_judge_and_the_judge_column(setup, long_context, tmp_path, capsys):
    tok, model, _ = long_context
    out = judge_answers(model, tok, ["Where is Lima?"], ["Peru"], ["Peru"], max_new_tokens=8)
    assert len(out.ratings) == 1 and isinstance(out.outputs[0], str)
    assert out.mean is None or 1 <= out.mean <= 10
    prompt = prompting.render(tok, [{"role": "user", "content": judge.RUBRIC}])
    assert len(prompt) > 50  # the rubric is rendered through the chat template
    _, path = setup
    judge_path = long_context[2]
    main(["prompts", "eval", "--model", str(path), "--library", str(write_library(tmp_path / "lib.jsonl")),
          "--task", str(write_task(tmp_path / "task")), "--judge", str(judge_path)])
    assert "| judge (1-10) |" in capsys.readouterr().out


def test_a_self_consistency_variant_is_judged_on_its_majority_answer(setup, tok, model, tmp_path, monkeypatch):
    from minicustom import prompt_library
    from minicustom.prompt_library import evaluate_library
    from minicustom.tasks import load_task

    seen = []

    def fake_judge(model, tok, questions, answers, references, **kw):
        seen.extend(answers)
        return judge.Judgement([5.0] * len(answers), [""] * len(answers))
    monkeypatch.setattr(prompt_library, "judge_answers", fake_judge)
    library = write_library(tmp_path / "lib.jsonl", [{"name": "vote", "self_consistency": 2}])
    task = load_task(write_task(tmp_path / "task"), splits=("train", "validation"))
    scored = evaluate_library(model, tok, library, task, model_name="tiny", judge=(model, tok), report=lambda _: None)
    assert scored[0].judge == 5.0 and all(a is None or isinstance(a, str) for a in seen) and len(seen) == 3
