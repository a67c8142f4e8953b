"""Runs that can be resumed, and say so: checkpoints by default, a record of the run in each (options, base
model, data) checked on --resume, changed options applied and printed, a torn metrics line and a half-written
checkpoint cleaned up, and Ctrl-C leaving a checkpoint the run resumes from, bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_checkpoint, write_tokenizer
from safetensors.torch import load_file
from test_cli_errors import fails, snapshot

import minicustom as mc
from minicustom.cli import main
from minicustom.data import load_examples
from minicustom.methods import apply_method
from minicustom.train import TrainConfig, train
from minicustom.train.state import Interrupted, TrainingError, default_save_every

ROOT = Path(__file__).parents[1]


def sft(setup, out, *extra, data=None, model=None):
    root, path = setup
    return [str(a) for a in ["train", "sft", "--model", model or path, "--data", data or root / "train.jsonl", "--out",
                             out, "--max-length", "128", "--batch-size", "2", "--exact-match", "0", "--schedule",
                             "constant", "--dropout", "0.1", "--seed", "2", *extra]]


def metrics(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def same_weights(a, b):
    wa, wb = load_file(Path(a) / "adapter_model.safetensors"), load_file(Path(b) / "adapter_model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def lora_run(setup):
    root, path = setup
    tok = mc.load_tokenizer(path)
    model = mc.load_model(path)
    torch.manual_seed(0)
    apply_method(model, "lora", r=2, dropout=0.1)
    return model, load_examples(root / "train.jsonl", tok, max_length=128, report=lambda *a: None)


def test_checkpoints_by_default(setup, tmp_path):
    """No save_every: a checkpoint every tenth of the run and at the end, each recording the run."""
    assert [default_save_every(n) for n in (1, 9, 10, 25, 999, 5000)] == [1, 1, 1, 2, 99, 100]
    model, examples = lora_run(setup)
    config = TrainConfig(max_steps=21, batch_size=1, max_length=128, keep_checkpoints=0, exact_match=0)
    train(model, examples, config, tmp_path, options={"method": "lora"})
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("checkpoint-*"))
    assert saved == [f"checkpoint-{s:06d}" for s in [*range(2, 21, 2), 21]]
    run = json.loads((tmp_path / "checkpoints" / "checkpoint-000021" / "state.json").read_text())["run"]
    assert run["config"]["max_steps"] == 21 and run["options"] == {"method": "lora"}
    assert set(run["model"]) == {"architecture", "tensors", "weights"} and len(run["data"]["digest"]) == 64


def test_resume_refuses_another_model_or_data(setup, tmp_path, capsys):
    root, path = setup
    out = tmp_path / "run"
    main(sft(setup, out, "--max-steps", "2"))
    capsys.readouterr()
    before = snapshot(out)
    other_data = tmp_path / "other.jsonl"
    other_data.write_text((root / "train.jsonl").read_text().replace("Paris", "Rome"))
    err = fails(sft(setup, out, "--max-steps", "4", "--resume", data=other_data), capsys)
    assert "the training data differs from the checkpoint's" in err and str(other_data) in err
    assert str(root / "train.jsonl") in err and "checkpoint-000002" in err

    other_model, _ = make_checkpoint(tmp_path / "other-model", "smollm", seed=7, vocab_size=400)
    write_tokenizer(other_model)
    err = fails(sft(setup, out, "--max-steps", "4", "--resume", model=other_model), capsys)
    assert "the base model differs from the checkpoint's" in err and "its weights" in err
    assert str(path) in err  # the checkpoint's base, by name

    err = fails(sft(setup, out, "--max-steps", "4", "--resume", "--method", "rslora"), capsys)
    assert "the checkpoint trained method 'lora', this run asks for 'rslora'" in err
    err = fails(sft(setup, out, "--max-steps", "4", "--resume", "--lora-plus-ratio", "16"), capsys)
    assert "lora_plus_ratio None -> 16.0 changes the optimizer's parameter groups" in err
    err = fails(sft(setup, out, "--max-steps", "4", "--resume", "--r", "4"), capsys)
    assert "lora_A.default.weight has shape (8, 88) in the checkpoint, (4, 88) in this run" in err
    assert snapshot(out) == before


def test_resume_refuses_other_examples_from_the_library(setup, tmp_path):
    model, examples = lora_run(setup)
    config = TrainConfig(max_steps=2, batch_size=2, max_length=128, exact_match=0)
    train(model, examples, config, tmp_path)
    before = snapshot(tmp_path)
    model, examples = lora_run(setup)
    with pytest.raises(TrainingError, match="training data differs from the checkpoint's: same files, so other "
                                            "tokenization options"):
        train(model, examples[:-1], TrainConfig(max_steps=3, batch_size=2, max_length=128), tmp_path, resume=True)
    with pytest.raises(TrainingError, match="no checkpoint to resume from"):
        train(model, examples, config, tmp_path / "new", resume=True)
    assert snapshot(tmp_path) == before and not (tmp_path / "new").exists()


def test_changed_options_are_applied_and_printed(setup, tmp_path, capsys):
    """Before run records, a resume kept the checkpoint's learning rate whatever --lr said."""
    out = tmp_path / "run"
    main(sft(setup, out, "--max-steps", "2", "--lr", "2e-4"))
    capsys.readouterr()
    main(sft(setup, out, "--max-steps", "4", "--lr", "1e-4", "--resume"))
    err = capsys.readouterr().err
    assert "resume: lr 0.0002 -> 0.0001" in err and "resume: max_steps 2 -> 4" in err
    assert [r["lr"] for r in metrics(out)] == [2e-4, 2e-4, 1e-4, 1e-4]


def test_torn_metrics_line_and_half_written_checkpoint(setup, tmp_path, capsys):
    """A kill during a metrics write leaves half a line; during a save, a .tmp folder: the resumed run
    drops and removes them, says so, and ends where the uninterrupted run ends."""
    main(sft(setup, tmp_path / "straight", "--max-steps", "4"))
    out = tmp_path / "torn"
    main(sft(setup, out, "--max-steps", "2"))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "epoch": 1.0, "lo')
    (out / "checkpoints" / ".checkpoint-000003.tmp").mkdir()
    (out / "checkpoints" / ".checkpoint-000003.tmp" / "trainable.safetensors").write_bytes(b"half")
    capsys.readouterr()
    main(sft(setup, out, "--max-steps", "4", "--resume"))
    err = capsys.readouterr().err
    assert f"{out / 'metrics.jsonl'}:3: dropped a torn last line" in err
    assert f"removed {out / 'checkpoints' / '.checkpoint-000003.tmp'}" in err
    assert not list((out / "checkpoints").glob(".*.tmp"))
    assert metrics(out) == metrics(tmp_path / "straight") and [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    assert same_weights(out, tmp_path / "straight")


def test_a_damaged_metrics_line_is_named(setup, tmp_path, capsys):
    out = tmp_path / "run"
    main(sft(setup, out, "--max-steps", "2"))
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text(lines[0] + "garbage\n" + lines[1])
    capsys.readouterr()
    before = snapshot(out)
    err = fails(sft(setup, out, "--max-steps", "3", "--resume"), capsys)
    assert f"{out / 'metrics.jsonl'}:2: not valid JSON" in err
    assert snapshot(out) == before


def test_sigint_saves_at_the_step_boundary(setup, tmp_path):
    """In-process: SIGINT during step 3 -> the step finishes, checkpoint-000003, Interrupted naming it;
    the resumed run is the uninterrupted one, bit for bit (dropout: the RNG state comes back too)."""
    config = TrainConfig(max_steps=6, batch_size=2, max_length=128, exact_match=0, save_every=4)
    model, examples = lora_run(setup)
    straight = train(model, examples, config, tmp_path / "straight")
    previous = signal.getsignal(signal.SIGINT)

    def ctrl_c(step, record):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
    model, examples = lora_run(setup)
    with pytest.raises(Interrupted, match=r"interrupted at step 3 of 6; the run is saved in .*checkpoint-000003"):
        train(model, examples, config, tmp_path / "cut", on_step=ctrl_c)
    assert signal.getsignal(signal.SIGINT) is previous  # the handler is back
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text().strip() == "checkpoint-000003"
    model, examples = lora_run(setup)
    resumed = train(model, examples, config, tmp_path / "cut", resume=True)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert drop(resumed) == drop(straight)


@pytest.mark.slow
def test_ctrl_c_on_the_command_leaves_a_resumable_checkpoint(setup, tmp_path, capsys):
    """`python -m minicustom train sft`, SIGINT after its first step: exit 130 naming the checkpoint and
    the command to continue; --resume then ends with the uninterrupted run's adapter, bit for bit."""
    args = ["--max-steps", "30"]
    main(sft(setup, tmp_path / "straight", *args))
    out = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "minicustom", *sft(setup, out, *args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 120
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    step = len(metrics(out))
    assert 1 <= step < 30 and "Traceback" not in err
    checkpoint = out / "checkpoints" / f"checkpoint-{step:06d}"
    assert last.startswith(f"minicustom train sft: interrupted at step {step} of 30; the run is saved in {checkpoint}")
    assert last.endswith(" --max-steps 30 --resume") and "to continue, run: minicustom train sft" in last
    assert (out / "checkpoints" / "latest").read_text().strip() == checkpoint.name
    assert not (out / "adapter_model.safetensors").exists()
    main(sft(setup, out, *args, "--resume"))
    assert metrics(out) == metrics(tmp_path / "straight")
    assert same_weights(out, tmp_path / "straight")


def test_disk_full_while_saving_a_checkpoint(setup, tmp_path, monkeypatch):
    """safetensors reports a full disk as SafetensorError("... (os error 28)"): the run stops with an OSError
    naming the checkpoint (one line in the CLI), no half-written folder is left, and the previous checkpoint
    is still the latest, so --resume continues from it."""
    from safetensors import SafetensorError

    import minicustom.train.state as run_state

    model, examples = lora_run(setup)
    config = TrainConfig(max_steps=4, save_every=2, batch_size=1, max_length=128, exact_match=0)
    real, calls = run_state.save_file, []

    def full_at_the_second_save(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 2:  # two files per checkpoint: the second checkpoint's first file
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                                  "\"No space left on device\" }) (os error 28)")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(run_state, "save_file", full_at_the_second_save)
    with pytest.raises(OSError) as e:
        train(model, examples, config, tmp_path)
    assert e.value.errno == 28 and e.value.filename == str(tmp_path / "checkpoints" / "checkpoint-000004")
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["checkpoint-000002", "latest"], names
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "checkpoint-000002"
