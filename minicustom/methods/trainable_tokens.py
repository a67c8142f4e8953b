"""Trainable tokens: only chosen rows of the embedding matrix learn, PEFT's TRAINABLE_TOKENS (no paper of its own;
the rows of new tokens start as in Hewitt, "Initializing New Word Embeddings for Pretrained Language Models",
2021, https://nlp.stanford.edu/~johnhew/vocab-expansion.html, which transformers' mean_resizing follows).

The frozen embedding E0 (V, C) keeps every row but those of the token indices I = [i_1 .. i_n], which come from
a trainable matrix D (n, C), the adapter's `trainable_tokens_delta` (despite its name, the rows themselves,
not a difference: PEFT's choice, so that re-drawing E0's other rows never changes what the adapter means):

    E = E0 with E[I] := D,      x_t = E[token_t]   (Gemma: x_t · sqrt(C), by the model as ever)

PEFT's init (init_weights=True): D = E0[I], so the model is unchanged at step 0 (init_weights=False: D ~ N(0, 1),
a test setting). A frozen copy of E0[I] (`trainable_tokens_original`) is kept, for unmerging. Merging writes D
into the rows, E0[I] <- D, and unmerging writes the copy back: both exact (copies, no arithmetic). Several
adapters may be active or merged together when their indices are disjoint, as PEFT.

Which modules: the input embedding (PEFT's default target, written "model.embed_tokens" in the file). A tied
lm_head follows it, as in PEFT: it shares E, so logits = h Eᵀ use the same D (one matrix, whose gradient sums
both uses). The tied head holds no tensor of its own, so merging D into E (which the tied lm_head must see) is
not the "weight tied to another module" that merge_adapters refuses for other methods. On an untied model the lm_head keeps its rows, as in PEFT, unless targets name it too
(["embed_tokens", "lm_head"]): then its rows I of W (V, C) are a second trainable matrix with its own file key.
The file keys are PEFT's: "base_model.model." + module name + ".trainable_tokens_delta" (a tied lm_head's key is
written too, the same tensor, as PEFT writes it); PEFT keeps `trainable_tokens_original` in memory only, and
so do we. adapter_config.json holds token_indices, target_modules and init_weights.

Default indices (PEFT has none: its [] trains nothing): the tokenizer's special tokens when one is given
(the chat markers a base model has rarely seen), else the config's bos, eos and pad ids. New tokens
(`new_tokens`, or mc.add_tokens first) are added to the tokenizer and the vocabulary (minicustom/vocab.py)
and their rows trained; on an untied model, new tokens train the lm_head's rows too unless targets say
otherwise (ours: an output row left at its mean init could not learn to emit the token).

Left out, which PEFT has: other module types (PEFT wraps any layer with a weight), DeepSpeed ZeRO-3 gathering,
and trainable tokens inside a LoRA config (LoRA's trainable_token_indices). Unlike PEFT: repeated indices and
indices outside the vocabulary are refused (PEFT's index_copy would pick one copy, or fail late); a file whose
tied lm_head key differs from the embedding's is refused (PEFT loads the lm_head's over it); disabling adapters
while merged refuses, as for every method here (PEFT unmerges).

Dimensions: V vocabulary, C hidden size, n number of trainable tokens.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..vocab import add_tokens, check_new_tokens
from .base import (
    AdapterLayer,
    Method,
    Option,
    adapter_configs,
    find_targets,
    register_config,
    report,
    set_adapter,
    targets_option,
)
from .peft_format import CONFIG_FILE, PREFIX, AdapterError, check_fields, match_keys

__all__ = ["TrainableTokensConfig", "TrainableTokensLayer", "TiedTokensHead", "apply_trainable_tokens", "to_peft",
           "load_peft"]

DEFAULT_TARGETS = "model.embed_tokens"  # PEFT's: the model's input embedding, by its full name
KEY = ".trainable_tokens_delta"  # after PREFIX + module name; PEFT drops the adapter's name from the key


@dataclass
class TrainableTokensConfig:
    """The token indices whose rows train, and the modules that hold them. targets None means PEFT's default
    (the input embedding), filled in by `resolve`."""

    peft_type: ClassVar[str] = "TRAINABLE_TOKENS"

    token_indices: list[int]
    targets: list[str] | str | None = None  # names (suffix match) or one regex (full match)
    init_weights: bool = True  # False: D ~ N(0, 1) instead of the rows themselves (PEFT's testing switch)

    def __post_init__(self):
        if isinstance(self.targets, (tuple, set)):
            self.targets = sorted(self.targets)
        indices = self.token_indices
        if not isinstance(indices, (list, tuple)):
            raise ValueError(f"token_indices must be a list of token ids, found {indices!r}")
        if bad := [i for i in indices if not isinstance(i, int) or isinstance(i, bool) or i < 0]:
            raise ValueError(f"token_indices must be non-negative integers, found {bad[0]!r}")
        if len(set(indices)) < len(indices):
            twice = next(i for i in indices if indices.count(i) > 1)
            raise ValueError(f"token index {twice} appears twice in token_indices")
        self.token_indices = list(indices)

    def resolve(self) -> TrainableTokensConfig:
        targets = DEFAULT_TARGETS if self.targets is None else self.targets
        return dc_replace(self, targets=list(targets) if isinstance(targets, list) else targets)


class _Originals(nn.Module):
    """The frozen copies E0[I], one buffer per adapter: they move with .to() and stay out of state_dict
    (PEFT's BufferDict, which it does not save either)."""

    def put(self, name: str, t: torch.Tensor):
        self.register_buffer(name, t, persistent=False)

    def get(self, name: str) -> torch.Tensor:
        return self._buffers[name]

    def drop(self, name: str):
        self._buffers.pop(name, None)


class TrainableTokensLayer(AdapterLayer):
    """Trainable rows of an nn.Embedding (or of an untied lm_head, an nn.Linear whose rows are the vocabulary).
    The base weight is this module's own `weight` (and `bias`, `padding_idx`), so base keys do not move."""

    def __init__(self, base: nn.Embedding | nn.Linear):
        super().__init__()
        self.embedding = isinstance(base, nn.Embedding)
        self.weight = base.weight  # E0 (V, C): frozen
        self.bias = None if self.embedding else base.bias
        self.padding_idx = base.padding_idx if self.embedding else None  # as HF: no gradient to the padding row
        self.trainable_tokens_delta = nn.ParameterDict()  # name -> D (n, C)
        self.trainable_tokens_original = _Originals()  # name -> E0[I] (n, C)
        self.token_indices: dict[str, list[int]] = {}
        self.active: list[str] = []
        self.merged: dict[str, None] = {}

    @property
    def num_rows(self) -> int:
        return self.weight.shape[0]

    def add(self, name: str, indices: list[int], init_weights: bool = True):
        w = self.weight
        originals = w.detach()[indices].clone()  # (n, C)
        values = originals if init_weights else torch.randn(len(indices), w.shape[1], dtype=w.dtype, device=w.device)
        self.trainable_tokens_delta[name] = nn.Parameter(values.clone())
        self.trainable_tokens_original.put(name, originals)
        self.token_indices[name] = list(indices)

    def _index(self, name: str) -> torch.Tensor:
        return torch.tensor(self.token_indices[name], device=self.weight.device)

    def check_disjoint(self, names: list[str]):
        """PEFT's rule: adapters applied or merged together must not share a token (whose row would win?)."""
        seen: dict[int, str] = {}
        for n in dict.fromkeys([*self.merged, *names]):
            for i in self.token_indices[n]:
                if i in seen and seen[i] != n:
                    raise ValueError(f"adapters {seen[i]!r} and {n!r} both train token {i}; adapters applied or "
                                     "merged together need disjoint token_indices (as PEFT)")
                seen[i] = n

    def current_weight(self) -> torch.Tensor:
        """E with the rows of every active, unmerged adapter replaced: (V, C), differentiable in each D."""
        W = self.weight
        todo = [n for n in self.active if n not in self.merged]
        self.check_disjoint(todo)
        for n in todo:
            W = W.index_copy(0, self._index(n), self.trainable_tokens_delta[n].to(W.dtype))  # E[I] := D
        return W

    def forward(self, x):
        W = self.current_weight()
        if self.embedding:
            return F.embedding(x, W, self.padding_idx)  # (B, T) -> (B, T, C)
        return F.linear(x, W, self.bias)  # (B, T, C) @ (C, V) -> (B, T, V)

    @torch.no_grad()
    def merge(self, name: str):
        if name in self.merged:
            return
        self.check_disjoint([name])
        self.weight.index_copy_(0, self._index(name), self.trainable_tokens_delta[name].to(self.weight.dtype))
        self.merged[name] = None

    @torch.no_grad()
    def unmerge(self, name: str):
        if name in self.merged:
            del self.merged[name]
            self.weight.index_copy_(0, self._index(name), self.trainable_tokens_original.get(name))

    def delete(self, name: str):
        if name in self.merged:
            raise ValueError(f"adapter {name!r} is merged into the weights; unmerge it before deleting it")
        if name in self.trainable_tokens_delta:
            del self.trainable_tokens_delta[name]
        self.trainable_tokens_original.drop(name)
        self.token_indices.pop(name, None)
        self.active = [a for a in self.active if a != name]

    @property
    def adapters(self) -> list[str]:
        return list(self.trainable_tokens_delta)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return {KEY[1:]: self.trainable_tokens_delta[name]}

    def base(self) -> nn.Module:
        """A plain nn.Embedding (or nn.Linear) sharing this module's (possibly merged) weight."""
        V, C = self.weight.shape
        with torch.device("meta"):
            plain = nn.Embedding(V, C, padding_idx=self.padding_idx) if self.embedding else \
                nn.Linear(C, V, bias=self.bias is not None)
        plain.weight = self.weight
        if not self.embedding:
            plain.bias = self.bias
        return plain

    def extra_repr(self) -> str:
        return f"rows={tuple(self.weight.shape)}, tokens={ {n: len(i) for n, i in self.token_indices.items()} }"


class TiedTokensHead(AdapterLayer):
    """A tied lm_head: logits = h Eᵀ with the embedding layer's current E (PEFT's tied TrainableTokensLayer). It
    holds no tensor of its own (the embedding is kept in a list, so it is not registered twice): its rows are
    the embedding's adapters, which merging writes into the one shared matrix."""

    def __init__(self, embedding: TrainableTokensLayer):
        super().__init__()
        self.tied = [embedding]
        self.active: list[str] = []
        self.merged: dict = {}

    def forward(self, h):
        return F.linear(h, self.tied[0].current_weight())  # (B, T, C) @ (C, V) -> (B, T, V)

    @property
    def weight(self) -> torch.Tensor:
        return self.tied[0].weight

    @property
    def adapters(self) -> list[str]:
        return []  # the embedding's adapters; nothing to activate, merge or delete here

    def delete(self, name: str):
        pass

    def base(self) -> nn.Linear:
        V, C = self.weight.shape
        with torch.device("meta"):
            head = nn.Linear(C, V, bias=False)
        head.weight = self.weight  # tied again
        return head


# -- attaching adapters to a model -----------------------------------------------------------------

def _tied(model: nn.Module) -> bool:
    head = getattr(model, "lm_head", None)
    return isinstance(head, TiedTokensHead) or (isinstance(head, nn.Linear) and hasattr(model, "model")
                                                and head.weight is model.model.embed_tokens.weight)


def _plan(model: nn.Module, config: TrainableTokensConfig) -> tuple[list[str], list[str]]:
    """([names of the targeted embedding / lm_head layers], [problems]); changes nothing. A tied lm_head is
    left out: it follows the embedding."""
    plan, problems = [], []
    for name in find_targets(model, config.targets):
        module = model.get_submodule(name)
        if isinstance(module, TiedTokensHead) or (name == "lm_head" and _tied(model)):
            continue
        if isinstance(module, AdapterLayer) and not isinstance(module, TrainableTokensLayer):
            problems.append(f"{name} already carries a {type(module).__name__}; trainable tokens cannot be stacked "
                            "on it")
        elif not isinstance(module, (nn.Embedding, TrainableTokensLayer)) and not (
                name.rsplit(".", 1)[-1] == "lm_head" and type(module) is nn.Linear):
            problems.append(f"{name} is a {type(module).__name__}; trainable tokens adapt the embedding "
                            "(embed_tokens) and an untied lm_head")
        else:
            rows = module.weight.shape[0]
            if bad := [i for i in config.token_indices if i >= rows]:
                problems.append(f"token index {bad[0]} is out of range: {name} has {rows} rows (0 to {rows - 1})")
            elif isinstance(module, TrainableTokensLayer) and module.merged:
                problems.append(f"{name} has adapter {list(module.merged)} merged; unmerge it before adding another")
            else:
                plan.append(name)
    return plan, problems


def _attach(model: nn.Module, plan: list[str], adapter_name: str, config: TrainableTokensConfig):
    layers = {}
    for name in plan:
        module = model.get_submodule(name)
        if not isinstance(module, TrainableTokensLayer):
            module = TrainableTokensLayer(module)
            model.set_submodule(name, module)
        module.add(adapter_name, config.token_indices, config.init_weights)
        layers[name] = module
    embedding = getattr(getattr(model, "model", None), "embed_tokens", None)
    if _tied(model) and isinstance(embedding, TrainableTokensLayer) and not isinstance(model.lm_head, TiedTokensHead):
        model.lm_head = TiedTokensHead(embedding)  # the tied lm_head follows the embedding, as in PEFT
    return layers


def default_indices(model: nn.Module, tokenizer=None) -> list[int]:
    """Ours (PEFT has no default): the tokenizer's special tokens, else the config's bos, eos and pad ids."""
    if tokenizer is not None and tokenizer.special_ids:
        return sorted(tokenizer.special_ids)
    c, ids = model.config, set()
    for v in (c.bos_token_id, c.eos_token_id, c.pad_token_id):
        ids.update(v if isinstance(v, list) else [v] if isinstance(v, int) else [])
    return sorted(i for i in ids if 0 <= i < c.vocab_size) or [0]


def apply_trainable_tokens(model: nn.Module, token_indices: list[int] | None = None, targets=None,
                           init_weights: bool = True, new_tokens: list[str] | None = None, tokenizer=None,
                           special: bool = False, adapter_name: str = "default", verbose: bool = True,
                           config: TrainableTokensConfig | None = None) -> nn.Module:
    """Make the rows `token_indices` of the input embedding trainable (each D = E0[I] unless init_weights=False),
    as adapter `adapter_name`, the active one; everything else is frozen. A tied lm_head follows; targets may
    add an untied "lm_head". new_tokens: first add these tokens to `tokenizer` and the model (mc.add_tokens,
    special or not) and train their rows too. Neither indices nor new tokens: `default_indices`. Everything is
    checked before the model (or the tokenizer) changes. Returns the model (changed in place); prints the
    trainable parameter count when verbose."""
    if adapter_name in adapter_configs(model):
        raise ValueError(f"an adapter named {adapter_name!r} already exists; delete it or pick another name")
    if config is None:
        if token_indices is None and not new_tokens:
            token_indices = default_indices(model, tokenizer)
        if new_tokens and targets is None and not _tied(model):
            targets = ["embed_tokens", "lm_head"]  # ours: a new token's output row must learn too, or it is never said
        config = TrainableTokensConfig(token_indices=list(token_indices or []), targets=targets,
                                       init_weights=init_weights)
    config = config.resolve()
    if new_tokens:
        check_new_tokens(tokenizer, new_tokens, model)
        upcoming = range(tokenizer.vocab_size, tokenizer.vocab_size + len(new_tokens))
        if both := [i for i in config.token_indices if i in upcoming]:
            raise ValueError(f"token index {both[0]} is also the id a new token will get; leave it out")
    elif not config.token_indices:
        raise ValueError("token_indices is empty: name at least one token id (or new tokens to add)")
    plan, problems = _plan(model, config)
    if isinstance(config.targets, list):
        problems += [f"target {t!r} matches no module" for t in config.targets if not find_targets(model, [t])]
    if not plan and not problems:
        problems.append(f"targets {config.targets!r} match no embedding of this model")
    if problems:  # one line: the first problem, and how many more
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"cannot attach trainable tokens: {problems[0]}{more}")
    if new_tokens:
        ids = add_tokens(model, tokenizer, new_tokens, special=special)
        config = dc_replace(config, token_indices=config.token_indices + ids)
    _attach(model, plan, adapter_name, config)
    register_config(model, adapter_name, config)
    set_adapter(model, adapter_name)
    if verbose:
        report(model, f"trainable tokens '{adapter_name}': {len(config.token_indices)} tokens in "
                      f"{', '.join(plan)}" + (" (lm_head tied)" if _tied(model) else ""))
    return model


# -- PEFT adapter folders (the registry dispatches here on peft_type "TRAINABLE_TOKENS") ----------------------

_FIELDS = {"target_modules": "names", "init_weights": "bool"}


def to_peft(model: nn.Module, adapter_name: str):
    """(adapter_config.json as PEFT writes it for TRAINABLE_TOKENS, tensors, no extra files). Merged or not, D is
    what is saved; a tied lm_head's key holds the embedding's D, as PEFT writes it."""
    config = adapter_configs(model)[adapter_name]
    state = {}
    for name, layer in model.named_modules():
        if isinstance(layer, TrainableTokensLayer) and adapter_name in layer.adapters:
            state[f"{PREFIX}{name}{KEY}"] = layer.trainable_tokens_delta[adapter_name]
        elif isinstance(layer, TiedTokensHead) and adapter_name in layer.tied[0].adapters:
            state[f"{PREFIX}{name}{KEY}"] = layer.tied[0].trainable_tokens_delta[adapter_name].detach().clone()
    return {
        "peft_type": "TRAINABLE_TOKENS", "task_type": "CAUSAL_LM", "token_indices": config.token_indices,
        "target_modules": config.targets, "init_weights": config.init_weights, "inference_mode": True,
        "auto_mapping": None, "base_model_name_or_path": None, "revision": None,
    }, state, {}


def load_peft(model: nn.Module, path: Path, peft: dict, tensors: dict, adapter_name: str):
    """Attach PEFT's TRAINABLE_TOKENS folder: every targeted layer must have its D of shape (n, C), and every key
    must belong to one (a tied lm_head's key, if there, must equal the embedding's); all checked before the
    model changes."""
    where = path / CONFIG_FILE
    check_fields(peft, where, _FIELDS)
    indices = peft.get("token_indices")
    try:
        config = TrainableTokensConfig(token_indices=indices, targets=peft.get("target_modules"),
                                       init_weights=peft.get("init_weights") is not False).resolve()
    except ValueError as e:
        raise AdapterError(f"{where}: field 'token_indices': {e}") from None
    plan, problems = _plan(model, config)
    if problems or not plan:
        raise AdapterError(f"{where}: " + ("; ".join(problems) or f"target_modules {config.targets!r} select no "
                                                                   "embedding of this model"))
    modules = dict(model.named_modules())
    expected = {name: (len(config.token_indices), modules[name].weight.shape[1]) for name in plan}
    tied_key = f"{PREFIX}lm_head{KEY}"
    tied = tensors.get(tied_key) if _tied(model) and "model.embed_tokens" in plan else None
    rest = {k: t for k, t in tensors.items() if not (tied is not None and k == tied_key)}
    found = match_keys(path, rest, KEY, expected, modules, "trainable tokens", "embedding", config.targets)
    if tied is not None and not torch.equal(tied, found["model.embed_tokens"]):
        raise AdapterError(f"{path}: {tied_key} differs from the embedding's rows, but lm_head is tied to "
                           "embed_tokens here: one matrix cannot hold both")

    # Checked: now change the model.
    layers = _attach(model, plan, adapter_name, config)
    with torch.no_grad():
        for name, t in found.items():
            layers[name].trainable_tokens_delta[adapter_name].copy_(t)
    register_config(model, adapter_name, config)


def _token_ids(text: str) -> list[int]:
    """--token-indices on the command line: token ids separated by commas."""
    try:
        ids = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected token ids separated by commas, got {text!r}") from None
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative token ids separated by commas, got {text!r}")
    return ids


def _token_list(text: str) -> list[str]:
    """--new-tokens on the command line: the tokens separated by commas, each kept exactly as typed."""
    return text.split(",")


TRAINABLE_TOKENS = Method(
    "trainable_tokens",
    lambda model, token_indices=None, new_tokens=None, special_tokens=False, targets=None, tokenizer=None:
        apply_trainable_tokens(model, token_indices=token_indices, targets=targets, new_tokens=new_tokens,
                               tokenizer=tokenizer, special=special_tokens),
    "trainable tokens: only chosen rows of the embedding (and a tied lm_head) train; new tokens too",
    lr=1e-3, mergeable=True, peft_type="TRAINABLE_TOKENS", uses_tokenizer=True, options=(
        Option("token_indices", None, "token ids whose embedding rows train, separated by commas (default: the "
                                      "tokenizer's special tokens)", type=_token_ids),
        Option("new_tokens", None, "tokens to add to the tokenizer and the vocabulary (normal added tokens, as "
                                   "transformers' add_tokens), separated by commas; their rows train (an untied "
                                   "lm_head's too). train sft saves the extended base and tokenizer in OUT/base",
               type=_token_list),
        Option("special_tokens", False, "add the --new-tokens as special tokens (add_special_tokens: decoding with "
                                        "skip_special_tokens drops them, so answers do not show them)", flag=True),
        Option("targets", None, "embedding layers: embed_tokens (PEFT's default), or embed_tokens,lm_head to "
                                "train an untied lm_head's rows too", type=targets_option)),
    to_peft=to_peft, load_peft=load_peft,
    targetable=lambda module: isinstance(module, (nn.Embedding, TrainableTokensLayer)) or type(module) is nn.Linear)
