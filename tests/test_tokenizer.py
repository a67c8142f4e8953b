"""Tokenizer wrapper and chat templates against transformers (test-only oracle), on a tokenizer trained
here: byte-level BPE with a BOS-adding post-processor, like Llama 3's. The real SmolLM2 tokenizer is
covered in test_real_model.py."""

import pytest
from conftest import MIXED, write_tokenizer

import minicustom as mc


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def both(folder):
    import transformers

    return mc.load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)


def test_encode_decode_match_transformers(both):
    ours, theirs = both
    for add in (True, False):
        ids = ours.encode(MIXED, add_special_tokens=add)
        assert ids == theirs.encode(MIXED, add_special_tokens=add)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    assert len(MIXED) > 3000
    assert ours.decode(ours.encode(MIXED, add_special_tokens=False)) == MIXED


def test_special_tokens(both):
    ours, theirs = both
    assert (ours.bos_token, ours.eos_token, ours.pad_token, ours.unk_token) == ("<s>", "<|im_end|>", "</s>", "<unk>")
    assert ours.bos_token_id == theirs.bos_token_id
    assert ours.eos_token_id == theirs.eos_token_id
    assert ours.pad_token_id == theirs.pad_token_id
    assert len(ours) == len(theirs)


MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?  "},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 + 3? 日本"},
]


@pytest.mark.parametrize("gen", [False, True])
def test_chat_template_matches_transformers_and_has_one_bos(both, gen):
    ours, theirs = both
    ids = ours.apply_chat_template(MESSAGES, add_generation_prompt=gen)
    assert ids == theirs.apply_chat_template(MESSAGES, add_generation_prompt=gen, tokenize=True, return_dict=False)
    text = ours.apply_chat_template(MESSAGES, add_generation_prompt=gen, tokenize=False)
    assert text == theirs.apply_chat_template(MESSAGES, add_generation_prompt=gen, tokenize=False)
    assert ids.count(ours.bos_token_id) == 1 and ids[0] == ours.bos_token_id
    assert text.endswith("<|im_start|>assistant\n") == gen


def test_bos_exactly_once_when_text_already_has_it(both):
    ours, _ = both
    text = ours.apply_chat_template(MESSAGES, tokenize=False)
    ids = ours.encode(text)  # the post-processor would add a second <s>
    assert ids.count(ours.bos_token_id) == 1


def test_template_errors_and_bad_messages(both):
    ours, _ = both
    with pytest.raises(Exception, match="unknown role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="message 0 must be a dict with 'role' and 'content'"):
        ours.apply_chat_template([{"text": "hi"}])


def test_template_is_sandboxed(folder, tmp_path):
    import shutil

    shutil.copytree(folder, tmp_path / "evil")
    (tmp_path / "evil" / "chat_template.jinja").write_text("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    # jinja2's SecurityError, reported as the template's refusal, naming the folder
    with pytest.raises(ValueError, match=r"evil/chat_template.jinja: the chat_template refused these messages: .*__class__.* unsafe"):
        mc.load_tokenizer(tmp_path / "evil").apply_chat_template(MESSAGES)


def test_batch_encode_pads_left(both):
    ours, _ = both
    ids, mask = ours.batch_encode(["hi", "a longer line of text"])
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and mask[1].all()
    assert ids[0, 0] == ours.pad_token_id


def test_missing_and_broken_files(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        mc.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer\.json: cannot be read"):
        mc.load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="no chat template"):
        plain = tmp_path / "plain"
        plain.mkdir()
        (plain / "tokenizer.json").write_text((folder / "tokenizer.json").read_text())
        mc.load_tokenizer(plain).apply_chat_template(MESSAGES)
