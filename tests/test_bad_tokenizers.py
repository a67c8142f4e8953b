"""Bad tokenizer folders: tokenizer_config.json that is not an object, not UTF-8 or not JSON; special tokens
and chat templates of the wrong type; a template that does not parse, in either file; a template that
raises or reads a message that is not there. Each ends in one ValueError naming the file (and the field,
or the template line), at load time where the file alone shows it; the folder is left as it was."""

import json
import shutil

import pytest
from conftest import write_tokenizer

import minicustom as mc
from minicustom.tokenizer import TokenizerError

CONFIG = "tokenizer_config.json"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tok"))


def _copy(folder, tmp_path, config=None, raw: bytes | None = None, jinja: str | None = None):
    out = shutil.copytree(folder, tmp_path / "tok")
    if config is not None:
        current = json.loads((out / CONFIG).read_text())
        (out / CONFIG).write_text(json.dumps({**current, **config}))
    if raw is not None:
        (out / CONFIG).write_bytes(raw)
    if jinja is not None:
        (out / "chat_template.jinja").write_text(jinja)
    return out


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _refused(path, file, *words, error=TokenizerError):
    before = _snapshot(path)
    with pytest.raises(error) as e:
        mc.load_tokenizer(path)
    message = str(e.value)
    assert message.startswith(f"{path / file}: ") and "\n" not in message, message
    for word in words:
        assert word in message, (word, message)
    assert _snapshot(path) == before


@pytest.mark.parametrize("config, words", [
    ({"bos_token": 5}, ["'bos_token'", "a string"]),
    ({"eos_token": {"content": 5}}, ["'eos_token'"]),
    ({"pad_token": ["<pad>"]}, ["'pad_token'"]),
    ({"chat_template": 5}, ["'chat_template'"]),
    ({"chat_template": ["x"]}, ["'chat_template'"]),
    ({"chat_template": [{"name": "default"}]}, ["'chat_template'"]),
    ({"clean_up_tokenization_spaces": "false"}, ["'clean_up_tokenization_spaces'", "true or false"]),
    ({"chat_template": "{% for m in messages %}{{ m.content }}"}, ["does not parse", "template line 1"]),
    ({"chat_template": "{{ messages[0].content }\n"}, ["does not parse"]),
])
def test_bad_fields(folder, tmp_path, config, words):
    _refused(_copy(folder, tmp_path, config=config), CONFIG, *words)


@pytest.mark.parametrize("raw, words", [
    (b"[1, 2]", ["a JSON object", "list"]),
    (b'{"bos_token": "\xff"}', ["not UTF-8"]),
    (b'{"bos_token": ', ["not valid JSON"]),
    (b'{"bos_token": "<s>", "bos_token": "<b>"}', ["'bos_token'", "twice"]),
])
def test_config_file_that_is_not_an_object(folder, tmp_path, raw, words):
    _refused(_copy(folder, tmp_path, raw=raw), CONFIG, *words)


def test_jinja_file_that_does_not_parse(folder, tmp_path):
    path = _copy(folder, tmp_path, jinja="hello\n{% if %}\n")
    _refused(path, "chat_template.jinja", "does not parse", "template line 2")
    (path / "chat_template.jinja").write_bytes(b"\xff{{ x }}")
    _refused(path, "chat_template.jinja", "not UTF-8")


@pytest.mark.parametrize("template, words", [
    ("{{ raise_exception('roles must alternate') }}", ["roles must alternate"]),
    ("{{ messages[5].content.upper() }}", ["no element 5"]),
])
def test_template_that_refuses_the_messages(folder, tmp_path, template, words):
    """It parses, so it loads; rendering these messages fails with a ValueError naming the template's file."""
    path = _copy(folder, tmp_path, jinja=template)
    tok = mc.load_tokenizer(path)
    with pytest.raises(ValueError) as e:
        tok.apply_chat_template(MESSAGES)
    message = str(e.value)
    assert message.startswith(f"{path / 'chat_template.jinja'}: the chat_template refused these messages: "), message
    for word in words:
        assert word in message, (word, message)


def test_a_list_of_templates_without_a_default_names_the_folder(folder, tmp_path):
    path = _copy(folder, tmp_path, config={"chat_template": [{"name": "tool_use", "template": "{{ 1 }}"}]})
    with pytest.raises(ValueError, match=rf"^{path / CONFIG}: no chat template"):
        mc.load_tokenizer(path).apply_chat_template(MESSAGES)


def test_through_the_command_line(folder, tmp_path, capsys):
    """`generate` with a template that does not parse: one line naming the file, exit code 2."""
    from conftest import make_checkpoint

    from minicustom.cli import main

    ckpt, _ = make_checkpoint(tmp_path / "model", "llama3")
    for name in ("tokenizer.json", CONFIG):
        shutil.copy(folder / name, ckpt / name)
    (ckpt / "chat_template.jinja").write_text("{% for m in messages %}")
    capsys.readouterr()  # transformers' progress bar while writing the checkpoint
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(ckpt), "--prompt", "hi", "--max-new-tokens", "2"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"minicustom generate: {ckpt / 'chat_template.jinja'}: the chat_template does not parse")
    assert "\n" not in err and "Traceback" not in err
