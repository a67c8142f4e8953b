"""Bad JSONL training data: every bad line ends in one DataError naming the file and the line (and the
field when there is one), for SFT (load_examples) and preference pairs (load_preferences), and reading
writes nothing. The good line 1 before each bad line 2 checks that the line number is the bad one's.
"""

import json

import pytest

from minicustom.data import DataError, LabelTemplate, load_examples, load_preferences, read_jsonl

GOOD = json.dumps({"prompt": "Where is Paris?", "completion": " In France."})
GOOD_PAIR = json.dumps({"prompt": "Where is Paris?", "chosen": " In France.", "rejected": " In Peru."})
USER, ASSISTANT = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}


def _write(tmp_path, second: bytes, first: str = GOOD) -> "Path":  # noqa: F821
    f = tmp_path / "data.jsonl"
    f.write_bytes(first.encode() + b"\n" + second + b"\n")
    return f


def _refused(load, f, match):
    """load(f) raises one DataError starting with 'f:2: ' and matching `match`; the folder is unchanged."""
    before = sorted(p.name for p in f.parent.iterdir())
    with pytest.raises(DataError) as e:
        load(f)
    message = str(e.value)
    assert message.startswith(f"{f}:2: "), message
    assert __import__("re").search(match, message) and "\n" not in message, message
    assert sorted(p.name for p in f.parent.iterdir()) == before


# second line (bytes) -> what the message must say
SFT_CASES = {
    "invalid UTF-8": (b'{"text": "caf\xe9"}', r"not valid UTF-8 \(byte 0xe9 at column 14\)"),
    "truncated UTF-8 sequence": (b'{"text": "\xe6\x97"}', r"not valid UTF-8 \(byte 0xe6 at column 11\)"),
    "lone high surrogate": (b'{"text": "a\\ud800b"}', r"field text holds a lone surrogate \\ud800"),
    "lone low surrogate in a message": (
        json.dumps({"messages": [USER, {"role": "assistant", "content": "x\udc00"}]}).encode(),
        r"field messages\[1\]\.content holds a lone surrogate \\udc00"),
    "lone surrogate in a key": (b'{"text": "a", "\\udbff": 1}', r"a key holds a lone surrogate \\udbff"),
    "deeply nested": (b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", r"not valid JSON \(nested too deeply\)"),
    "a list": (b"[1, 2]", "expected a JSON object, got list"),
    "a string": (b'"text"', "expected a JSON object, got str"),
    "null": (b"null", "expected a JSON object, got NoneType"),
    "not JSON": (b'{"text": "a"', "not valid JSON"),
    "messages not a list": (b'{"messages": "hello"}', "'messages' must be a non-empty list"),
    "messages empty": (b'{"messages": []}', "'messages' must be a non-empty list"),
    "message not an object": (json.dumps({"messages": ["hi", ASSISTANT]}).encode(), "message 0 must have a role"),
    "content not a string": (json.dumps({"messages": [{"role": "user", "content": ["q"]}, ASSISTANT]}).encode(),
                             "message 0 must have a role .* and a string content"),
    "role unknown": (json.dumps({"messages": [{"role": "bot", "content": "q"}, ASSISTANT]}).encode(),
                     r"message 0 must have a role \(system, user or assistant\)"),
    "conversations not a list": (b'{"conversations": 5}', "'conversations' must be a non-empty list"),
    "ShareGPT value not a string": (b'{"conversations": [{"from": "human", "value": 3}]}', "ShareGPT turn"),
    "prompt a number": (b'{"prompt": 5, "completion": "x"}', "'prompt' and 'completion' must both be strings"),
    "completion an object": (b'{"prompt": "q", "completion": {"a": 1}}', "must both be strings or both message lists"),
    "prompt list of numbers": (json.dumps({"prompt": [1], "completion": [ASSISTANT]}).encode(),
                               "message 0 must have a role"),
    "text a number": (b'{"text": 5}', "'text' must be a non-empty string"),
    "Alpaca instruction a list": (b'{"instruction": ["x"], "output": "y"}', "'instruction' must be a string, got list"),
    "Alpaca output a number": (b'{"instruction": "x", "output": 5}', "'output' must be a string, got int"),
    "Alpaca input an object": (b'{"instruction": "x", "input": {"a": 1}, "output": "y"}',
                               "'input' must be a string, got dict"),
}


@pytest.mark.parametrize("case", list(SFT_CASES))
def test_bad_sft_line(tok, tmp_path, case):
    line, match = SFT_CASES[case]
    _refused(lambda f: load_examples(f, tok), _write(tmp_path, line), match)


PAIR_CASES = {
    "invalid UTF-8": (b'{"prompt": "\xff", "chosen": "a", "rejected": "b"}', r"not valid UTF-8 \(byte 0xff"),
    "lone surrogate in chosen": (b'{"prompt": "q", "chosen": " \\udfff", "rejected": " b"}',
                                 r"field chosen holds a lone surrogate \\udfff"),
    "not an object": (b"[]", "expected a JSON object, got list"),
    "chosen a number": (b'{"prompt": "q", "chosen": 1, "rejected": "b"}', "must both be strings or both message lists"),
    "prompt a number": (b'{"prompt": 1, "chosen": "a", "rejected": "b"}', "'prompt' must be a str"),
    "chosen list of numbers": (json.dumps({"prompt": [USER], "chosen": [1], "rejected": [ASSISTANT]}).encode(),
                               "message 1 must have a role"),
    "rejected message without content": (
        json.dumps({"prompt": [USER], "chosen": [ASSISTANT], "rejected": [{"role": "assistant"}]}).encode(),
        "message 1 must have a role .* and a string content"),
    "no rejected": (b'{"prompt": "q", "chosen": "a"}', "needs 'chosen' and 'rejected'"),
}


@pytest.mark.parametrize("case", list(PAIR_CASES))
def test_bad_preference_line(tok, tmp_path, case):
    line, match = PAIR_CASES[case]
    _refused(lambda f: load_preferences(f, tok), _write(tmp_path, line, GOOD_PAIR), match)


@pytest.mark.parametrize("content", [b"", b"\n  \n\r\n"])
def test_empty_file_names_the_file(tmp_path, content):
    f = tmp_path / "empty.jsonl"
    f.write_bytes(content)
    with pytest.raises(DataError, match=rf"^{f}: the dataset is empty \(no JSON line\)$"):
        read_jsonl(f)


def test_template_that_cannot_format_names_line_and_template(tok, tmp_path):
    f = _write(tmp_path, b'{"text": "good", "label": "pos"}', first='{"text": "fine", "label": "neg"}')
    for template, match in ((LabelTemplate("{0}", " {label}"), r"the template '\{0\}' / ' \{label\}' cannot be filled"),
                            (LabelTemplate("{text.upper.x}", " {label}"), "cannot be filled"),
                            (LabelTemplate("{text", " {label}"), "cannot be filled")):
        with pytest.raises(DataError, match=match) as e:
            load_examples(f, tok, template=template)
        assert str(e.value).startswith(f"{f}:1: ")


def test_bom_and_crlf_are_read(tok, tmp_path):
    """A UTF-8 byte-order mark (Windows editors write one) and CRLF line ends are plain text, not errors,
    and line numbers still count lines."""
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\r\n\r\n" + b'{"text": 5}\r\n')
    with pytest.raises(DataError, match=rf"^{f}:3: 'text' must be a non-empty string"):
        load_examples(f, tok)
    f.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\r\n")
    assert [where for where, _ in read_jsonl(f)] == [f"{f}:1"]


def test_valid_surrogate_pair_and_non_ascii_are_accepted(tok, tmp_path):
    """An escaped surrogate *pair* is one character (json joins it), and raw UTF-8 is fine: neither is refused."""
    f = _write(tmp_path, b'{"prompt": "caf\xc3\xa9 \\ud83d\\ude00?", "completion": " oui"}')
    (_, first), (_, second) = read_jsonl(f)
    assert second["prompt"] == "café 😀?" and len(load_examples(f, tok)) == 2
