"""Data pipeline: every format's labels, BOS/EOS rules, errors naming file and line, packing, collation."""

import json
import random

import pytest
import torch
from conftest import TEMPLATE, make_checkpoint, write_tokenizer

import minicustom as mc
from minicustom.data import (
    IGNORE,
    DataError,
    LabelTemplate,
    collate,
    load_examples,
    make_example,
    pack,
    read_jsonl,
)

# The conftest template with the assistant's content and end-of-turn inside {% generation %} blocks, so that
# transformers' return_assistant_tokens_mask gives an independent mask to compare with.
GEN_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] | trim + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|im_end|>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And the capital of France?"},
    {"role": "assistant", "content": "Paris, since 987."},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return mc.load_tokenizer(write_tokenizer(tmp_path_factory.mktemp("tok")))


def example(tok, record, **kw):
    return make_example(record, tok, "test:1", **kw)


def trained_text(tok, ex):
    return tok.decode([y for y in ex.labels if y != IGNORE])


def test_prompt_completion_mask(tok):
    ex = example(tok, {"prompt": "Translate: cat", "completion": " chat"})
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert ex.input_ids == [bos] + tok.encode("Translate: cat chat", add_special_tokens=False) + [eos]
    n_prompt = 1 + len(tok.encode("Translate: cat", add_special_tokens=False))
    assert ex.labels[:n_prompt] == [IGNORE] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]  # completion and EOS, every token
    assert trained_text(tok, ex) == " chat<|im_end|>"
    assert ex.answer_start == n_prompt


def test_text_format_trains_everything_but_position_zero(tok):
    ex = example(tok, {"text": "Tabs and   runs of   spaces."})
    assert ex.input_ids[0] == tok.bos_token_id and ex.input_ids.count(tok.bos_token_id) == 1
    assert ex.labels[0] == IGNORE and ex.labels[1:] == ex.input_ids[1:]
    assert ex.input_ids[-1] == tok.eos_token_id


@pytest.mark.parametrize("inp", ["", "the input"])
def test_alpaca_prompt_is_the_standard_template(tok, inp):
    ex = example(tok, {"instruction": "Do it.", "input": inp, "output": "Done."})
    prompt = tok.decode([i for i, y in zip(ex.input_ids, ex.labels) if y == IGNORE][1:])
    if inp:
        assert prompt == ("Below is an instruction that describes a task, paired with an input that provides "
                          "further context. Write a response that appropriately completes the request.\n\n"
                          "### Instruction:\nDo it.\n\n### Input:\nthe input\n\n### Response:\n")
    else:
        assert prompt == ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\nDo it.\n\n### Response:\n")
    assert trained_text(tok, ex) == "Done.<|im_end|>"


def test_multi_turn_chat_mask_matches_transformers(tok, tmp_path):
    """Our span mask equals the assistant mask transformers derives from {% generation %} blocks."""
    import transformers

    folder = write_tokenizer(tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": GEN_TEMPLATE}))
    ours = mc.load_tokenizer(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    ref = theirs.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ex = example(ours, {"messages": CHAT})
    assert ex.input_ids == list(ref["input_ids"])
    assert [y != IGNORE for y in ex.labels] == [bool(m) for m in ref["assistant_masks"]]
    assert trained_text(ours, ex) == "4<|im_end|>Paris, since 987.<|im_end|>"
    assert ex.input_ids.count(ours.bos_token_id) == 1  # the template writes BOS; nothing adds another


def test_sharegpt_equals_messages(tok):
    roles = {"system": "system", "user": "human", "assistant": "gpt"}
    share = {"conversations": [{"from": roles[m["role"]], "value": m["content"]} for m in CHAT]}
    a, b = example(tok, share), example(tok, {"messages": CHAT})
    assert (a.input_ids, a.labels) == (b.input_ids, b.labels)


def test_conversational_prompt_completion_trains_only_the_completion(tok):
    ex = example(tok, {"prompt": CHAT[:4], "completion": CHAT[4:]})
    assert trained_text(tok, ex) == "Paris, since 987.<|im_end|>"
    full = example(tok, {"messages": CHAT})
    assert ex.input_ids == full.input_ids


def test_chat_option_wraps_prompt_completion_in_the_template(tok):
    ex = example(tok, {"prompt": "Hi?", "completion": "Hello."}, chat=True)
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(
        [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}], tokenize=False)
    assert trained_text(tok, ex) == "Hello.<|im_end|>"


def test_eos_trained_when_pad_is_eos(tmp_path):
    folder = write_tokenizer(tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<|im_end|>"}))
    tok = mc.load_tokenizer(folder)
    assert tok.pad_token_id == tok.eos_token_id
    for record in ({"prompt": "a", "completion": " b"}, {"messages": CHAT}):
        ex = example(tok, record)
        assert ex.labels[ex.input_ids.index(tok.eos_token_id, ex.answer_start)] == tok.eos_token_id


def test_label_template(tok):
    template = LabelTemplate("Review: {text}\nSentiment:", " {label}")
    ex = example(tok, {"text": "great film", "label": "positive"}, template=template)
    assert tok.decode(ex.input_ids[1:ex.answer_start]) == "Review: great film\nSentiment:"
    assert trained_text(tok, ex) == " positive<|im_end|>"
    with pytest.raises(DataError, match=r"test:1: the template needs a field 'label'"):
        example(tok, {"text": "x"}, template=template)


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_errors_name_file_and_line(tok, tmp_path):
    f = write(tmp_path / "d.jsonl", [json.dumps({"text": "ok"}), "", "{not json"])
    with pytest.raises(DataError, match=r"d\.jsonl:3: not valid JSON"):
        read_jsonl(f)
    with pytest.raises(DataError, match="the dataset is empty"):
        read_jsonl(write(tmp_path / "e.jsonl", ["", "  "]))
    with pytest.raises(DataError, match="no such data file"):
        read_jsonl(tmp_path / "missing.jsonl")
    cases = {
        '{"question": "q"}': "unknown record format",
        '{"prompt": "q", "completion": ""}': "empty completion",
        '{"messages": [{"role": "user", "content": "q"}]}': "no assistant turn",
        '{"messages": [{"role": "bot", "content": "q"}]}': "message 0 must have a role",
        '{"conversations": [{"from": "alien", "value": "q"}]}': "ShareGPT turn",
        '[1, 2]': "expected a JSON object",
    }
    for line, message in cases.items():
        f = write(tmp_path / "bad.jsonl", [json.dumps({"text": "fine"}), line])
        with pytest.raises(DataError, match=rf"bad\.jsonl:2: .*{message}"):
            load_examples(f, tok)


def test_truncate_or_drop_and_report(tok, tmp_path):
    long = {"prompt": "x", "completion": " word" * 50}
    f = write(tmp_path / "d.jsonl", [json.dumps(long), json.dumps({"prompt": "a", "completion": " b"})])
    said = []
    cut = load_examples(f, tok, max_length=16, report=said.append)
    assert [len(e) for e in cut] == [16, len(example(tok, {"prompt": "a", "completion": " b"}))]
    assert "1 examples longer than 16 tokens truncated, 0 dropped" in said[0]
    kept = load_examples(f, tok, max_length=16, truncation="drop", report=said.append)
    assert len(kept) == 1 and "0 examples longer than 16 tokens truncated, 1 dropped" in said[1]
    with pytest.raises(DataError, match="no example left"):
        load_examples(write(tmp_path / "l.jsonl", [json.dumps(long)]), tok, max_length=16, truncation="drop")


def test_vocabulary_mismatch(tok, tmp_path):
    f = write(tmp_path / "d.jsonl", [json.dumps({"text": "the quick brown fox"})])
    with pytest.raises(DataError, match=r"d\.jsonl:1: token id \d+ is outside the model's vocabulary of 50"):
        load_examples(f, tok, vocab_size=50)


def best_fit_reference(lengths, cap):
    """Best-fit decreasing, written the slow obvious way."""
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (room[b], b))
            bins[b].append(i)
            room[b] -= lengths[i]
        else:
            bins.append([i])
            room.append(cap - lengths[i])
    return sorted(map(sorted, bins))


def test_pack_is_best_fit_decreasing():
    rng = random.Random(0)
    for _ in range(20):
        lengths = [rng.randint(1, 97) for _ in range(rng.randint(1, 200))]
        bins = pack(lengths, 97)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= 97 for b in bins)
        assert sorted(map(sorted, bins)) == best_fit_reference(lengths, 97)
    with pytest.raises(ValueError, match="more than max_length"):
        pack([5, 100], 97)


def test_collate(tok):
    a, b, c = (example(tok, {"prompt": p, "completion": " ok"}) for p in ("x", "a longer prompt", "mid one"))
    packed = collate([[a, b], [c]], pad_id=0)
    T = len(a) + len(b)
    assert packed["input_ids"].shape == (2, T)
    assert packed["seq_ids"][0].tolist() == [0] * len(a) + [1] * len(b)
    assert packed["seq_ids"][1].tolist() == [0] * len(c) + [-1] * (T - len(c))
    assert (packed["labels"][1, len(c):] == IGNORE).all()
    padded = collate([[a], [b]], pad_id=0)
    assert "seq_ids" not in padded and padded["attention_mask"][0].tolist() == [1] * len(a) + [0] * (len(b) - len(a))
    assert set(collate([[b]], pad_id=0)) == {"input_ids", "labels"}


def test_packed_equals_unpacked_per_document_loss(tmp_path, tok):
    """The summed loss of each document is the same packed with others as alone (block-diagonal mask,
    restarted positions, no target across a document boundary)."""
    from minicustom.losses import sft_loss

    path, _ = make_checkpoint(tmp_path / "m", "mistral", vocab_size=400)  # sliding window 7 as well
    model = mc.load_model(path)
    docs = [example(tok, r) for r in ({"text": "def f(x): return x"}, {"prompt": "Q: why", "completion": " because"},
                                      {"messages": CHAT})]
    batch = collate([docs], pad_id=0)
    h = model.forward_hidden(batch["input_ids"], seq_ids=batch["seq_ids"])
    total, n = sft_loss(h, batch["labels"], model.lm_head)
    alone = [sft_loss(model.forward_hidden(torch.tensor([d.input_ids])), torch.tensor([d.labels]),
                      model.lm_head) for d in docs]
    assert n == sum(k for _, k in alone) == sum(d.trained for d in docs)
    torch.testing.assert_close(total, sum(s for s, _ in alone), rtol=1e-5, atol=1e-5)
    # per document: split the packed per-token losses at the boundaries
    logits = model.lm_head(h)[0, :-1]
    per_token = torch.nn.functional.cross_entropy(logits, batch["labels"][0, 1:], reduction="none")
    start = 0
    for d, (s, _) in zip(docs, alone):
        torch.testing.assert_close(per_token[start:start + len(d) - 1].sum(), s, rtol=1e-5, atol=1e-5)
        start += len(d)


def test_template_that_is_not_prefix_stable_is_refused(tmp_path):
    folder = write_tokenizer(tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    # renders the number of messages up front, so a prefix of the chat does not render as a prefix
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**config, "chat_template": "{{ messages | length }}" + TEMPLATE}))
    tok = mc.load_tokenizer(folder)
    with pytest.raises(DataError, match="does not render conversation prefixes"):
        example(tok, {"messages": CHAT})
