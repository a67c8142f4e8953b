"""train --log tensorboard: the event file's scalars, read back with tensorboard's own reader, are
metrics.jsonl's numbers (as float32, the type TensorBoard stores)."""

import json

import numpy as np
import pytest

from minicustom.cli import main
from minicustom.train.loop import TrainConfig

pytest.importorskip("tensorboard")


def test_event_scalars_equal_metrics_jsonl(setup, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, path = setup
    out = tmp_path / "run"
    main(["train", "sft", "--model", str(path), "--data", str(root / "train.jsonl"), "--eval-data",
          str(root / "eval.jsonl"), "--out", str(out), "--max-length", "256", "--batch-size", "2", "--max-steps", "4",
          "--eval-every", "2", "--exact-match", "2", "--max-new-tokens", "4", "--log", "tensorboard"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    expected = {}
    for row in rows:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                expected.setdefault(key, []).append((row["step"], np.float32(value)))
    assert sorted(events.Tags()["scalars"]) == sorted(expected)
    assert "eval_loss" in expected and expected["eval_loss"][0][0] == 0  # the starting point is logged too
    for key, points in expected.items():
        got = [(e.step, np.float32(e.value)) for e in events.Scalars(key)]
        assert got == points, key


def test_an_unknown_log_is_refused():
    with pytest.raises(ValueError, match="log must be jsonl or tensorboard"):
        TrainConfig(log="wandb")


def test_without_tensorboard_the_run_is_refused_before_anything_loads(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ImportError, match="pip install tensorboard"):
        TrainConfig(log="tensorboard")
