"""The comparison harness on a tiny model and a tiny task: one row per method, files written, results
reused after an interruption, errors named."""

import json

import pytest
from conftest import CITIES

import minicustom as mc
from minicustom.cli import main
from minicustom.compare import CompareConfig, CompareError, compare, load_task, markdown
from minicustom.data import DataError

SYSTEM = "Answer with the name of the city only."


def record(i, city):
    return {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": f"Which city is mentioned? Trip {i} went to {city}."},
                         {"role": "assistant", "content": city}], "answer": city}


@pytest.fixture(scope="module")
def task(setup, tmp_path_factory):
    folder = tmp_path_factory.mktemp("task")
    train = [record(i, c) for i, c in enumerate(CITIES)]
    test = [record(100 + i, c) for i, c in enumerate(CITIES[:4])]
    prefs = [{"prompt": r["messages"][:2], "chosen": [r["messages"][2]],
              "rejected": [{"role": "assistant", "content": CITIES[(i + 1) % len(CITIES)]}]} for i, r in enumerate(train)]
    for name, rows in (("train", train), ("test", test), ("prefs_train", prefs)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "task.json").write_text(json.dumps({"name": "tiny-city", "scorer": "exact", "max_new_tokens": 4}))
    return folder


@pytest.mark.slow  # a worker process per method
def test_rows_files_and_reuse(setup, task, tmp_path):
    _, path = setup
    config = CompareConfig(examples=8, epochs=1, batch_size=4, shots=2, r=4)
    methods = ["zero-shot", "few-shot", "lora", "dpo"]
    said = []
    rows = compare(path, task, tmp_path, methods, config, report=said.append)
    assert [r["method"] for r in rows] == methods
    model = mc.load_model(path)
    mc.apply_lora(model, r=4, alpha=16, targets="all-linear", verbose=False)
    lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    by = {r["method"]: r for r in rows}
    assert by["zero-shot"]["trainable_params"] == by["few-shot"]["trainable_params"] == 0
    assert by["lora"]["trainable_params"] == by["dpo"]["trainable_params"] == lora_params
    assert by["zero-shot"]["train_tokens"] == 0 and by["lora"]["train_tokens"] > 0
    assert by["dpo"]["train_tokens"] > by["lora"]["train_tokens"]  # SFT, then DPO on top
    assert by["few-shot"]["prompt_tokens"] > by["zero-shot"]["prompt_tokens"]  # the shots are in the prompt
    for r in rows:
        assert r["n_test"] == 4 and 0 <= r["accuracy"] <= 1 and r["peak_mb"] > 0
        assert r["latency_p95_s"] >= r["latency_p50_s"] > 0 and r["tokens_per_s"] > 0
        assert 0 <= r["token_f1"] <= 1 and 0 <= r["rouge_l"] <= 1
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["rows"] == rows and saved["task"] == "tiny-city"
    md = (tmp_path / "comparison.md").read_text()
    assert all(f"| {m} |" in md for m in methods) and "| ROUGE-L | p50 / p95 latency (s) |" in md
    old = {k: v for k, v in rows[0].items() if k not in ("token_f1", "rouge_l", "latency_p50_s")}
    p95, rate = rows[0]["latency_p95_s"], rows[0]["tokens_per_s"]  # a row of an older result.json: dashes
    assert markdown([old], "t", 4).splitlines()[-1].endswith(f"| – | – | – / {p95:.2f} | {rate:.0f} | – |")
    assert (tmp_path / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    answers = [json.loads(line) for line in (tmp_path / "lora" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 4 and all("output" in a for a in answers)

    # a second run with the same OUT reuses every finished method (no worker is started)
    said.clear()
    again = compare(path, task, tmp_path, methods, config, report=said.append)
    assert again == rows and sum("reusing" in s for s in said) == len(methods)


def test_errors(setup, task, tmp_path):
    _, path = setup
    with pytest.raises(ValueError, match="unknown method"):
        compare(path, task, tmp_path, ["lora", "magic"])
    with pytest.raises(DataError, match="not a task folder"):
        load_task(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "task.json").write_text(json.dumps({"scorer": "bleu"}))
    with pytest.raises(DataError, match="'scorer' must be"):
        load_task(bad)
    with pytest.raises(CompareError, match="error.txt"):  # the worker fails: its stderr is kept
        compare(tmp_path / "no-model", task, tmp_path / "out", ["zero-shot"])
    assert (tmp_path / "out" / "zero-shot" / "error.txt").read_text()


@pytest.mark.slow  # a worker process per method
def test_cli(setup, task, tmp_path, capsys):
    _, path = setup
    main(["compare", "--model", str(path), "--task", str(task), "--out", str(tmp_path), "--methods",
          "zero-shot,ia3", "--examples", "4", "--epochs", "1", "--test-limit", "2"])
    out = capsys.readouterr().out
    assert "| zero-shot |" in out and "| ia3 |" in out
    with pytest.raises(SystemExit, match="unknown method"):
        main(["compare", "--model", str(path), "--task", str(task), "--out", str(tmp_path), "--methods", "x"])
