"""A model (an adapter merged in) -> a GGUF file llama.cpp runs; a LoRA adapter -> llama.cpp's LoRA GGUF.

GGUF (gguf.py reads it) holds typed metadata and tensors. `export_gguf` writes what llama.cpp's
convert_hf_to_gguf.py writes for the same checkpoint:
- the architecture's numbers under `<arch>.*` (context length, widths, heads, RMSNorm eps, RoPE base);
- llama.cpp's tensor names (blk.N.attn_q.weight, ...). Llama's q and k rows are permuted: llama.cpp's
  `llama` RoPE rotates interleaved (even, odd) pairs, HF's rotate_half the two halves of a head, so each
  head's rows go from [x0..x(d/2-1), y0..] to [x0, y0, x1, y1, ...] (Mixtral too: it runs as `llama`).
  The other architectures rotate halves in llama.cpp as well (NEOX RoPE): no permutation;
- the tokenizer (SentencePiece-style vocabularies: below): `tokenizer.ggml.model = gpt2` (byte-level
  BPE), the pre-tokenizer's llama.cpp name
  (read from tokenizer.json's regexes), tokens, token types (special added tokens are CONTROL, other
  added ones USER_DEFINED, rows past the vocabulary UNUSED [PADn]), merges, bos/eos/pad ids, whether BOS
  or EOS is added, and the chat template.

Types (`outtype`): 1-D tensors (norms, biases) are always F32, as llama.cpp keeps them. f32 / f16 / bf16
store every matrix so; q8_0 stores matrices as Q8_0 (blocks of 32: one f16 scale d = max|x|/127 and 32
int8 round(x/d)); q4_0 as Q4_0 (one f16 scale d = max/-8 taken at the largest-magnitude value, 32 4-bit
q = round(x/d) + 8 clamped to 15) except the output matrix (lm_head, or the tied embedding), kept at
Q8_0: llama-quantize keeps it at Q6_K, which the gguf package cannot write. The bytes come from the
gguf package's quantizers (`gguf.quants.quantize`), which match llama.cpp's reference C. A matrix whose
rows are not a whole number of blocks falls back to F16, as convert_hf_to_gguf does.

Supported: every model type the loader has, with byte-level BPE vocabularies and RoPE plain, linear, YaRN
(factor and original context; llama.cpp fixes the rest) or llama3 (on Llama: the `rope_freqs` tensor,
band i's frequency divided by f_i = inv_freq_i / scaled inv_freq_i, as convert_hf_to_gguf writes it):
llama, mistral (llama.cpp's `llama`), qwen2, qwen3, phi3 (fused qkv and gate_up as llama.cpp keeps
them), gemma2 and gemma3 (norms stored as 1 + w, caps and the window in the metadata), qwen3_moe and
mixtral (`llama` with experts: each layer's experts stacked into ffn_{gate,up,down}_exps (E, ., .), from
either expert layout). llama.cpp hard-codes parts of some families: Gemma's scores scaled by
head_dim^-1/2, its every 2nd / 6th layer global and local RoPE base of 10000; MoE experts in every layer
with the top-k weights renormalized. A config that says otherwise is refused rather than exported to
compute something else. Vocabularies: byte-level BPE as llama.cpp's "gpt2" (above), and SentencePiece-
style BPE (byte fallback, "▁" for spaces: Llama 2, Mistral, Gemma, Phi-3) as its "llama": pieces, scores
-i in the vocabulary's order (the merge order of such a vocabulary), <0xNN> pieces typed BYTE, and
add_space_prefix when the tokenizer prepends "▁". Refused too, each with an error naming it: other
tokenizers, longrope (llama.cpp picks its factors by the context size, transformers by
the sequence's length). Mistral's sliding window is not carried
(llama.cpp's llama has none).

The file is written beside `out` and renamed into place: an interrupted export leaves no half file.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch

from .files import atomic_write
from .gguf import LAYER_NAMES, require_gguf
from .gguf_vocab import PRE_TOKENIZERS
from .methods.lora_layers import LoraConfig
from .rope import default_inv_freq, scaled_inv_freq

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
EXPORT_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
                        "gemma3_text": "gemma3", "phi3": "phi3", "qwen3_moe": "qwen3moe", "mixtral": "llama"}
_SWA_PERIOD = {"gemma2": 2, "gemma3": 6}  # llama.cpp: layer i slides unless i % period == period - 1
_FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "bf16": 32}  # llama.cpp's LLAMA_FTYPE_*
_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6  # llama.cpp's token types


class ExportError(ValueError):
    """A model, tokenizer or adapter that cannot be written as GGUF: the message names what and why."""


def check_exportable(config, where) -> str:
    """llama.cpp's architecture name for this config, or ExportError naming what llama.cpp would compute
    otherwise (it hard-codes some of what config.json says)."""
    arch = EXPORT_ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise ExportError(f"{where}: model_type {config.model_type!r} cannot be exported to GGUF yet; supported: "
                          f"{', '.join(EXPORT_ARCHITECTURES)}")
    scaling = (config.rope_scaling or {}).get("rope_type", "default")
    if scaling not in ("default", "linear", "yarn") and not (scaling == "llama3" and arch == "llama"):
        raise ExportError(f"{where}: rope_scaling {scaling!r} cannot be exported to GGUF yet (supported: none, "
                          "linear, yarn, and llama3 on Llama)")
    extra = {k: v for k, v in (config.rope_scaling or {}).items() if k not in (
        "rope_type", "type", "factor", "original_max_position_embeddings", "rope_theta")
        and v is not None and (k, v) not in (("beta_fast", 32), ("beta_slow", 1), ("truncate", True))}
    if scaling == "yarn" and extra:  # llama.cpp's YaRN: beta 32 / 1, attention scale 0.1 ln(factor) + 1
        raise ExportError(f"{where}: rope_scaling yarn with {extra} cannot be exported: llama.cpp's YaRN takes the "
                          "factor and the original context only")
    if config.partial_rotary_factor != 1.0 and arch != "phi3":
        raise ExportError(f"{where}: partial_rotary_factor {config.partial_rotary_factor} cannot be exported")
    if config.num_experts and not (all(config.sparse_layers) and config.norm_topk_prob):
        raise ExportError(f"{where}: llama.cpp's {arch} routes every layer through its experts and renormalizes the "
                          f"top-k weights; this model has dense layers or norm_topk_prob false")
    if arch in _SWA_PERIOD:  # llama.cpp's gemma: scores scaled by head_dim^-1/2, a fixed layer pattern, base 1e4
        period = _SWA_PERIOD[arch]
        pattern = ["full_attention" if i % period == period - 1 else "sliding_attention"
                   for i in range(config.num_hidden_layers)]
        for field, found, wanted in (("query_pre_attn_scalar", config.query_pre_attn_scalar, config.head_dim),
                                     ("layer_types", config.layer_types, pattern),
                                     ("rope_local_base_freq", config.rope_local_theta if arch == "gemma3" else None,
                                      10000.0 if arch == "gemma3" else None)):
            if found != wanted:
                raise ExportError(f"{where}: {field} is {found!r}; llama.cpp's {arch} assumes {wanted!r}, so the "
                                  "exported model would compute something else")
    return arch


def gguf_name(hf_name: str, where="the model", arch: str = "llama") -> str:
    """model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight (ExportError for a name llama.cpp lacks)."""
    module, _, kind = hf_name.rpartition(".")
    layer = {hf: name for name, hf in LAYER_NAMES[arch].items()}
    if m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module):
        if m[2] in layer:
            return f"blk.{m[1]}.{layer[m[2]]}.{kind}"
    elif module in _GLOBAL:
        return f"{_GLOBAL[module]}.{kind}"
    raise ExportError(f"{where}: tensor {hf_name} has no llama.cpp {arch} name")


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate_half row order -> llama.cpp's interleaved pairs (the inverse of gguf._unpermute)."""
    hs = w.shape[0] // n_head
    # (nh*hs, ...) -> (nh, 2, hs/2, ...) -> (nh, hs/2, 2, ...) -> (nh*hs, ...)
    return w.reshape(n_head, 2, hs // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


_EXPERT = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(?:(\d+)\.)?"
                     r"(gate_proj|up_proj|down_proj|w1|w3|w2|gate_up_proj)(?:\.weight)?")
_ROUTER = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.gate\.weight")
_EXPERT_PART = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}


def _gguf_tensors(state: dict, config, arch: str, where) -> list[tuple[str, str, torch.Tensor]]:
    """(HF name, llama.cpp name, tensor) in the state's order. MoE experts become one 3-D tensor per layer and
    kind, as llama.cpp holds them: ffn_{gate,up}_exps (E, I, C) and ffn_down_exps (E, C, I), from one module
    per expert or from transformers 5's fused gate_up_proj (E, 2I, C) = [gate; up] and down_proj (E, C, I)."""
    out, experts = [], {}  # out: (HF name, llama.cpp name), or (layer,) for its experts;
    # experts: (layer, part) -> {expert: (I, C) or (C, I)}, or the fused 3-D tensor
    for hf, t in state.items():
        if m := _EXPERT.fullmatch(hf):
            layer, expert, kind = int(m[1]), m[2], m[3]
            if kind == "gate_up_proj":  # (E, 2I, C) -> gate (E, I, C), up (E, I, C)
                experts[layer, "gate"], experts[layer, "up"] = t.chunk(2, dim=1)
            elif expert is None:
                experts[layer, "down"] = t
            else:
                experts.setdefault((layer, _EXPERT_PART[kind]), {})[int(expert)] = t
            if (layer,) not in out:
                out.append((layer,))  # where this layer's experts go in the file
            continue
        if m := _ROUTER.fullmatch(hf):
            out.append((hf, f"blk.{m[1]}.ffn_gate_inp.weight"))  # W_r (E, C)
            continue
        if not hf.endswith((".weight", ".bias")):
            raise ExportError(f"{where}: the model still holds non-plain tensors (e.g. {hf}); merge the adapter or "
                              "dequantize first")
        out.append((hf, gguf_name(hf, where, arch)))
    result = []
    for entry in out:
        if len(entry) == 2:
            result.append((entry[0], entry[1], state[entry[0]]))
            continue
        for part in ("gate", "up", "down"):
            t = experts[entry[0], part]
            t = torch.stack([t[e] for e in sorted(t)]) if isinstance(t, dict) else t  # (E, rows, cols)
            result.append((f"model.layers.{entry[0]}.experts.{part}", f"blk.{entry[0]}.ffn_{part}_exps.weight", t))
    return result


def _as_llama_cpp(name: str, w: torch.Tensor, config, arch: str) -> torch.Tensor:
    """A tensor as llama.cpp's `arch` holds it: Llama's q/k rows interleaved; Gemma's norms as 1 + w (its
    RMSNorm multiplies by the stored weight)."""
    if config.norm_plus_one and name.endswith("norm.weight"):
        return w + 1
    if arch == "llama" and ".self_attn.q_proj." in name:
        return permute(w, config.num_attention_heads)
    if arch == "llama" and ".self_attn.k_proj." in name:
        return permute(w, config.num_key_value_heads)
    return w


# -- the tokenizer -----------------------------------------------------------------------------------

def pre_tokenizer_name(spec: dict, where) -> str:
    """llama.cpp's name for tokenizer.json's pre-tokenizer (its regex decides how text splits before BPE): the
    first name of the importer's table (gguf_vocab.PRE_TOKENIZERS) that splits the same way."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    split = None  # (isolate digits first, the split regex; None: ByteLevel's own, GPT-2's)
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        split = (False, None)
    elif kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        split = (True, None)
    elif kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        split = (False, (steps[0].get("pattern") or {}).get("Regex"))
    names = [name for name, rule in PRE_TOKENIZERS.items() if rule == split and name != "default"]
    if not names:
        raise ExportError(f"{where}: tokenizer.json's pre_tokenizer ({' + '.join(map(str, kinds)) or 'none'}) is not "
                          f"one llama.cpp knows by name ({', '.join(PRE_TOKENIZERS)}); llama.cpp would split text "
                          "differently, so it is not exported")
    return names[0]


def _sentencepiece_style(spec: dict) -> bool | None:
    """A BPE over "▁"-spaced pieces with byte fallback (SentencePiece's, as HF writes Llama 2's, Mistral's,
    Gemma's): whether it prepends "▁" to the text (llama.cpp's add_space_prefix); None for another kind."""
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    decoders = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    spaced = any(d.get("type") == "Metaspace" or d.get("type") == "Replace" and d.get("content") == " "
                 for d in decoders)
    if model.get("type") != "BPE" or not model.get("byte_fallback") or not spaced:
        return None
    steps = [spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}]
    steps = [t for step in steps for t in (step.get("normalizers") or step.get("pretokenizers") or [step])]
    return any(t.get("type") == "Prepend" and t.get("prepend") == "▁" or
               t.get("type") == "Metaspace" and t.get("prepend_scheme", "always") != "never" for t in steps)


def vocabulary(tokenizer, n_rows: int, where) -> dict:
    """The tokenizer.ggml.* values of a tokenizer whose embedding has n_rows rows: byte-level BPE (llama.cpp's
    "gpt2": tokens, merges, the pre-tokenizer's name), or SentencePiece-style BPE (its "llama": tokens and
    scores; the merge order is the vocabulary's order, so piece i scores -i, and <0xNN> pieces are BYTE)."""
    spec = json.loads(tokenizer.backend.to_str())
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    prefix = _sentencepiece_style(spec)
    if prefix is None and (model.get("type") != "BPE" or decoder.get("type") != "ByteLevel"):
        raise ExportError(f"{where}: only byte-level and SentencePiece-style BPE tokenizers can be exported to GGUF "
                          f"(this one is a {model.get('type')} model with a {decoder.get('type')} decoder)")
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    if len(vocab) > n_rows or max(vocab.values()) >= n_rows:
        raise ExportError(f"{where}: the tokenizer has ids up to {max(vocab.values())} but the embedding has "
                          f"{n_rows} rows")
    tokens = [f"[PAD{i}]" for i in range(n_rows)]
    types, scores = [_UNUSED] * n_rows, [0.0] * n_rows
    for token, i in vocab.items():
        tokens[i], types[i], scores[i] = token, _NORMAL, float(-i)
        if prefix is not None and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            types[i] = _BYTE
    for i, added in tokenizer.backend.get_added_tokens_decoder().items():
        types[i] = _CONTROL if added.special else _USER_DEFINED
    if prefix is not None and (unk := model.get("unk_token")) in vocab:
        types[vocab[unk]] = _UNKNOWN
    probe = tokenizer.encode("a", add_special_tokens=True)
    plain = tokenizer.encode("a", add_special_tokens=False)
    common = {"tokens": tokens, "types": types, "add_bos": len(probe) > len(plain) and probe[0] == tokenizer.bos_token_id,
              "add_eos": len(probe) > len(plain) and probe[-1] == tokenizer.eos_token_id}
    if prefix is not None:
        return {"model": "llama", "pre": "default", "scores": scores, "add_space_prefix": prefix,
                "unk": vocab.get(model.get("unk_token")), **common}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"model": "gpt2", "pre": pre_tokenizer_name(spec, where), "merges": merges, **common}


def _add_tokenizer(w, tokenizer, config, n_rows: int, where) -> None:
    v = vocabulary(tokenizer, n_rows, where)
    w.add_tokenizer_model(v["model"])
    w.add_tokenizer_pre(v["pre"])
    w.add_token_list(v["tokens"])
    w.add_token_types(v["types"])
    if v["model"] == "gpt2":
        w.add_token_merges(v["merges"])
    else:
        w.add_token_scores(v["scores"])
        w.add_add_space_prefix(v["add_space_prefix"])
        if v["unk"] is not None:
            w.add_unk_token_id(v["unk"])
    first = lambda x: x[0] if isinstance(x, list) else x  # noqa: E731  (generation configs list several eos)
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    ids = {k: i if i is not None else first(getattr(config, f"{k}_token_id")) for k, i in ids.items()}
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id)):
        if ids[key] is not None:
            add(int(ids[key]))
    w.add_add_bos_token(v["add_bos"])
    w.add_add_eos_token(v["add_eos"])
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)


# -- the tensors --------------------------------------------------------------------------------------

def tensor_type(name: str, w: torch.Tensor, outtype: str, output: str):
    """The ggml type export_gguf stores `name` (a llama.cpp name) in; `output` is the output matrix's name."""
    gguf = require_gguf()
    T = gguf.GGMLQuantizationType
    if w.dim() == 1 or outtype == "f32":
        return T.F32
    kind = {"f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[outtype]
    if kind == T.Q4_0 and name == output:
        kind = T.Q8_0
    block = gguf.GGML_QUANT_SIZES[kind][0]
    return kind if w.shape[-1] % block == 0 else T.F16


def encode_tensor(w: torch.Tensor, kind) -> np.ndarray:
    """The bytes (as gguf's writer takes them) of an fp32 tensor stored as ggml type `kind`."""
    gguf = require_gguf()
    array = w.detach().to(torch.float32).contiguous().numpy()
    if kind == gguf.GGMLQuantizationType.F32:
        return array
    return gguf.quants.quantize(array, kind)


def _status(text: str, progress: bool):
    if progress:
        print(f"\r{text}", end="", file=sys.stderr, flush=True)


def export_gguf(model, tokenizer, out, outtype: str = "f16", *, name: str | None = None, progress: bool = True,
                where="--model") -> dict:
    """Write `model` (a plain Transformer, adapters merged) and its tokenizer as one GGUF file at `out`.
    Returns {tensor name: ggml type name}."""
    gguf = require_gguf()
    if outtype not in OUTTYPES:
        raise ExportError(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    config = model.config
    arch = check_exportable(config, where)
    state = {k: v for k, v in model.state_dict().items() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    if bad := next((k for k, t in state.items() if not t.is_floating_point()), None):
        raise ExportError(f"{where}: the model still holds non-plain tensors (e.g. {bad}); merge the adapter or "
                          "dequantize first")
    tensors = _gguf_tensors(state, config, arch, where)
    n_rows = state["model.embed_tokens.weight"].shape[0]
    output = "token_embd.weight" if config.tie_word_embeddings else "output.weight"
    w = gguf.GGUFWriter(None, arch)
    w.add_name(name or "minicustom export")
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_rope_dimension_count(config.rotary_dim)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(n_rows)
    if (config.rope_scaling or {}).get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(config.rope_scaling["factor"])
    if (config.rope_scaling or {}).get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(config.rope_scaling["factor"])
        w.add_rope_scaling_orig_ctx_len(config.rope_scaling["original_max_position_embeddings"])
    if config.sliding_window and arch != "llama":  # llama.cpp's llama has no window (Mistral's is not carried)
        w.add_sliding_window(config.sliding_window)
    if config.attn_logit_softcapping:
        w.add_attn_logit_softcapping(config.attn_logit_softcapping)
    if config.final_logit_softcapping:
        w.add_final_logit_softcapping(config.final_logit_softcapping)
    w.add_file_type(_FILE_TYPES[outtype])
    if outtype in ("q8_0", "q4_0"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(w, tokenizer, config, n_rows, where)
    if (config.rope_scaling or {}).get("rope_type") == "llama3":  # llama.cpp divides band i's frequency by f_i
        plain = default_inv_freq(config.rope_theta, config.rotary_dim)
        tensors.append(("rope_freqs", "rope_freqs.weight",
                        plain / scaled_inv_freq(config.rope_theta, config.rotary_dim, config.rope_scaling)[0]))
    if config.num_experts:
        w.add_expert_count(config.num_experts)
        w.add_expert_used_count(config.num_experts_per_tok)
        w.add_expert_feed_forward_length(config.moe_intermediate_size)
    types = {}
    for i, (hf, target, t) in enumerate(tensors):
        t = _as_llama_cpp(hf, t.detach().float().cpu(), config, arch)
        kind = tensor_type(target, t, outtype, output)
        w.add_tensor(target, encode_tensor(t, kind), raw_dtype=kind)
        types[target] = kind.name
        _status(f"writing tensor {i + 1}/{len(tensors)} ({outtype})", progress)
    _status("\n", progress)
    _write(w, Path(out))
    return types


def _write(w, out: Path) -> None:
    """The writer's header, metadata and tensors into a temp file that becomes `out` when complete."""
    def write(tmp: Path):
        w.path = tmp
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, write)


# -- a LoRA adapter alone ----------------------------------------------------------------------------

def export_lora_gguf(adapter_dir, config, out, *, where="--adapter") -> dict:
    """A PEFT LoRA folder -> llama.cpp's LoRA GGUF (`--lora FILE` / `lora_path`), the base never copied.

    llama.cpp adds scale * B A with scale = adapter.lora.alpha / r (r read from each lora_b). rsLoRA's
    alpha / sqrt(r) is written as alpha' = alpha * sqrt(r); per-module ranks and alphas (rank_pattern /
    alpha_pattern) fold the module's own scale into its B. Llama's q/k permutation is a row permutation of
    B A, so it permutes B's rows. Returns {"alpha": alpha', "tensors": count}."""
    from safetensors import safe_open

    from .files import read_json

    gguf = require_gguf()
    arch = check_exportable(config, where)
    folder = Path(adapter_dir)
    cfg_file, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    for f in (cfg_file, weights):
        if not f.is_file():
            raise FileNotFoundError(f"{where} {folder}: no {f.name}")
    cfg = read_json(cfg_file, ExportError)
    kind = cfg.get("peft_type")
    if kind != "LORA" or cfg.get("use_dora"):
        method = "DoRA" if cfg.get("use_dora") else kind
        raise ExportError(f"{cfg_file}: a {method} adapter has no llama.cpp LoRA form; export the merged model "
                          "instead (export-gguf --adapter DIR without --lora-only)")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or isinstance(alpha, bool) or not isinstance(alpha, int | float) or r < 1:
        raise ExportError(f"{cfg_file}: r and lora_alpha must be numbers (found r={r!r}, lora_alpha={alpha!r})")
    written = alpha * math.sqrt(r) if cfg.get("use_rslora") else alpha
    lora = LoraConfig(r=r, alpha=alpha, use_rslora=bool(cfg.get("use_rslora")),
                      rank_pattern=cfg.get("rank_pattern") or {}, alpha_pattern=cfg.get("alpha_pattern") or {})
    w = gguf.GGUFWriter(None, arch)
    w.add_type("adapter")
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(written))
    with safe_open(str(weights), "pt") as f:
        names = list(f.keys())
        pairs = {}
        for key in names:
            m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
            if m is None:
                raise ExportError(f"{weights}: tensor {key} is not a LoRA A/B matrix of a linear layer (embedding "
                                  "LoRA, biases and extra trained modules have no llama.cpp LoRA form); export the "
                                  "merged model instead")
            pairs.setdefault(m[1], {})[m[2]] = f.get_tensor(key).float()
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ExportError(f"{weights}: {module} has lora_{next(iter(ab))} without its pair")
        target = gguf_name(module + ".weight", weights, arch)
        rank = ab["A"].shape[0]
        scale = lora.scaling(*lora.rank_alpha(module))  # what minicustom and PEFT multiply B A by
        b = ab["B"] if scale == written / rank else ab["B"] * (scale * rank / written)
        b = _as_llama_cpp(module + ".weight", b, config, arch)
        w.add_tensor(f"{target}.lora_a", ab["A"].contiguous().numpy())
        w.add_tensor(f"{target}.lora_b", b.contiguous().numpy())
    if not pairs:
        raise ExportError(f"{weights}: no LoRA tensors")
    _write(w, Path(out))
    return {"alpha": float(written), "tensors": 2 * len(pairs)}


# -- Ollama ------------------------------------------------------------------------------------------

# Ollama's TEMPLATE is a Go template, not Jinja: a chat template is recognized by what it renders (a probe
# conversation), and written in Go for the formats known here. ChatML (SmolLM2, Qwen):
_CHATML_GO = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
              "<|im_start|>assistant\n")
_PROBE = [{"role": "system", "content": "S1"}, {"role": "user", "content": "U1"},
          {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]


def _chatml(messages: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + \
        "<|im_start|>assistant\n"


def modelfile(tokenizer, gguf_file: str, system: str | None = None) -> tuple[str, str]:
    """An Ollama Modelfile for the exported file, and a note on what it could not carry. TEMPLATE is
    written when the chat template renders exactly as ChatML (its default system prompt, if it adds one
    to a conversation without one, becomes SYSTEM); otherwise it is left out and Ollama reads the GGUF's
    own tokenizer.chat_template."""
    if system is not None and '"""' in system:
        raise ExportError('--system: a Modelfile SYSTEM cannot hold """ (it ends the text)')
    lines, note = [f"FROM {gguf_file}"], ""
    render = (lambda m: tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False)) \
        if tokenizer.chat_template else None
    stops = [t for t in (tokenizer.eos_token,) if t]
    if render and render(_PROBE) == _chatml(_PROBE):
        lines.append(f'TEMPLATE """{_CHATML_GO}"""')
        stops += [t for t in ("<|im_end|>", "<|im_start|>") if t not in stops]
        alone = render([{"role": "user", "content": "U1"}])
        m = re.fullmatch(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n(.*)", alone, re.S)
        if system is None and m and m[2] == _chatml([{"role": "user", "content": "U1"}]):
            system = m[1]
    else:
        note = "the chat template is not ChatML: TEMPLATE left out, so Ollama uses the GGUF's chat template"
    lines += [f'PARAMETER stop "{t}"' for t in stops]
    if system is not None:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n", note
