"""Prompt search: it never reads the test split, a resumed search ends where an uninterrupted one does, the
budget of calls holds, APE keeps and resamples the best instructions, and a demonstration is kept only when
it raises validation accuracy. The selection logic is checked with a scripted scorer; the rest on a tiny model."""

import json
import re
from types import SimpleNamespace

import pytest
from test_prompt_library import write_task

from minicustom import prompt_search
from minicustom.prompt_library import Variant
from minicustom.prompt_search import SearchConfig, search
from minicustom.tasks import load_task

SMALL = dict(rounds=2, candidates=2, keep=1, demo_candidates=3, max_demos=2, seed=3)


@pytest.fixture
def task(tmp_path):
    folder = write_task(tmp_path / "task")
    (folder / "test.jsonl").write_text("not JSON: opening it would fail the search\n")
    return load_task(folder, splits=("train", "validation"))


def test_the_search_never_reads_the_test_split(long_context, task, tmp_path):
    tok, model, _ = long_context
    result = search(model, tok, task, Variant("plain"), SearchConfig(**SMALL), tmp_path / "s", report=lambda _: None)
    trace = (tmp_path / "s" / "trace.jsonl").read_text()
    assert not re.search(r"Trip 10\d", trace)  # test questions are "Trip 100-103"; train 0-11, validation 50-52
    assert result.calls == sum(json.loads(x).get("calls", 0) for x in trace.splitlines())
    best = json.loads((tmp_path / "s" / "best.json").read_text())
    assert best["validation_accuracy"] == result.accuracy >= result.base_accuracy
    assert best["calls"] == result.calls and best["variant"]["name"] == "plain+search"
    with_test = load_task(write_task(tmp_path / "t2"), splits=("train", "validation", "test"))
    with pytest.raises(ValueError, match="never looks at the test split"):
        search(model, tok, with_test, Variant("plain"), SearchConfig(**SMALL), tmp_path / "s2")


def test_a_resumed_search_ends_where_an_uninterrupted_one_does(long_context, task, tmp_path, monkeypatch):
    tok, model, _ = long_context
    config = SearchConfig(**SMALL)
    full = search(model, tok, task, Variant("plain"), config, tmp_path / "full", report=lambda _: None)
    lines = (tmp_path / "full" / "trace.jsonl").read_text().splitlines(keepends=True)
    assert len(lines) > 5
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "trace.jsonl").write_text("".join(lines[:4]))  # the header and three steps
    computed = []
    real = prompt_search.Trace.step

    def counting(self, key, calls, compute):
        if key not in self.steps:
            computed.append(key)
        return real(self, key, calls, compute)
    monkeypatch.setattr(prompt_search.Trace, "step", counting)
    resumed = search(model, tok, task, Variant("plain"), config, tmp_path / "cut", report=lambda _: None)
    assert len(computed) == len(lines) - 4  # only what the cut trace lacked
    assert (resumed.best, resumed.accuracy, resumed.calls, resumed.candidates) == \
        (full.best, full.accuracy, full.calls, full.candidates)
    assert [json.loads(x)["key"] for x in (tmp_path / "cut" / "trace.jsonl").read_text().splitlines()] == \
        [json.loads(x)["key"] for x in lines]
    with pytest.raises(Exception, match="a search with other settings, another starting prompt, model or data"):
        search(model, tok, task, Variant("plain"), SearchConfig(**{**SMALL, "rounds": 3}), tmp_path / "cut")


def test_the_budget_of_calls(long_context, task, tmp_path):
    tok, model, _ = long_context
    n_val = len(task.validation)
    with pytest.raises(ValueError, match="cannot score even the starting prompt"):
        search(model, tok, task, Variant("plain"), SearchConfig(**SMALL, max_calls=n_val - 1), tmp_path / "a")
    with pytest.raises(ValueError, match="max_calls must be >= 1"):
        search(model, tok, task, Variant("plain"), SearchConfig(**SMALL, max_calls=0), tmp_path / "b")
    said = []
    result = search(model, tok, task, Variant("plain"), SearchConfig(**SMALL, max_calls=n_val + 2), tmp_path / "c",
                    report=said.append)
    assert result.stopped_by_budget and result.calls <= n_val + 2 and said[-1].startswith("budget reached (5 model calls")
    assert json.loads((tmp_path / "c" / "best.json").read_text())["stopped_by_budget"]


GOOD = {"Paris", "Oslo"}


def _scripted(monkeypatch, proposals):
    """Validation accuracy from the variant alone: +0.3 for the instruction "good", +0.2 per demonstration
    answered Paris or Oslo, -0.1 per other; every train record counts as answered correctly."""
    def fake_eval(model, tok, v, task, records, **kw):
        if records is not task.validation:
            return SimpleNamespace(accuracy=1.0, records=[{"score": 1.0, "prompt_tokens": 5}] * len(records))
        acc = 0.2 + 0.3 * (v.system == "good") + sum(0.2 if d["answer"] in GOOD else -0.1 for d in v.demos or [])
        return SimpleNamespace(accuracy=round(acc, 6), records=[])
    monkeypatch.setattr(prompt_search, "evaluate_variant", fake_eval)
    asked = []

    def fake_sample(model, tok, text, n, seed):
        asked.append(text)
        return {"instructions": proposals.pop(0)[:n], "tokens": 7 * n}
    monkeypatch.setattr(prompt_search, "_sample", fake_sample)
    return asked


def test_ape_resamples_the_best_and_demos_are_kept_only_when_they_help(long_context, task, tmp_path, monkeypatch):
    tok, model, _ = long_context
    asked = _scripted(monkeypatch, [["meh", "good"], ["good", "better?"]])
    config = SearchConfig(rounds=2, candidates=2, keep=1, demo_candidates=12, max_demos=2, seed=0)
    result = search(model, tok, task, Variant("plain"), config, tmp_path / "s", report=lambda _: None)
    assert asked[0].startswith("I gave a friend an instruction and 5 inputs")
    assert "Input: good" in asked[1]  # round 2 resamples the best of round 1
    demos = [d["answer"] for d in result.best.demos]
    assert result.best.system == "good" and set(demos) <= GOOD and len(demos) == 2
    tried = [c for c in result.candidates if c["stage"].startswith("demos")]
    assert any(d["answer"] not in GOOD for c in tried for d in c["variant"].get("demos", []))  # tried, not kept
    assert result.accuracy == pytest.approx(0.2 + 0.3 + 0.4) and result.base_accuracy == pytest.approx(0.2)


def test_a_torn_last_line_is_redone_and_a_larger_budget_continues(long_context, task, tmp_path):
    tok, model, _ = long_context
    n_val = len(task.validation)
    small = search(model, tok, task, Variant("plain"), SearchConfig(**SMALL, max_calls=3 * n_val), tmp_path / "s",
                   report=lambda _: None)
    assert small.stopped_by_budget
    trace = tmp_path / "s" / "trace.jsonl"
    lines = trace.read_text().splitlines(keepends=True)
    trace.write_text("".join(lines[:-1]) + lines[-1][:25])  # a crash in the middle of the last append
    full = search(model, tok, task, Variant("plain"), SearchConfig(**SMALL), tmp_path / "s", report=lambda _: None)
    assert not full.stopped_by_budget and full.calls > small.calls
    fresh = search(model, tok, task, Variant("plain"), SearchConfig(**SMALL), tmp_path / "fresh", report=lambda _: None)
    assert (full.best, full.accuracy, full.calls, full.tokens) == (fresh.best, fresh.accuracy, fresh.calls, fresh.tokens)
    assert all(line.endswith("\n") for line in trace.read_text().splitlines(keepends=True))


def test_the_token_budget_and_another_model_on_the_same_trace(long_context, model, tok, task, tmp_path):
    tok_long, model_long, _ = long_context
    first = search(model_long, tok_long, task, Variant("plain"), SearchConfig(**SMALL, max_tokens=1), tmp_path / "s",
                   report=lambda _: None)
    assert first.stopped_by_budget and len(first.candidates) == 1 and first.tokens > 1  # the start, then no step
    with pytest.raises(Exception, match="another starting prompt, model or data"):
        search(model, tok, task, Variant("plain"), SearchConfig(**SMALL), tmp_path / "s")  # the 256-context model


def test_bootstrapping_from_a_prompt_with_shots(long_context, task, tmp_path):
    """The train records answered while bootstrapping are left out of their own shots (no leak error)."""
    tok, model, _ = long_context
    start = Variant("two-similar", shots=2)
    result = search(model, tok, task, start, SearchConfig(**{**SMALL, "method": "bootstrap"}), tmp_path / "s",
                    report=lambda _: None)
    assert result.candidates[0]["variant"] == start.to_json()
    assert any(c["stage"] == "demos 0" for c in result.candidates)  # the zero-shot base the demos are added to
