"""Prompt tuning and p-tuning: P learned virtual tokens in front of the input, the model frozen.

- Prompt tuning (Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning",
  arXiv:2104.08691): the virtual tokens' embeddings E (P, C) are trained directly,

      logits = f([E; embed(x)])[P:]

  E starts as PEFT's PromptTuningInit: TEXT, the embeddings of a text's token ids repeated / cut to P;
  SAMPLE_VOCAB, the embeddings of P uniformly drawn token ids; RANDOM, N(0, 1) (nn.Embedding's init).
- P-tuning (Liu et al., 2021, "GPT Understands, Too", arXiv:2103.10385): E is the output of a prompt
  encoder over P trained inputs H (P, C), PEFT's PromptEncoder module for module (names and init):

      MLP:   E = W3 relu(W2 relu(W1 H + b1) + b2) + b3                 (C -> h -> h -> C)
      LSTM:  E = W5 relu(W4 BiLSTM(H) + b4) + b5                       (C -> 2h -> 2h -> C)

How it runs. The attention is causal, so the virtual tokens at positions 0..P-1 never see the real
ones: their keys and values in every layer depend on E alone. PEFT concatenates E to every row's
embeddings; here E goes through the model once, at batch 1, and each layer's keys/values (after RoPE)
are handed to the model's `kv_prefix` seam as a joint prefix. The model shifts the tokens' positions
by P and lets every query see those keys, so the real tokens get PEFT's outputs (up to float
reordering), gradients reach E and the encoder through the keys/values, and neither labels nor
attention masks need the P extra columns PEFT adds, since virtual positions produce no outputs. In
generation the prefix is written into the KV cache once, when the cache is made.

Files: PEFT's, adapter_config.json and one tensor `prompt_embeddings` (P, C) = E, the encoder's output
(PEFT saves no encoder). P-tuning also writes prompt_encoder.safetensors, the encoder itself, so that
training can resume; PEFT ignores that file. A folder without it (PEFT's own) loads as E alone, an
embedding-only adapter, which is what PEFT itself runs after loading (its inference mode).
Parameters are fp32 whatever the model's dtype, as in PEFT, and E is cast to it. Left out:
encoder-decoder models (num_transformer_submodules 2), multitask prompt tuning, CPT.

Dimensions: P virtual tokens, C hidden, h encoder hidden, nkv key/value heads, hs head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..model import Prefix, PromptKV
from .base import (
    VIRTUAL_TOKENS,
    Method,
    Option,
    PrefixLayer,
    adapter_configs,
    prefix_layer,
    register_config,
    report,
    set_adapter,
)
from .peft_format import CONFIG_FILE, WEIGHTS_FILE, AdapterError, check_fields, read_tensors

ENCODER_FILE = "prompt_encoder.safetensors"
INITS = {"random": "RANDOM", "text": "TEXT", "sample_vocab": "SAMPLE_VOCAB"}  # ours -> PEFT's
ENCODERS = {"mlp": "MLP", "lstm": "LSTM"}


@dataclass
class PromptTuningConfig:
    peft_type: ClassVar[str] = "PROMPT_TUNING"

    num_virtual_tokens: int = 20
    init: str = "random"  # "random" | "text" | "sample_vocab"
    init_text: str | None = None
    tokenizer_name_or_path: str | None = None  # recorded for PEFT, which re-reads the tokenizer to init TEXT

    def __post_init__(self):
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        if self.init not in INITS:
            raise ValueError(f"init {self.init!r} is not supported; supported: {', '.join(INITS)}")


@dataclass
class PTuningConfig:
    peft_type: ClassVar[str] = "P_TUNING"

    num_virtual_tokens: int = 20
    encoder: str = "mlp"  # "mlp" | "lstm"
    encoder_hidden_size: int | None = None  # h; None: C
    encoder_num_layers: int = 2  # the LSTM's depth; PEFT's MLP always has its three linears
    encoder_dropout: float = 0.0  # between LSTM layers (PEFT's MLP has none)
    embedding_only: bool = False  # E itself: loaded from a PEFT export, whose encoder was not saved

    def __post_init__(self):
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder {self.encoder!r} is not supported; supported: {', '.join(ENCODERS)}")
        if self.encoder == "mlp" and self.encoder_num_layers != 2:
            raise ValueError("PEFT's MLP prompt encoder has exactly 2 hidden layers; encoder_num_layers sets "
                             f"the LSTM's depth only (got {self.encoder_num_layers} with encoder='mlp')")


class PromptEncoder(nn.Module):
    """E (1, P, C): an embedding (prompt tuning, or an embedding-only p-tuning adapter), or PEFT's p-tuning
    encoder over it. Submodules are created in PEFT's order, so one seed gives PEFT's weights."""

    def __init__(self, P: int, C: int, kind: str | None = None, h: int | None = None, num_layers: int = 2,
                 dropout: float = 0.0):
        super().__init__()
        h = h or C
        self.embedding = nn.Embedding(P, C)  # H, or E itself
        if kind == "lstm":
            self.lstm_head = nn.LSTM(C, h, num_layers, dropout=dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, C))
        elif kind == "mlp":
            self.mlp_head = nn.Sequential(nn.Linear(C, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, C))

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight[None]  # (1, P, C)
        if hasattr(self, "lstm_head"):
            x = self.lstm_head(x)[0]  # (1, P, 2h): both directions
        return self.mlp_head(x) if hasattr(self, "mlp_head") else x  # (1, P, C)


class VirtualTokens(PrefixLayer):
    """The model's kv_prefix: named prompt encoders; the active one's E becomes every layer's prefix."""

    name_of_method = "prompt tuning / p-tuning"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.prompt_encoder = nn.ModuleDict()  # adapter name -> PromptEncoder
        self._model = [model]  # a reference, not a child: the model owns this module
        self._inside = False

    def encoders(self) -> nn.ModuleDict:
        return self.prompt_encoder

    def forward(self, batch_size: int) -> list[Prefix] | None:
        if self._inside or (encoder := self.active_adapter()) is None:
            return None
        model = self._model[0]
        E = encoder().to(model.model.embed_tokens.weight.dtype)  # (1, P, C)
        capture = PromptKV()
        self._inside = True  # a model that asks its seam for prefixes in this forward gets none
        try:
            model.forward_hidden(inputs_embeds=E, kv_cache=capture)  # positions 0..P-1, causal
        finally:
            self._inside = False
        return [Prefix(capture.k[i], capture.v[i]) for i in range(len(capture.k))]  # (1, nkv, P, hs) each; any B


def _encoder(model: nn.Module, config) -> PromptEncoder:
    """A new encoder for `config`, built on CPU as PEFT builds it, so that one seed gives PEFT's weights."""
    C, P = model.config.hidden_size, config.num_virtual_tokens
    if P >= model.config.max_position_embeddings:  # the virtual tokens take positions 0..P-1 before the input
        raise ValueError(f"num_virtual_tokens={P} leaves no position for the input: the model's context is "
                         f"max_position_embeddings={model.config.max_position_embeddings}")
    if isinstance(config, PromptTuningConfig) or config.embedding_only:
        return PromptEncoder(P, C)
    return PromptEncoder(P, C, config.encoder, config.encoder_hidden_size, config.encoder_num_layers,
                         config.encoder_dropout)


def _attach(model: nn.Module, config, adapter_name: str, encoder: PromptEncoder):
    module = prefix_layer(model, VirtualTokens, model)
    register_config(model, adapter_name, config)
    module.prompt_encoder[adapter_name] = encoder.to(model.model.embed_tokens.weight.device)
    module.train(model.training)  # the LSTM's dropout follows the model's mode


def text_init_ids(tokenizer, text: str, P: int) -> list[int]:
    """PEFT's TEXT init: the text's ids (special tokens included, as `tokenizer(text)`), cut to P, or
    repeated ceil(P / n) times and then cut."""
    ids = tokenizer.encode(text)
    if not ids:
        raise ValueError(f"init_text {text!r} encodes to no tokens")
    return (ids * math.ceil(P / len(ids)))[:P]


def apply_prompt_tuning(model: nn.Module, num_virtual_tokens: int = 20, init: str = "random",
                        init_text: str | None = None, tokenizer=None, adapter_name: str = "default",
                        verbose: bool = True, config: PromptTuningConfig | None = None) -> nn.Module:
    """Attach prompt tuning as adapter `adapter_name`, make it the active one, freeze everything else.

    tokenizer (init="text"): a minicustom Tokenizer, or the folder to load one from; a folder is
    recorded as PEFT's tokenizer_name_or_path."""
    if isinstance(tokenizer, (str, Path)):
        from ..tokenizer import load_tokenizer

        path, tokenizer = str(tokenizer), load_tokenizer(tokenizer)
    else:
        path = None
    config = config or PromptTuningConfig(num_virtual_tokens, init, init_text, path)
    P, vocab = config.num_virtual_tokens, model.model.embed_tokens.weight
    if config.init == "text" and (not config.init_text or tokenizer is None):
        raise ValueError("init='text' needs init_text and a tokenizer (mc.load_tokenizer(path), or the folder)")
    encoder = _encoder(model, config)  # E ~ N(0, 1): RANDOM
    if config.init != "random":  # after the N(0, 1) draw, as PEFT: SAMPLE_VOCAB's ids follow it in the stream
        ids = (text_init_ids(tokenizer, config.init_text, P) if config.init == "text"
               else torch.randint(0, vocab.shape[0], (P,)).tolist())
        with torch.no_grad():  # the embedding layer's output, as PEFT takes it: Gemma's is scaled by sqrt(C)
            encoder.embedding.weight.copy_(model.model.embed(torch.tensor(ids, device=vocab.device)).float())
    _attach(model, config, adapter_name, encoder)
    set_adapter(model, adapter_name)
    if verbose:
        report(model, f"prompt tuning '{adapter_name}' ({config.num_virtual_tokens} virtual tokens, {config.init})")
    return model


def apply_p_tuning(model: nn.Module, num_virtual_tokens: int = 20, encoder: str = "mlp",
                   encoder_hidden_size: int | None = None, encoder_num_layers: int = 2, encoder_dropout: float = 0.0,
                   adapter_name: str = "default", verbose: bool = True, config: PTuningConfig | None = None):
    """Attach p-tuning as adapter `adapter_name`, make it the active one, freeze everything else."""
    config = config or PTuningConfig(num_virtual_tokens, encoder, encoder_hidden_size, encoder_num_layers,
                                     encoder_dropout)
    _attach(model, config, adapter_name, _encoder(model, config))
    set_adapter(model, adapter_name)
    if verbose:
        report(model, f"p-tuning '{adapter_name}' ({config.num_virtual_tokens} virtual tokens, {config.encoder})")
    return model


# -- PEFT files -------------------------------------------------------------------------------------

def to_peft(model: nn.Module, adapter_name: str):
    config = adapter_configs(model)[adapter_name]
    encoder: PromptEncoder = model.kv_prefix.prompt_encoder[adapter_name]
    c = model.config
    peft = {"peft_type": config.peft_type, "task_type": "CAUSAL_LM", "num_virtual_tokens": config.num_virtual_tokens,
            "token_dim": c.hidden_size, "num_transformer_submodules": 1, "num_attention_heads": c.num_attention_heads,
            "num_layers": c.num_hidden_layers, "modules_to_save": None, "auto_mapping": None, "revision": None,
            "inference_mode": True}
    if isinstance(config, PromptTuningConfig):
        # PEFT refuses TEXT without a tokenizer path (it would re-tokenize to init); the init does not
        # matter once the weights are loaded, so without a path the text is kept under RANDOM.
        init = "random" if config.init == "text" and config.tokenizer_name_or_path is None else config.init
        peft.update(prompt_tuning_init=INITS[init], prompt_tuning_init_text=config.init_text, tokenizer_name_or_path=config.tokenizer_name_or_path,
                    tokenizer_kwargs=None)
    else:
        peft.update(encoder_reparameterization_type=ENCODERS[config.encoder],
                    encoder_hidden_size=config.encoder_hidden_size or c.hidden_size,
                    encoder_num_layers=config.encoder_num_layers, encoder_dropout=config.encoder_dropout)
    training = encoder.training
    with torch.no_grad():
        E = encoder.eval()()[0]  # (P, C), without the LSTM's dropout
    encoder.train(training)
    heads = not isinstance(config, PromptTuningConfig) and not config.embedding_only
    return peft, {"prompt_embeddings": E}, ({ENCODER_FILE: dict(encoder.named_parameters())} if heads else {})


# adapter_config.json fields a PROMPT_TUNING or P_TUNING folder is read with, and their kinds
# (peft_format.check_fields).
_FIELDS = {"num_virtual_tokens": "positive int", "token_dim": "positive int", "num_layers": "positive int",
           "num_attention_heads": "positive int", "num_transformer_submodules": "positive int",
           "modules_to_save": "name list", "prompt_tuning_init": "str", "prompt_tuning_init_text": "str",
           "tokenizer_name_or_path": "str", "tokenizer_kwargs": "object", "encoder_reparameterization_type": "str",
           "encoder_hidden_size": "positive int", "encoder_num_layers": "positive int", "encoder_dropout": "dropout"}


def load_peft(model: nn.Module, path: Path, peft: dict, tensors: dict, adapter_name: str):
    """Read a PROMPT_TUNING or P_TUNING folder. P-tuning resumes from prompt_encoder.safetensors when the
    folder has it (minicustom's); otherwise (PEFT's) the exported E is loaded as an embedding-only adapter,
    trainable as E itself, since an encoder cannot be recovered from its output."""
    c, where, weights = model.config, path / CONFIG_FILE, path / WEIGHTS_FILE
    check_fields(peft, where, _FIELDS)
    P = peft.get("num_virtual_tokens")
    if P is None:
        raise AdapterError(f"{where}: field 'num_virtual_tokens' is missing")
    expected = {"num_transformer_submodules": 1, "token_dim": c.hidden_size, "num_layers": c.num_hidden_layers,
                "num_attention_heads": c.num_attention_heads, "task_type": "CAUSAL_LM"}
    for key, value in expected.items():
        if peft.get(key) not in (value, None):
            raise AdapterError(f"{where}: {key}={peft[key]!r} is not supported; this model needs {value}")
    if peft.get("modules_to_save"):
        raise AdapterError(f"{where}: modules_to_save={peft['modules_to_save']!r} is not supported")
    if set(tensors) != {"prompt_embeddings"}:
        raise AdapterError(f"{weights}: expected one tensor, prompt_embeddings; found {sorted(tensors)}")
    E = tensors["prompt_embeddings"]
    if tuple(E.shape) != (P, c.hidden_size):
        raise AdapterError(f"{weights}: prompt_embeddings has shape {tuple(E.shape)}, expected ({P}, "
                           f"{c.hidden_size}) = (num_virtual_tokens, the model's hidden size)")
    state = {"embedding.weight": E}
    if peft["peft_type"] == "PROMPT_TUNING":
        init = {v: k for k, v in INITS.items()}.get(peft.get("prompt_tuning_init") or "RANDOM")
        if init is None:
            raise AdapterError(f"{where}: prompt_tuning_init={peft['prompt_tuning_init']!r} is not one of "
                               f"{', '.join(INITS.values())}")
        config = PromptTuningConfig(P, init, peft.get("prompt_tuning_init_text"), peft.get("tokenizer_name_or_path"))
    else:
        kind = {v: k for k, v in ENCODERS.items()}.get(peft.get("encoder_reparameterization_type") or "MLP")
        if kind is None:
            raise AdapterError(f"{where}: encoder_reparameterization_type="
                               f"{peft['encoder_reparameterization_type']!r} is not one of MLP, LSTM")
        h, layers = peft.get("encoder_hidden_size") or c.hidden_size, peft.get("encoder_num_layers") or 2
        resume = (path / ENCODER_FILE).exists()
        config = PTuningConfig(P, kind, h, layers if kind == "lstm" else 2,  # PEFT's MLP ignores the field
                               float(peft.get("encoder_dropout") or 0.0), embedding_only=not resume)
        if resume:
            state, _ = read_tensors(path / ENCODER_FILE)
    with torch.device("meta"):  # the shapes only: a config's sizes allocate nothing before they are checked
        wanted = {k: tuple(v.shape) for k, v in _encoder(model, config).state_dict().items()}
    if (found := {k: tuple(v.shape) for k, v in state.items()}) != wanted:
        raise AdapterError(f"{path / ENCODER_FILE}: expected tensors {wanted}, found {found}")
    encoder = _encoder(model, config)
    with torch.no_grad():
        for k, p in encoder.named_parameters():
            p.copy_(state[k])
        out = encoder.eval()()[0]  # (P, C)
    # A prompt_encoder.safetensors left from another run (say, PEFT saved over this folder) would not give
    # the exported E; the bound allows for a save on another device (a few ulps of |E| per layer).
    if not torch.allclose(out, E.float(), rtol=1e-4, atol=1e-4 * float(E.abs().max())):
        raise AdapterError(f"{path / ENCODER_FILE}: the encoder does not reproduce prompt_embeddings of {weights} "
                           f"(max difference {float((out - E).abs().max()):.3g}); the two files come from different "
                           f"runs. Delete {ENCODER_FILE} to load prompt_embeddings alone")
    _attach(model, config, adapter_name, encoder)


def _apply_prompt(model: nn.Module, num_virtual_tokens=20, prompt_init="random", prompt_init_text=None,
                  tokenizer=None) -> nn.Module:
    return apply_prompt_tuning(model, num_virtual_tokens=num_virtual_tokens, init=prompt_init,
                               init_text=prompt_init_text, tokenizer=tokenizer)


def _apply_ptuning(model: nn.Module, num_virtual_tokens=20, encoder="mlp") -> nn.Module:
    return apply_p_tuning(model, num_virtual_tokens=num_virtual_tokens, encoder=encoder)


PROMPT_TUNING = Method("prompt", _apply_prompt, "prompt tuning: learned input embeddings before the prompt",
                       lr=3e-2, mergeable=False, peft_type="PROMPT_TUNING", uses_tokenizer=True, options=(
                           VIRTUAL_TOKENS,
                           Option("prompt_init", "random", "how the prompt starts", choices=tuple(INITS)),
                           Option("prompt_init_text", None, "prompt_init text: the text whose token embeddings "
                                  "start the prompt")),
                       to_peft=to_peft, load_peft=load_peft)
P_TUNING = Method("ptuning", _apply_ptuning, "p-tuning: virtual tokens made by a small encoder", lr=1e-3,
                  mergeable=False, peft_type="P_TUNING", options=(
                      VIRTUAL_TOKENS, Option("encoder", "mlp", "the prompt encoder", choices=tuple(ENCODERS))),
                  to_peft=to_peft, load_peft=load_peft)
