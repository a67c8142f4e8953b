"""The `minicustom` command on a tiny random model with a real (trained) tokenizer."""

import subprocess
import sys

import pytest
import torch
from conftest import make_checkpoint, write_tokenizer

import minicustom as mc
from minicustom.cli import main


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli")
    write_tokenizer(path)
    vocab = len(mc.load_tokenizer(path))
    make_checkpoint(path, "smollm", vocab_size=vocab, eos_token_id=mc.load_tokenizer(path).eos_token_id)
    return path


def test_generate_streams_the_greedy_answer(folder, capsys):
    main(["generate", "--model", str(folder), "--prompt", "Hello there", "--max-new-tokens", "12"])
    printed = capsys.readouterr().out
    tok, model = mc.load_tokenizer(folder), mc.load_model(folder)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello there"}], add_generation_prompt=True)
    out = model.generate(torch.tensor([ids]), 12, stop=[tok.eos_token_id])
    assert printed == tok.decode(out[0, len(ids):], skip_special_tokens=True) + "\n"


def test_chat_keeps_history(folder, monkeypatch, capsys):
    lines = iter(["first question", "", "second question", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    main(["chat", "--model", str(folder), "--max-new-tokens", "5", "--system", "Be brief."])
    assert capsys.readouterr().out.count("model> ") == 2


def test_empty_prompt_is_an_error(folder):
    with pytest.raises(SystemExit, match="empty prompt"):
        main(["generate", "--model", str(folder), "--prompt", "   "])


def test_bad_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no config.json"):
        main(["generate", "--model", str(tmp_path), "--prompt", "hi"])


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "minicustom.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("generate", "chat", "merge", "convert-gguf", "fetch-demo-model"):
        assert command in out.stdout


def test_adapter_on_generate_and_merge(folder, tmp_path, capsys):
    """generate --adapter equals generating from the model with the adapter; merge writes a plain
    checkpoint (with the tokenizer) that generates the same answer without the adapter."""
    model = mc.apply_lora(mc.load_model(folder), r=4, alpha=8, verbose=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(n)))
    mc.save_adapter(model, tmp_path / "adapter")
    args = ["--prompt", "Hello there", "--max-new-tokens", "12"]
    main(["generate", "--model", str(folder), *args])
    plain = capsys.readouterr().out
    main(["generate", "--model", str(folder), "--adapter", str(tmp_path / "adapter"), *args])
    adapted = capsys.readouterr().out
    assert adapted != plain
    main(["merge", "--model", str(folder), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "merged")
    assert (tmp_path / "merged" / "tokenizer.json").exists()
    main(["generate", "--model", str(tmp_path / "merged"), *args])
    assert capsys.readouterr().out == adapted
    with pytest.raises(SystemExit, match="merge needs --adapter"):
        main(["merge", "--model", str(folder), "--out", str(tmp_path / "x")])
