"""The prompt library: its file format and errors, scoring on the validation split, the history it keeps
and the best variant it picks from it, fixed demonstrations, and `minicustom prompts eval`."""

import json

import pytest
import torch
from conftest import CITIES

from minicustom import prompting
from minicustom.cli import main
from minicustom.cli_common import CommandError
from minicustom.data import DataError
from minicustom.prompt_library import (
    best_variant,
    evaluate_library,
    evaluate_variant,
    history_path,
    model_digest,
    parse_variant,
    ranking_markdown,
    read_history,
    read_library,
)
from minicustom.tasks import load_task

SYSTEM = "Answer with the name of the city only."


def record(i, city):
    return {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": f"Which city is mentioned? Trip {i} went to {city}."},
                         {"role": "assistant", "content": city}], "answer": city}


def write_task(folder, validation=True):
    folder.mkdir(parents=True, exist_ok=True)
    rows = {"train": [record(i, c) for i, c in enumerate(CITIES)],
            "validation": [record(50 + i, c) for i, c in enumerate(CITIES[:3])],
            "test": [record(100 + i, c) for i, c in enumerate(CITIES[:4])]}
    if not validation:
        del rows["validation"]
    for name, r in rows.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in r))
    (folder / "task.json").write_text(json.dumps({"name": "tiny-city", "scorer": "exact", "max_new_tokens": 3}))
    return folder


LIBRARY = [{"name": "plain"}, {"name": "two-similar", "shots": 2, "system": "Name the city."},
           {"name": "fixed", "demos": [{"question": "Which city? I saw Oslo.", "answer": "Oslo"}],
            "instruction": "Text: {question}"}]


def write_library(path, variants=LIBRARY):
    path.write_text("".join(json.dumps(v) + "\n" for v in variants))
    return path


def test_a_library_round_trips():
    for v in LIBRARY:  # to_json writes what differs from the defaults
        assert parse_variant(v, "x:1").to_json() == v
    assert parse_variant({"name": "a", "strategy": "similar", "shots": 0}, "x:1").to_json() == {"name": "a"}


@pytest.mark.parametrize("line, message", [
    ({"name": "a", "temperature": 0.3}, r"lib.jsonl:2: unknown field 'temperature'; a variant has name, system"),
    ({"name": "a", "answer_format": 3}, r"lib.jsonl:2: 'answer_format' must be str or null, got 3"),
    ({"name": ""}, r"lib.jsonl:2: 'name' must be a non-empty string"),
    ({"system": "x"}, r"lib.jsonl:2: 'name' must be a non-empty string, got None"),
    ({"name": "a", "shots": "4"}, r"lib.jsonl:2: 'shots' must be int, got '4'"),
    ({"name": "a", "shots": True}, r"lib.jsonl:2: 'shots' must be int, got True"),
    ({"name": "a", "chain_of_thought": 1}, r"lib.jsonl:2: 'chain_of_thought' must be bool, got 1"),
    ({"name": "a", "shots": -1}, r"lib.jsonl:2: 'shots' and 'self_consistency' must be >= 0"),
    ({"name": "a", "strategy": "best"}, r"lib.jsonl:2: 'strategy' must be one of similar, random, got 'best'"),
    ({"name": "a", "instruction": "Review:"}, r"lib.jsonl:2: 'instruction' must hold \{question\}"),
    ({"name": "a", "shots": 2, "demos": []}, r"lib.jsonl:2: give 'shots' .* or 'demos' .*, not both"),
    ({"name": "a", "demos": [{"question": "q"}]}, r"lib.jsonl:2: demos\[0\] must be"),
    ({"name": "plain"}, r"lib.jsonl:2: variant name 'plain' is already used at .*lib.jsonl:1"),
    ([1, 2], r"lib.jsonl:2: expected a JSON object, got list"),
])
def test_a_bad_library_line_is_one_error_naming_file_line_and_field(tmp_path, line, message):
    path = write_library(tmp_path / "lib.jsonl", [{"name": "plain"}, line])
    with pytest.raises(DataError, match=message):
        read_library(path)


def test_an_empty_library_and_a_task_without_validation_are_refused(tmp_path):
    (tmp_path / "lib.jsonl").write_text("")
    with pytest.raises(DataError, match=r"lib.jsonl: the dataset is empty"):
        read_library(tmp_path / "lib.jsonl")
    folder = write_task(tmp_path / "task", validation=False)
    with pytest.raises(DataError, match="no validation.jsonl; prompts are chosen on the validation split"):
        load_task(folder, splits=("train", "validation"))


def test_fixed_demos_are_the_prompt_s_shots(setup, tok, model, tmp_path):
    task = load_task(write_task(tmp_path / "task"), splits=("train", "validation"))
    v = parse_variant(LIBRARY[2], "x:1")
    result = evaluate_variant(model, tok, v, task, task.validation, score_choices=False)
    shot = prompting.Shot("Which city? I saw Oslo.", "Oslo")
    for r, rec in zip(result.records, task.validation):
        expected = prompting.render(tok, prompting.build_messages(rec["messages"][1]["content"], system=SYSTEM,
                                                                  shots=[shot], instruction="Text: {question}"))
        assert r["prompt_tokens"] == len(expected) and r["shots"] == 1


def test_eval_ranks_keeps_a_history_and_learns_the_best(setup, tok, model, tmp_path, monkeypatch):
    task = load_task(write_task(tmp_path / "task"), splits=("train", "validation"))
    library = write_library(tmp_path / "lib.jsonl")
    scored = evaluate_library(model, tok, library, task, model_name="tiny", report=lambda _: None)
    assert sorted(s.variant.name for s in scored) == ["fixed", "plain", "two-similar"]
    keys = [(-s.result.accuracy, s.row()["prompt_tokens"]) for s in scored]
    assert keys == sorted(keys)  # best first, then the shorter prompt
    history = read_history(library)
    assert [h["name"] for h in history] == [v["name"] for v in LIBRARY]  # one line each, in library order
    assert all(h["split"] == "validation" and h["model"] == "tiny" and 0 <= h["accuracy"] <= 1 for h in history)
    assert library.read_text() == "".join(json.dumps(v) + "\n" for v in LIBRARY)  # the library is not rewritten
    table = ranking_markdown(scored, "tiny-city")
    assert "| 1 |" in table and "| 0 (–) |" in table  # no earlier run yet

    # best_variant reads the history: the highest mean accuracy, an edited variant starting afresh
    history_path(library).write_text("".join(json.dumps(h) + "\n" for h in [
        {"name": "plain", "variant": {"name": "plain"}, "task": "tiny-city", "model": "tiny", "accuracy": 0.5, "n": 3},
        {"name": "fixed", "variant": {"name": "fixed", "shots": 3}, "task": "tiny-city", "model": "tiny",
         "accuracy": 1.0, "n": 3},  # another version of "fixed": not counted
        {"name": "two-similar", "variant": LIBRARY[1], "task": "tiny-city", "model": "tiny", "accuracy": 0.25, "n": 3},
        {"name": "two-similar", "variant": LIBRARY[1], "task": "tiny-city", "model": "tiny", "accuracy": 0.5, "n": 3},
        {"name": "two-similar", "variant": LIBRARY[1], "task": "other", "model": "tiny", "accuracy": 1.0, "n": 3}]))
    assert best_variant(library, "tiny-city").name == "plain"
    assert best_variant(library, "tiny-city", model="another") is None
    again = evaluate_library(model, tok, library, task, model_name="tiny", report=lambda _: None)
    by = {s.variant.name: s.row() for s in again}
    assert by["two-similar"]["past_runs"] == 2 and by["two-similar"]["past_best"] == 0.5
    assert by["fixed"]["past_runs"] == 0
    assert len(read_history(library)) == 5 + 3


def test_the_command_line(setup, tmp_path, capsys):
    _, path = setup
    folder = write_task(tmp_path / "task")
    library = write_library(tmp_path / "lib.jsonl")
    main(["prompts", "eval", "--model", str(path), "--library", str(library), "--task", str(folder),
          "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "| rank | variant | accuracy |" in out and (tmp_path / "out" / "ranking.md").read_text() == out
    assert len(json.loads((tmp_path / "out" / "ranking.json").read_text())) == 3
    write_library(library, [{"name": "a", "temprature": 0}])
    with pytest.raises(CommandError, match="lib.jsonl:1: unknown field 'temprature'"):
        main(["prompts", "eval", "--model", str(path), "--library", str(library), "--task", str(folder)])
    no_val = write_task(tmp_path / "noval", validation=False)
    with pytest.raises(CommandError, match="no validation.jsonl"):
        main(["prompts", "eval", "--model", str(path), "--library", str(write_library(library)), "--task",
              str(no_val)])


def test_the_answer_format_follows_the_question(setup, tok, model, tmp_path):
    task = load_task(write_task(tmp_path / "task"), splits=("train", "validation"))
    v = parse_variant({"name": "fmt", "instruction": "Text: {question}", "answer_format": "One word."}, "x:1")
    result = evaluate_variant(model, tok, v, task, task.validation[:1], score_choices=False)
    question = task.validation[0]["messages"][1]["content"]
    expected = prompting.render(tok, prompting.build_messages(question, system=SYSTEM,
                                                              instruction="Text: {question}\nOne word."))
    assert result.records[0]["prompt_tokens"] == len(expected)


def test_each_result_is_kept_as_soon_as_it_is_known(setup, tok, model, tmp_path, monkeypatch):
    """A crash at the second variant keeps the first one's line; a torn last line is dropped, not fatal."""
    from minicustom import prompt_library

    task = load_task(write_task(tmp_path / "task"), splits=("train", "validation"))
    library = write_library(tmp_path / "lib.jsonl")
    real, calls = prompt_library.evaluate_variant, []

    def failing(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(prompt_library, "evaluate_variant", failing)
    with pytest.raises(KeyboardInterrupt):
        evaluate_library(model, tok, library, task, model_name="tiny", report=lambda _: None)
    assert [h["name"] for h in read_history(library)] == ["plain"]
    history_path(library).write_text(history_path(library).read_text() + '{"name": "fix')  # a torn append
    assert [h["name"] for h in read_history(library)] == ["plain"]
    assert history_path(library).read_text().endswith("}\n")


def test_the_model_digest_tells_weights_and_context_apart(model):
    import copy

    same = copy.deepcopy(model)
    assert model_digest(same) == model_digest(model)
    with torch.no_grad():
        next(iter(same.parameters())).view(-1)[0] += 1e-3  # one weight, at index 0 (always in the sample)
    assert model_digest(same) != model_digest(model)
    longer = copy.deepcopy(model)
    longer.config.max_position_embeddings *= 2
    assert model_digest(longer) != model_digest(model)
