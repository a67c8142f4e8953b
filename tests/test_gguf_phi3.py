"""GGUF import of the phi3 architecture: tiny random Phi-3 checkpoints written by transformers, turned into
GGUF files the way llama.cpp's convert_hf_to_gguf lays Phi-3 out (fused attn_qkv and ffn_up kept fused, the
rotary width as rope.dimension_count, longrope's factors as rope_factors_short/long tensors, a SentencePiece
vocabulary with scores), then converted by minicustom. Oracles: transformers' own GGUF loader (weights and
tokenizer; it knows neither partial rotary nor longrope) and the transformers model the file was written
from (logits, for the Phi-4-mini-like file too). Weights are F32 in the file, so every comparison is exact.
"""

import gguf
import numpy as np
import pytest
import torch
from conftest import make_checkpoint
from safetensors.torch import load_file

import minicustom as mc
from minicustom.gguf import convert_gguf

PIECES = ["\u2581h", "el", "lo", "\u2581hel", "\u2581hello", "\u2581w", "or", "ld", "\u2581world", "\u2581", "\u2581the",
          "\u2581a", "\u2581is", "in", "\u2581in", "s", "e", "l", "o", "h", "w", "r", "d", "t", "a", "i", "n",
          "\u2581\u2581", "<|user|>", "<|assistant|>", "<|end|>"]


def _vocab(V):
    """<unk>, <s>, </s>, the 256 byte tokens, the pieces, then filler pieces up to V; scores rank the pieces
    (longer first), as SentencePiece's log-probabilities do."""
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *PIECES]
    tokens += [f"\u2581x{i}" for i in range(V - len(tokens))]
    types = [2, 3, 3, *[6] * 256, *[1] * (len(PIECES) - 3), 3, 3, 3, *[1] * (V - 259 - len(PIECES))]
    scores = [0.0] * 259 + [-float(i) / (1 + len(t)) for i, t in enumerate(tokens[259:])]
    return tokens, types, scores


def write_phi3_gguf(path, hf):
    c, sd = hf.config, {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    rope = c.rope_parameters
    head_dim = c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), "phi3")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    w.add_rope_scaling_orig_ctx_len(c.original_max_position_embeddings)
    tokens, types, scores = _vocab(c.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)  # transformers' Phi3Config would default to 32000, outside this vocabulary
    w.add_add_bos_token(True)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output", "mlp.gate_up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for key, array in sd.items():
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if key.startswith("model.layers."):
            i, rest = key.removeprefix("model.layers.").split(".", 1)
            module, _, kind = rest.rpartition(".")
            key_out = f"blk.{i}.{layer[module]}.{kind}"
        else:
            key_out = names[key]
        w.add_tensor(key_out, np.ascontiguousarray(array))
    if rope.get("rope_type") == "longrope":
        w.add_tensor("rope_factors_short.weight", np.asarray(rope["short_factor"], dtype=np.float32))
        w.add_tensor("rope_factors_long.weight", np.asarray(rope["long_factor"], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tokens


@pytest.mark.parametrize("family", ["phi3", "phi4mini"])
def test_phi3_gguf_converts_to_the_model_it_was_written_from(tmp_path, family):
    """Phi-3 and a Phi-4-mini-like file (3/4 rotary, longrope factors, original context 8): logits of the
    converted folder equal the source model's, within the original context and past it."""
    _, hf = make_checkpoint(tmp_path / "hf", family, vocab_size=320)
    write_phi3_gguf(tmp_path / "tiny.gguf", hf)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out", progress=False)
    model = mc.load_model(out)
    c = model.config
    assert c.fused_projections and c.rotary_dim == (12 if family == "phi4mini" else 16)
    assert (c.rope_scaling or {}).get("rope_type") == ("longrope" if family == "phi4mini" else None)
    for T in (6, 20):  # within phi4mini's original context of 8 (short factors), and past it (long ones)
        ids = torch.randint(3, 320, (2, T), generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_phi3_weights_and_tokenizer_equal_transformers_gguf_loader(tmp_path):
    import transformers

    _, hf = make_checkpoint(tmp_path / "hf", "phi3", vocab_size=320)
    write_phi3_gguf(tmp_path / "tiny.gguf", hf)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out", progress=False)
    ours = load_file(out / "model.safetensors")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    assert set(ours) == set(theirs.state_dict())
    for name, t in theirs.state_dict().items():
        assert torch.equal(ours[name], t), name
    tok = mc.load_tokenizer(out)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    for text in ("hello world", " hello  the world is in", "<|user|>hello<|end|><|assistant|>", "héllo ✓ 日本",
                 "ask in the world\nworld"):
        assert tok.encode(text) == ref(text)["input_ids"], text
        assert tok.decode(tok.encode(text)[1:]) == ref.decode(ref(text)["input_ids"][1:]), text
