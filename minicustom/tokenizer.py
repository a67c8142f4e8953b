"""The checkpoint's own tokenizer: `tokenizers` for the ids, a sandboxed jinja2 for the chat template.

A Hugging Face folder holds tokenizer.json (the whole tokenization pipeline, run by the Rust
`tokenizers` library) and tokenizer_config.json (special-token names and the Jinja chat template;
newer checkpoints put the template in chat_template.jinja). The template is rendered the way
transformers renders it: ImmutableSandboxedEnvironment, trim_blocks and lstrip_blocks, the
special-token strings as variables, `raise_exception` and `strftime_now` as globals. The rendered text
already holds BOS when the template writes it, so it is encoded without adding special tokens again:
BOS exactly once. Left out: slow (Python) tokenizers, tool-calling helpers, multimodal templates.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _RustTokenizer

from .files import atomic_write_all, read_json

_SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")


class TokenizerError(ValueError):
    """A tokenizer folder minicustom cannot use as it is: the message names the file and the field."""


def _token_str(value):
    """tokenizer_config stores a special token as "<s>" or as {"content": "<s>", ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _clean_up_spaces(text: str) -> str:
    """transformers' clean_up_tokenization: drop the space BPE leaves before punctuation and contractions."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


class Tokenizer:
    def __init__(self, tokenizer: _RustTokenizer, config: dict | None = None, chat_template: str | None = None,
                 source: str = "the tokenizer"):
        self.backend, self.source = tokenizer, source  # source: the file the template came from, for errors
        config = config or {}
        self.config = dict(config)  # tokenizer_config.json as read, written back by `save`
        for name in _SPECIAL_NAMES:
            setattr(self, name, _token_str(config.get(name)))
        self.chat_template = chat_template
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.special_ids = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}

    # -- ids -----------------------------------------------------------------------------------------
    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self):
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self):
        return self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self):
        return self.token_to_id(self.pad_token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self):
        return self.vocab_size

    def add_tokens(self, tokens: list[str], special: bool = False) -> list[int]:
        """Add tokens that are not in the vocabulary, as transformers' add_tokens(tokens, special_tokens=special)
        does on a fast tokenizer (the `tokenizers` calls it makes): each is matched whole before the model's own
        splitting; a normal one goes through the normalizer and is kept by decode(skip_special_tokens=True), a
        special one is matched as typed and dropped there. Returns their ids (the next free ones)."""
        if known := [t for t in tokens if self.backend.token_to_id(t) is not None]:
            raise ValueError(f"token {known[0]!r} is already in the vocabulary (id {self.token_to_id(known[0])})")
        (self.backend.add_special_tokens if special else self.backend.add_tokens)(list(tokens))
        ids = [self.backend.token_to_id(t) for t in tokens]
        if special:
            self.special_ids |= set(ids)
            extra = self.config.get("extra_special_tokens")
            self.config["extra_special_tokens"] = [*(extra if isinstance(extra, list) else []), *tokens]
        return ids

    def save(self, path):
        """Write tokenizer.json and tokenizer_config.json (and chat_template.jinja when the template came from
        one) into the folder `path`, all or nothing; transformers' AutoTokenizer reads them."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = json.dumps(self.config, indent=2, ensure_ascii=False) + "\n"
        writes = [(path / "tokenizer.json", lambda tmp: tmp.write_text(self.backend.to_str(), encoding="utf-8")),
                  (path / "tokenizer_config.json", lambda tmp: tmp.write_text(config, encoding="utf-8"))]
        if self.chat_template and self.config.get("chat_template") is None:
            writes.append((path / "chat_template.jinja", lambda tmp: tmp.write_text(self.chat_template, encoding="utf-8")))
        atomic_write_all(writes)
        return path

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; add_special_tokens runs the checkpoint's post-processor (e.g. BOS for Llama)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        bos = self.bos_token_id
        if add_special_tokens and bos is not None and ids[:2] == [bos, bos] and text.startswith(self.bos_token):
            ids = ids[1:]  # the text already held BOS and the post-processor added another: keep one
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self.clean_up_tokenization_spaces else text

    def batch_encode(self, texts: list[str], add_special_tokens: bool = True):
        """input_ids and attention_mask (B, T), left-padded for generation."""
        from .generate import left_pad

        pad = self.pad_token_id if self.pad_token_id is not None else self.eos_token_id
        return left_pad([self.encode(t, add_special_tokens) for t in texts], pad or 0)

    # -- chat --------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = True, **kwargs):
        """Render messages with the checkpoint's template; token ids (no special tokens added) or the text."""
        if not self.chat_template:
            raise ValueError(f"{self.source}: no chat template (tokenizer_config.json 'chat_template', a "
                             "list of templates without 'default', or chat_template.jinja)")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        specials = {name: getattr(self, name) for name in _SPECIAL_NAMES if getattr(self, name) is not None}
        try:
            text = _compile(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **specials, **kwargs
            )
        except jinja2.TemplateError as e:  # raise_exception() in the template, or an undefined value it reads
            raise ValueError(f"{self.source}: the chat_template refused these messages: {e}") from None
        return self.encode(text, add_special_tokens=False) if tokenize else text


_TEMPLATES: dict[str, jinja2.Template] = {}


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text in some templates (transformers uses it
    for assistant masks); here it renders its body unchanged. Masks come from spans (minicustom.data)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _compile(source: str) -> jinja2.Template:
    if source not in _TEMPLATES:
        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols", _GenerationBlock])
        env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False, ensure_ascii=False: (
            json.dumps(x, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii))
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]


def _read_text(file: Path) -> str:
    try:
        return file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{file}: not UTF-8 text (byte {e.start})") from None


def _checked_config(config, file: Path) -> dict:
    """tokenizer_config.json's fields that minicustom reads, type-checked (a special token is a string or
    {"content": string}; the chat template a string or a list of {"name", "template"})."""
    def fail(field, expected):
        raise TokenizerError(f"{file}: field '{field}' must be {expected}, found {config[field]!r}"[:400])

    if not isinstance(config, dict):
        raise TokenizerError(f"{file}: expected a JSON object, found {type(config).__name__}")
    for name in _SPECIAL_NAMES:
        value = config.get(name)
        if not (value is None or isinstance(value, str)
                or (isinstance(value, dict) and isinstance(value.get("content"), str))):
            fail(name, 'a string or {"content": string}')
    template = config.get("chat_template")
    if not (template is None or isinstance(template, str) or (isinstance(template, list) and all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
            for t in template))):
        fail("chat_template", 'a string or a list of {"name": ..., "template": ...}')
    if not isinstance(config.get("clean_up_tokenization_spaces", False), bool):
        fail("clean_up_tokenization_spaces", "true or false")
    return config


def load_tokenizer(path) -> Tokenizer:
    """Tokenizer of a Hugging Face folder (tokenizer.json, tokenizer_config.json, chat_template.jinja)."""
    path = Path(path)
    file = path / "tokenizer.json"
    if not file.exists():
        raise FileNotFoundError(f"{path}: no tokenizer.json (only fast tokenizers are supported)")
    try:
        backend = _RustTokenizer.from_file(str(file))
    except Exception as e:
        raise ValueError(f"{file}: cannot be read as a tokenizers file: {e}") from None
    config, where = {}, path / "tokenizer_config.json"
    if where.exists():
        config = _checked_config(read_json(where, TokenizerError), where)
    template = config.get("chat_template")
    if (path / "chat_template.jinja").exists():
        where = path / "chat_template.jinja"
        template = _read_text(where)
    if isinstance(template, list):  # several named templates: take the default one
        template = {t["name"]: t["template"] for t in template}.get("default")
    if template:
        try:  # compiled now, so that a syntax error names its file and line before any work
            _compile(template)
        except jinja2.TemplateSyntaxError as e:
            raise TokenizerError(f"{where}: the chat_template does not parse (template line {e.lineno}: "
                                 f"{e.message})") from None
    return Tokenizer(backend, config, template, source=str(where if where.exists() else path))
