"""`minicustom ladder`: the climb stops at the first rung reaching the target on validation, trains nothing
when a prompt rung reaches it, reuses the rungs already climbed, keeps to its time budget, refuses bad
targets and other settings on the same folder; and one real climb on a tiny model (worker processes)."""

import json

import pytest
from test_prompt_library import write_task

from minicustom import ladder as ladder_module
from minicustom.cli import main
from minicustom.cli_common import CommandError
from minicustom.compare import CompareConfig
from minicustom.ladder import LadderError, check_target, ladder


@pytest.mark.parametrize("target, budget, message", [
    (0, None, r"--target is a validation accuracy in \(0, 1\], got 0"),
    (1.5, None, r"in \(0, 1\], got 1.5"),
    (0.5, 0, "--budget-minutes must be > 0, got 0"),
])
def test_bad_targets_and_budgets(target, budget, message):
    with pytest.raises(ValueError, match=message):
        check_target(target, budget)


VALIDATION = {"zero-shot": 0.3, "few-shot": 0.6, "cot": 0.5, "prompt-search": 0.7, "prompt": 0.8, "lora": 0.95,
              "qlora": 0.97, "full": 0.99}
TEST: dict[str, float] = {}  # a rung's test accuracy when not validation - 0.1


@pytest.fixture
def scripted(setup, tmp_path, monkeypatch):
    """A ladder whose rungs are scripted: each "run" writes the rung's row with VALIDATION's accuracy, 60 s."""
    _, path = setup
    folder = write_task(tmp_path / "task")
    ran = []

    def fake_worker(rung, model_path, task_folder, out, config, search_config):
        ran.append(rung)
        (out / rung).mkdir(parents=True)
        row = {"rung": rung, "validation_accuracy": VALIDATION[rung], "accuracy": TEST.get(rung, VALIDATION[rung] - 0.1),
               "trainable_params": 0 if rung in ("zero-shot", "few-shot", "cot", "prompt-search") else 1000,
               "seconds": 60.0, "peak_mb": 900, "artifact": str(out / rung / "x")}
        (out / rung / "result.json").write_text(json.dumps(row))
    monkeypatch.setattr(ladder_module, "_run_worker", fake_worker)

    def climb(target, report=lambda _: None, **kw):
        return ladder(path, folder, tmp_path / "out", target, config=CompareConfig(examples=4), report=report, **kw)
    return climb, ran


def test_a_target_the_prompts_reach_trains_nothing(scripted):
    climb, ran = scripted
    result = climb(0.55)
    assert ran == ["zero-shot", "few-shot"] and result.reached == "few-shot" and result.stopped == "target reached"


def test_the_climb_stops_at_the_first_training_rung_reaching_the_target_and_reuses_what_it_climbed(scripted,
                                                                                                  tmp_path):
    climb, ran = scripted
    result = climb(0.75)
    assert ran == ["zero-shot", "few-shot", "cot", "prompt-search", "prompt"] and result.reached == "prompt"
    ran.clear()
    said = []
    result = climb(0.9, report=said.append)
    assert ran == ["lora"] and result.reached == "lora"  # the five rungs below are reused, not run again
    assert sum("reusing" in s for s in said) == 5
    assert [r["rung"] for r in result.rows] == ["zero-shot", "few-shot", "cot", "prompt-search", "prompt", "lora"]
    md = (tmp_path / "out" / "ladder.md").read_text()
    assert "reached by **lora**" in md and "| lora | 0.950 | 0.850 |" in md


def test_test_accuracy_never_decides(scripted, monkeypatch):
    """few-shot's test accuracy (0.9) reaches the target, its validation accuracy (0.6) does not: the climb
    goes on to the first rung whose validation accuracy reaches it."""
    climb, ran = scripted
    monkeypatch.setitem(TEST, "few-shot", 0.9)
    result = climb(0.65)
    assert result.reached == "prompt-search" and ran == ["zero-shot", "few-shot", "cot", "prompt-search"]


def test_the_time_budget_and_a_target_no_rung_reaches(scripted):
    climb, ran = scripted
    result = climb(1.0, budget_minutes=2.5)  # 60 s a rung: the fourth does not start
    assert ran == ["zero-shot", "few-shot", "cot"] and result.reached is None and result.stopped == "budget spent"
    result = climb(1.0)
    assert result.stopped == "top of the ladder" and len(result.rows) == 8


def test_other_settings_on_the_same_folder_are_refused(scripted, setup, tmp_path):
    climb, _ = scripted
    climb(0.55)
    with pytest.raises(LadderError, match="a ladder with other settings"):
        ladder(setup[1], tmp_path / "task", tmp_path / "out", 0.9, config=CompareConfig(examples=8))
    (tmp_path / "compare" / "zero-shot").mkdir(parents=True)  # e.g. compare's folder: not reused as rungs
    (tmp_path / "compare" / "zero-shot" / "result.json").write_text('{"method": "zero-shot", "accuracy": 1.0}')
    with pytest.raises(LadderError, match="already holds files that are not a ladder's"):
        ladder(setup[1], tmp_path / "task", tmp_path / "compare", 0.9)
    assert not (tmp_path / "compare" / "settings.json").exists()


def test_the_command_line_refuses_a_target_outside_0_1(setup, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["ladder", "--task", str(tmp_path), "--target", "0", "--out", str(tmp_path / "o")])
    assert "in (0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ladder", "--task", str(tmp_path), "--target", "0.5", "--out", str(tmp_path / "o"), "--search-calls", "0"])
    assert ">= 1" in capsys.readouterr().err
    with pytest.raises(CommandError, match="no validation.jsonl"):
        main(["ladder", "--model", str(setup[1]), "--task", str(write_task(tmp_path / "t", validation=False)),
              "--target", "0.5", "--out", str(tmp_path / "o")])


@pytest.mark.slow  # two worker processes, one of them trains
def test_a_real_climb_on_a_tiny_model(setup, tmp_path, capsys):
    _, path = setup
    folder = write_task(tmp_path / "task")
    main(["ladder", "--model", str(path), "--task", str(folder), "--target", "1", "--out", str(tmp_path / "out"),
          "--up-to", "prompt", "--examples", "4", "--epochs", "1", "--search-calls", "12"])
    out = capsys.readouterr().out
    assert "| zero-shot |" in out and "| prompt |" in out
    rows = json.loads((tmp_path / "out" / "ladder.json").read_text())["rows"]
    assert [r["rung"] for r in rows] == ["zero-shot", "few-shot", "cot", "prompt-search", "prompt"]
    assert json.loads((tmp_path / "out" / "zero-shot" / "prompt.json").read_text()) == {"name": "zero-shot"}
    assert (tmp_path / "out" / "prompt" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "out" / "prompt-search" / "search" / "trace.jsonl").is_file()
    for r in rows:
        assert 0 <= r["validation_accuracy"] <= 1 and 0 <= r["accuracy"] <= 1 and r["peak_mb"] > 0
