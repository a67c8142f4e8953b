"""The vocabulary of a GGUF file as a `tokenizers.Tokenizer`, and the checks on it.

Three kinds, by `tokenizer.ggml.model` and the architecture:
- "gpt2": byte-level BPE with the file's merges, split the way llama.cpp splits for `tokenizer.ggml.pre`.
- "llama" (SentencePiece) on Gemma: rebuilt as Gemma's tokenizer is written (transformers' GemmaTokenizer):
  BPE with byte fallback over the file's pieces, spaces replaced by "▁" before the model, no prefix space.
  The file holds no merges; they are recovered from the vocabulary as transformers' GGUF loader does: every
  split of a piece into two pieces that are tokens, ranked by the piece's place in the file (Gemma's scores
  do not follow its merge order), the longer left part first.
  A token of spaces alone is stored as real spaces and renamed "▁" * n, as Gemma's vocabulary spells it.
- "llama" on Phi-3: byte-fallback BPE with merges recovered from the pieces' scores, "\u2581" prepended and
  spaces replaced by a normalizer (transformers' phi3 GGUF tokenizer).
Control tokens (type 3) become special added tokens and user-defined ones (type 4) plain added tokens, so
both stay whole; BOS/EOS are added to every encoded text as the file's add_*_token flags say.
"""

from __future__ import annotations

import math
from pathlib import Path

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


class GGUFError(ValueError):
    """A GGUF file that is corrupt or truncated, or whose metadata and tensors do not fit together."""


MISSING = object()


def get_field(meta: dict, key: str, where: Path, kind: str, default=MISSING):
    """meta[key] checked to be of `kind`: "count" (int > 0), "number" (finite > 0), "str", "bool"."""
    value = meta.get(key, default)
    if value is MISSING:
        raise GGUFError(f"{where}: metadata key {key} is missing")
    ok = {"count": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
          "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
          "str": lambda v: isinstance(v, str), "bool": lambda v: isinstance(v, bool)}[kind]
    if value is not None and not ok(value):
        what = {"count": "a positive integer", "number": "a number > 0", "str": "a string", "bool": "true or false"}
        raise GGUFError(f"{where}: metadata key {key} must be {what[kind]}, found {value!r}")
    return value


# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), by `tokenizer.ggml.pre`.
_GPT2_SPLIT = None  # ByteLevel's own regex: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {  # name -> (isolate every digit first, split regex or None for GPT-2's)
    "default": (False, _GPT2_SPLIT), "gpt-2": (False, _GPT2_SPLIT),
    "smollm": (True, _GPT2_SPLIT), "starcoder": (True, _GPT2_SPLIT), "refact": (True, _GPT2_SPLIT),
    "llama-bpe": (False, _LLAMA3_SPLIT), "llama3": (False, _LLAMA3_SPLIT),
    "qwen2": (False, _QWEN2_SPLIT), "deepseek-r1-qwen": (False, _QWEN2_SPLIT),
}


def check_vocabulary(meta: dict, vocab_size: int, where: Path) -> None:
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
        if get_field(meta, f"tokenizer.ggml.add_{key}_token", where, "bool", None) and (
                meta.get(f"tokenizer.ggml.{key}_token_id") is None):
            raise GGUFError(f"{where}: tokenizer.ggml.add_{key}_token is set but tokenizer.ggml.{key}_token_id "
                            "is missing")
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template"):
        get_field(meta, key, where, "str", None)


def build_tokenizer(meta: dict, arch: str, where: Path):
    """The file's tokenizer: byte-level BPE ("gpt2"), or Gemma's SentencePiece-style BPE ("llama" on gemma3)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        return _byte_level(meta, where)
    if kind == "llama" and arch == "gemma3":
        return _gemma(meta)
    if kind == "llama" and arch == "phi3":
        return _phi3(meta, where)
    raise NotImplementedError(f"{where}: tokenizer.ggml.model={kind!r} is not supported for {arch}; supported: "
                              "'gpt2' (byte-level BPE), and 'llama' (SentencePiece) on gemma3 and phi3")


def _gemma(meta: dict):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    types = meta.get("tokenizer.ggml.token_type") or []
    tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in meta["tokenizer.ggml.tokens"]]
    vocab = {t: i for i, t in enumerate(tokens)}  # a repeated piece keeps its last place, as transformers'
    # Every split of a piece into two pieces, ranked by the piece's place, then the longer left part first.
    merges = sorted((rank, -i, token[:i], token[i:]) for token, rank in vocab.items() for i in range(1, len(token))
                    if token[:i] in vocab and token[i:] in vocab)
    merges = [(a, b) for *_, a, b in merges]
    unk = tokens[meta["tokenizer.ggml.unknown_token_id"]] if "tokenizer.ggml.unknown_token_id" in meta else None
    tok = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    _added(tok, tokens, types)
    tok.post_processor = _ends(meta, tokens)
    return tok


def _phi3(meta: dict, where: Path):
    """Phi-3's SentencePiece pieces as transformers' GGUF loader builds them: byte-fallback BPE, merges ranked by
    the pieces' scores (then the longer left part), "▁" prepended and spaces replaced by a normalizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    tokens, scores = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.scores")
    if not isinstance(scores, list) or len(scores) != len(tokens):
        raise GGUFError(f"{where}: tokenizer.ggml.scores must hold one number per token ({len(tokens)})")
    vocab, score = {t: i for i, t in enumerate(tokens)}, dict(zip(tokens, scores))  # last place, last score
    first = {t: i for i, t in reversed(list(enumerate(tokens)))}  # where transformers' scan meets each piece
    merges = sorted((-score[t], -i, i - len(t), first[t], t[:i], t[i:]) for t in vocab for i in range(1, len(t))
                    if t[:i] in vocab and t[i:] in vocab)
    tok = Tokenizer(models.BPE(vocab, [(a, b) for *_, a, b in merges], fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    _added(tok, tokens, meta.get("tokenizer.ggml.token_type") or [])
    tok.post_processor = _ends(meta, tokens)
    return tok


def _added(tok, tokens: list[str], types: list[int]):
    """Control tokens as special added tokens, user-defined ones as plain added tokens: both stay whole."""
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])


def _ends(meta: dict, tokens: list[str], post=None):
    """llama.cpp puts BOS before / EOS after every encoded text when the file says so: a TemplateProcessing
    after `post` (None: none before)."""
    from tokenizers import processors

    add = [(k, meta[f"tokenizer.ggml.{k}_token_id"]) for k in ("bos", "eos") if meta.get(f"tokenizer.ggml.add_{k}_token")]
    if not add:
        return post

    def template(seq: str, type_id: int) -> list[str]:
        ends = {k: [f"{tokens[i]}:{type_id}"] for k, i in add}
        return ends.get("bos", []) + [f"{seq}:{type_id}"] + ends.get("eos", [])

    ends = processors.TemplateProcessing(single=template("$A", 0), pair=template("$A", 0) + template("$B", 1),
                                         special_tokens=sorted({(tokens[i], i) for _, i in add}))
    return ends if post is None else processors.Sequence([post, ends])


def _byte_level(meta: dict, where: Path):
    """A byte-level BPE `tokenizers.Tokenizer` that splits text the way llama.cpp does for this file."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise NotImplementedError(f"{where}: tokenizer.ggml.pre={pre!r} is not supported; "
                                  f"supported: {', '.join(sorted(PRE_TOKENIZERS))}")
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or []
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, unk_token=None,
                               fuse_unk=False, byte_fallback=False, ignore_merges=pre in ("llama-bpe", "llama3")))
    digits, split = PRE_TOKENIZERS[pre]
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tok.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    _added(tok, tokens, types)
    tok.post_processor = _ends(meta, tokens, processors.ByteLevel(trim_offsets=False))
    return tok


