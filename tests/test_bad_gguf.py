"""Corrupt and malformed GGUF files: each ends in one GGUFError naming the file (and the key or tensor when
known), and convert_gguf leaves its output folder absent, or as it was.

The corrupt files are cut or patched from one tiny valid Llama GGUF written with gguf.GGUFWriter; the byte
positions to patch come from the gguf package's own reader of the valid file, so the tests follow the
layout rather than hard-coded offsets.
"""

import os
import struct

import gguf
import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType, GGUFValueType

from minicustom.gguf import GGUFError, convert_gguf

C, NH, NKV, HS, F = 32, 2, 1, 16, 40
TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "ab"]
T = GGUFValueType


def _metadata():
    return {
        "general.architecture": (T.STRING, "llama"),
        "llama.block_count": (T.UINT32, 1),
        "llama.context_length": (T.UINT32, 64),
        "llama.embedding_length": (T.UINT32, C),
        "llama.feed_forward_length": (T.UINT32, F),
        "llama.attention.head_count": (T.UINT32, NH),
        "llama.attention.head_count_kv": (T.UINT32, NKV),
        "llama.attention.layer_norm_rms_epsilon": (T.FLOAT32, 1e-6),
        "tokenizer.ggml.model": (T.STRING, "gpt2"),
        "tokenizer.ggml.pre": (T.STRING, "smollm"),
        "tokenizer.ggml.tokens": (T.ARRAY, TOKENS, T.STRING),
        "tokenizer.ggml.token_type": (T.ARRAY, [3, 3, 3, 1, 1, 1], T.INT32),
        "tokenizer.ggml.merges": (T.ARRAY, ["a b"], T.STRING),
        "tokenizer.ggml.bos_token_id": (T.UINT32, 1),
        "tokenizer.ggml.eos_token_id": (T.UINT32, 2),
        "tokenizer.ggml.add_bos_token": (T.BOOL, True),
    }


def write_tiny(path, **changes):
    """A tiny valid llama GGUF (F32, F16 and Q8_0 tensors); `changes` replace metadata entries
    (key with dots as '__', value (type, value[, item type]) or None to leave the key out)."""
    rng = np.random.default_rng(0)
    meta = _metadata()
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    w = gguf.GGUFWriter(str(path), None)
    for key, (vtype, value, *sub) in meta.items():
        w.add_key_value(key, value, vtype, *sub)
    V = len(TOKENS)
    tensors = {
        "token_embd.weight": rng.standard_normal((V, C), dtype=np.float32),
        "output_norm.weight": rng.standard_normal(C, dtype=np.float32),
        "blk.0.attn_norm.weight": rng.standard_normal(C, dtype=np.float32),
        "blk.0.ffn_norm.weight": rng.standard_normal(C, dtype=np.float32),
        "blk.0.attn_q.weight": rng.standard_normal((NH * HS, C), dtype=np.float32),
        "blk.0.attn_k.weight": rng.standard_normal((NKV * HS, C), dtype=np.float32),
        "blk.0.attn_v.weight": rng.standard_normal((NKV * HS, C), dtype=np.float32),
        "blk.0.attn_output.weight": rng.standard_normal((C, NH * HS), dtype=np.float32),
        "blk.0.ffn_gate.weight": rng.standard_normal((F, C)).astype(np.float16),
        "blk.0.ffn_down.weight": rng.standard_normal((C, F), dtype=np.float32),
    }
    for name, array in tensors.items():
        w.add_tensor(name, array)
    up = rng.standard_normal((F, C), dtype=np.float32)
    w.add_tensor("blk.0.ffn_up.weight", gguf.quants.quantize(up, GGMLQuantizationType.Q8_0),
                 raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """(bytes of the valid file, its layout: kv offsets by key, tensor-info offsets and data offsets by name)."""
    path = write_tiny(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    reader = gguf.GGUFReader(path)
    layout = {"kv": {k: f.offset for k, f in reader.fields.items() if not k.startswith("GGUF.")},
              "info": {t.name: t.field.offset for t in reader.tensors},
              "data": {t.name: (t.data_offset, t.n_bytes) for t in reader.tensors},
              "data_start": reader.data_offset}
    return path.read_bytes(), layout


def _put(data: bytes, at: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, at, value)
    return bytes(b)


def _value_at(layout, key):
    """Byte position of a key's value type (after its u64 length and its name)."""
    return layout["kv"][key] + 8 + len(key)


def _info_at(layout, name):
    """Byte position of a tensor's n_dims (after its u64 name length and its name)."""
    return layout["info"][name] + 8 + len(name)


def _last_tensor(layout):
    return max(layout["data"], key=lambda n: layout["data"][n][0])


def _rename(data: bytes, at: int, old: str, new: str) -> bytes:
    assert len(old) == len(new) and data[at + 8: at + 8 + len(old)] == old.encode()
    return data[: at + 8] + new.encode() + data[at + 8 + len(new):]


TOK_KEY, Q = "tokenizer.ggml.tokens", "blk.0.attn_q.weight"
# name -> (make the corrupt bytes from (valid bytes, layout), a regex the message must match after the path)
CORRUPTIONS = {
    "empty file": (lambda d, lay: b"", r"not a GGUF file"),
    "magic only": (lambda d, lay: d[:4], r"version .*past the end of the file"),
    "header cut": (lambda d, lay: d[:20], r"kv_count .*past the end of the file"),
    "cut in metadata": (lambda d, lay: d[: lay["kv"][TOK_KEY] + 60], rf"{TOK_KEY}.*past the end of the file"),
    "cut in tensor infos": (lambda d, lay: d[: lay["info"][Q] + 12], r"tensor .*past the end of the file"),
    "cut in tensor data": (lambda d, lay: d[:-100], r"tensor 'blk\.0\.[a-z_]+\.weight'.*past the end of the file"),
    "version 1": (lambda d, lay: _put(d, 4, "<I", 1), r"version 1 .*supported: 2, 3"),
    "version 99": (lambda d, lay: _put(d, 4, "<I", 99), r"version 99 "),
    "big-endian": (lambda d, lay: _put(d, 4, ">I", 3), r"big-endian"),
    "huge tensor count": (lambda d, lay: _put(d, 8, "<Q", 2**63), r"tensor_count=9223372036854775808 .*cannot fit"),
    "huge kv count": (lambda d, lay: _put(d, 16, "<Q", 2**64 - 1), r"kv_count=18446744073709551615 .*cannot fit"),
    "kv count one too many": (lambda d, lay: _put(d, 16, "<Q", len(lay["kv"]) + 1), r"key|tensor|past the end"),
    "tensor count one too many": (lambda d, lay: _put(d, 8, "<Q", len(lay["info"]) + 1), r"tensor"),
    "huge key length": (lambda d, lay: _put(d, lay["kv"]["llama.block_count"], "<Q", 2**60),
                        r"the name of key 1 .*past the end of the file"),
    "unknown value type": (lambda d, lay: _put(d, _value_at(lay, "llama.block_count"), "<I", 99),
                           r"key 'llama\.block_count': unknown value type 99"),
    "huge string length": (lambda d, lay: _put(d, _value_at(lay, "tokenizer.ggml.model") + 4, "<Q", 2**62),
                           r"tokenizer\.ggml\.model.*past the end of the file"),
    "huge array length": (lambda d, lay: _put(d, _value_at(lay, TOK_KEY) + 8, "<Q", 2**62),
                          rf"{TOK_KEY}.*past the end of the file"),
    "unknown array item type": (lambda d, lay: _put(d, _value_at(lay, TOK_KEY) + 4, "<I", 77),
                                rf"key '{TOK_KEY}': unknown array item type 77"),
    "key not UTF-8": (lambda d, lay: _put(d, lay["kv"]["llama.block_count"] + 8, "<B", 0xFF),
                      r"the name of key 1 is not UTF-8"),
    "string value not UTF-8": (lambda d, lay: _put(d, _value_at(lay, "tokenizer.ggml.pre") + 12, "<B", 0xFE),
                               r"tokenizer\.ggml\.pre.*not UTF-8"),
    "duplicate key": (lambda d, lay: _rename(d, lay["kv"]["tokenizer.ggml.eos_token_id"], "tokenizer.ggml.eos_token_id",
                                             "tokenizer.ggml.bos_token_id"),
                      r"key 'tokenizer\.ggml\.bos_token_id' appears twice"),
    "n_dims 0": (lambda d, lay: _put(d, _info_at(lay, Q), "<I", 0), rf"tensor '{Q}': n_dims=0, expected 1 to 4"),
    "n_dims huge": (lambda d, lay: _put(d, _info_at(lay, Q), "<I", 2**31), rf"tensor '{Q}': n_dims=2147483648"),
    "dimension 0": (lambda d, lay: _put(d, _info_at(lay, Q) + 4, "<Q", 0), rf"tensor '{Q}': shape \[0, 32\]"),
    "huge dimension": (lambda d, lay: _put(d, _info_at(lay, Q) + 4, "<Q", 2**40), rf"tensor '{Q}'.*past the end"),
    "unknown ggml type": (lambda d, lay: _put(d, _info_at(lay, Q) + 4 + 16, "<I", 200),
                          rf"tensor '{Q}': unknown ggml type 200"),
    "type not dequantizable": (lambda d, lay: _put(d, _info_at(lay, Q) + 4 + 16, "<I", GGMLQuantizationType.I32),
                               rf"tensor '{Q}': ggml type I32 cannot be dequantized"),
    "rows not whole blocks": (lambda d, lay: _put(d, _info_at(lay, "blk.0.ffn_up.weight") + 4, "<Q", 31),
                              r"tensor 'blk\.0\.ffn_up\.weight': .*multiple of Q8_0's block of 32"),
    "offset past the end": (lambda d, lay: _put(d, _info_at(lay, Q) + 4 + 16 + 4, "<Q", 2**40),
                            rf"tensor '{Q}'.*past the end of the file"),
    "offset not aligned": (lambda d, lay: _put(d, _info_at(lay, Q) + 4 + 16 + 4, "<Q",
                                               lay["data"][Q][0] - lay["data_start"] + 4),
                           rf"tensor '{Q}': data offset \d+ is not a multiple of the alignment 32"),
    "duplicate tensor": (lambda d, lay: _rename(d, lay["info"]["blk.0.attn_k.weight"], "blk.0.attn_k.weight", Q),
                         rf"tensor '{Q}' appears twice"),
    "tensor name not UTF-8": (lambda d, lay: _put(d, lay["info"][Q] + 8, "<B", 0xC3),
                              r"the name of tensor \d+ is not UTF-8"),
}


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()} if folder.exists() else None


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_gguf_is_one_clear_error(tmp_path, valid, case):
    data, layout = valid
    make, match = CORRUPTIONS[case]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(make(data, layout))
    out = tmp_path / "out"
    with pytest.raises(GGUFError) as e:
        convert_gguf(bad, out, progress=False)
    message = str(e.value)
    assert message.startswith(f"{bad}: "), message
    assert "\n" not in message
    assert __import__("re").search(match, message), message
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_valid_tiny_file_converts(tmp_path, valid):
    """The base of the corruptions is itself valid (so each error above comes from its one change)."""
    import minicustom as mc

    (tmp_path / "tiny.gguf").write_bytes(valid[0])
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out", progress=False)
    model = mc.load_model(out)
    assert model.config.hidden_size == C and sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny.gguf"]


def test_converting_over_a_sharded_checkpoint_serves_the_new_weights(tmp_path, valid):
    """A folder that held a sharded checkpoint (index + shards): converting into it removes the old index
    and shards, which load_model would otherwise prefer to the new model.safetensors. The folder follows
    the umask, as any new folder does."""
    import torch

    import minicustom as mc

    (tmp_path / "tiny.gguf").write_bytes(valid[0])
    first = mc.load_model(convert_gguf(tmp_path / "tiny.gguf", tmp_path / "first", progress=False))
    other = mc.load_model(tmp_path / "first")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    mc.save_model(other, tmp_path / "out", max_shard_size=4096)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").glob("model-*")) and not (tmp_path / "out" / "model.safetensors.index.json").exists()
    again = mc.load_model(tmp_path / "out")
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "first").stat().st_mode & 0o777 == 0o777 & ~umask


# -- well-formed files whose metadata is wrong ----------------------------------------------------

BAD_METADATA = {
    "no token list": (dict(tokenizer__ggml__tokens=None), r"tokenizer\.ggml\.tokens is missing"),
    "block_count a string": (dict(llama__block_count=(T.STRING, "1")),
                             r"llama\.block_count must be a positive integer, found '1'"),
    "head_count 0": (dict(llama__attention__head_count=(T.UINT32, 0)),
                     r"llama\.attention\.head_count must be a positive integer, found 0"),
    "rms eps a string": (dict(llama__attention__layer_norm_rms_epsilon=(T.STRING, "1e-6")),
                         r"layer_norm_rms_epsilon must be a number"),
    "bos id outside the vocabulary": (dict(tokenizer__ggml__bos_token_id=(T.UINT32, 99)),
                                      r"tokenizer\.ggml\.bos_token_id=99 is not a token id \(0\.\.5\)"),
    "token list shorter than the embedding": (dict(tokenizer__ggml__tokens=(T.ARRAY, TOKENS[:5], T.STRING),
                                                   tokenizer__ggml__token_type=(T.ARRAY, [3, 3, 3, 1, 1], T.INT32)),
                                              r"5 tokens in tokenizer\.ggml\.tokens but token_embd\.weight has 6 rows"),
    "merge without a space": (dict(tokenizer__ggml__merges=(T.ARRAY, ["ab"], T.STRING)),
                              r"tokenizer\.ggml\.merges: item 0 \('ab'\) is not two tokens"),
    "token types of another length": (dict(tokenizer__ggml__token_type=(T.ARRAY, [3, 3], T.INT32)),
                                      r"tokenizer\.ggml\.token_type has 2 entries, tokenizer\.ggml\.tokens 6"),
    "chat template not a string": (dict(tokenizer__chat_template=(T.UINT32, 5)),
                                   r"tokenizer\.chat_template must be a string"),
}


@pytest.mark.parametrize("case", list(BAD_METADATA))
def test_bad_metadata_is_refused_before_writing(tmp_path, case):
    changes, match = BAD_METADATA[case]
    bad = write_tiny(tmp_path / "bad.gguf", **changes)
    with pytest.raises(GGUFError, match=match) as e:
        convert_gguf(bad, tmp_path / "out", progress=False)
    assert str(e.value).startswith(f"{bad}: ") and "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_failed_conversion_leaves_an_existing_folder_as_it_was(tmp_path, valid):
    """A refused file does not touch a previous conversion at the same place (config.json included), and a
    failure while writing (here: the disk full after the weights) leaves no half-written folder or temp files."""
    good = tmp_path / "good.gguf"
    good.write_bytes(valid[0])
    out = convert_gguf(good, tmp_path / "out", progress=False)
    before = _snapshot(out)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(valid[0][:-100])
    with pytest.raises(GGUFError):
        convert_gguf(bad, out, progress=False)
    assert _snapshot(out) == before

    import minicustom.gguf as mg

    real = mg.atomic_write

    def failing(path, write):  # the weights are written, then the disk fills up
        if path.name == "tokenizer.json":
            raise OSError("No space left on device")
        return real(path, write)

    mp = pytest.MonkeyPatch()
    mp.setattr(mg, "atomic_write", failing)
    try:
        with pytest.raises(OSError, match="No space left"):
            convert_gguf(good, out, progress=False)
        with pytest.raises(OSError, match="No space left"):
            convert_gguf(good, tmp_path / "fresh", progress=False)
    finally:
        mp.undo()
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf", "good.gguf", "out"]
