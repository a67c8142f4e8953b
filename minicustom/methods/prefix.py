"""Prefix tuning (Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation",
arXiv:2101.00190).

Every layer l gets P learned key/value vectors that every query attends to before the tokens:

    head_i = softmax(q_i [P_k^l; K]^T / √hs) [P_v^l; V]            P_k^l, P_v^l: (nkv, P, hs)

Only the prefixes are trained. The paper found optimizing them directly unstable and reparameterises
them through an MLP, P^l = MLP(E) with E (P, D): `projection=True` gives PEFT's form,
Embedding(P, D) -> Linear(D, h) -> Tanh -> Linear(h, 2 L D). Without it the prefixes are themselves
an Embedding(P, 2 L D). D = nkv · hs, the width of one layer's keys, so grouped-query models get
prefixes sized to their key/value heads (PEFT does the same since its #1901); the 2 L D outputs are
ordered [layer 0 keys, layer 0 values, layer 1 keys, ...], each D split into nkv heads of hs, which
is PEFT's layout (`get_prompt`). Prefixes are already in attention space: no RoPE is applied to them,
and the tokens' positions start at P, as in PEFT (transformers counts the prefix as cached tokens).

The prefixes reach the model through its `kv_prefix` seam (model.py): in training they are joined to
each layer's keys inside the (possibly checkpointed) block; in generation they are written into the
KV cache once, when the cache is made. Not identity at init: P keys always take part of the softmax.

Files: PEFT's PREFIX_TUNING format, `prompt_embeddings` (P, 2 L D), the prefixes themselves (PEFT
saves the MLP's output, not the MLP). With the projection, the encoder is also written to
`prefix_encoder.safetensors` so that training can resume; loading uses it when it is there and
otherwise takes the exported prefixes as plain embeddings, as PEFT does in inference mode.

Dimensions: L layers, P virtual tokens, D = nkv · hs, h encoder hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..model import Prefix
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

ENCODER_FILE = "prefix_encoder.safetensors"


@dataclass
class PrefixConfig:
    peft_type: ClassVar[str] = "PREFIX_TUNING"

    num_virtual_tokens: int = 20
    projection: bool = False  # reparameterise through Embedding -> Linear -> Tanh -> Linear
    encoder_hidden_size: int | None = None  # h; None: D
    init: str = "random"  # "random" (nn.Embedding / nn.Linear defaults, as PEFT) or "zero" (PEFT's init_weights)

    def __post_init__(self):
        if self.num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens must be positive, got {self.num_virtual_tokens}")
        if self.init not in ("random", "zero"):
            raise ValueError(f"init {self.init!r} is not supported; supported: random, zero")


class PrefixEncoder(nn.Module):
    """(P, 2 L D) prefixes: an embedding, or an embedding through a two-layer tanh MLP."""

    def __init__(self, P: int, L: int, D: int, projection: bool, hidden: int, init: str, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        if projection:
            self.embedding = nn.Embedding(P, D, **kw)
            self.transform = nn.Sequential(nn.Linear(D, hidden, **kw), nn.Tanh(), nn.Linear(hidden, 2 * L * D, **kw))
            if init == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(P, 2 * L * D, **kw)
            if init == "zero":
                nn.init.zeros_(self.embedding.weight)

    def forward(self) -> torch.Tensor:
        E = self.embedding.weight  # (P, D) or (P, 2 L D)
        return self.transform(E) if hasattr(self, "transform") else E  # (P, 2 L D)


class PrefixTuning(PrefixLayer):
    """The model's kv_prefix: named prefix encoders; the active one gives every layer its keys/values."""

    name_of_method = "prefix tuning"

    def __init__(self, L: int, nkv: int, hs: int):
        super().__init__()
        self.prefix_encoder = nn.ModuleDict()  # adapter name -> PrefixEncoder
        self.L, self.nkv, self.hs = L, nkv, hs

    def encoders(self) -> nn.ModuleDict:
        return self.prefix_encoder

    def forward(self, batch_size: int) -> list[Prefix] | None:
        if (encoder := self.active_adapter()) is None:
            return None
        flat = encoder()  # (P, 2 L D)
        kv = flat.view(-1, 2 * self.L, self.nkv, self.hs).permute(1, 2, 0, 3)  # (2L, nkv, P, hs)
        return [Prefix(kv[2 * i][None], kv[2 * i + 1][None]) for i in range(self.L)]  # (1, nkv, P, hs) each


def _add(model: nn.Module, config: PrefixConfig, adapter_name: str) -> PrefixEncoder:
    c, w = model.config, model.model.embed_tokens.weight
    D = c.num_key_value_heads * c.head_dim
    module = prefix_layer(model, PrefixTuning, c.num_hidden_layers, c.num_key_value_heads, c.head_dim)
    encoder = PrefixEncoder(config.num_virtual_tokens, c.num_hidden_layers, D, config.projection,
                            config.encoder_hidden_size or D, config.init, device=w.device, dtype=w.dtype)
    register_config(model, adapter_name, config)
    module.prefix_encoder[adapter_name] = encoder
    return encoder


def apply_prefix(model: nn.Module, num_virtual_tokens: int = 20, projection: bool = False,
                 encoder_hidden_size: int | None = None, init: str = "random", adapter_name: str = "default",
                 verbose: bool = True, config: PrefixConfig | None = None) -> nn.Module:
    """Attach prefix tuning as adapter `adapter_name`, make it the active one, and freeze everything else."""
    config = config or PrefixConfig(num_virtual_tokens, projection, encoder_hidden_size, init)
    _add(model, config, adapter_name)
    set_adapter(model, adapter_name)
    if verbose:
        report(model, f"prefix tuning '{adapter_name}' ({config.num_virtual_tokens} virtual tokens)")
    return model


# -- PEFT files -------------------------------------------------------------------------------------

def to_peft(model: nn.Module, adapter_name: str):
    config: PrefixConfig = adapter_configs(model)[adapter_name]
    c = model.config
    D = c.num_key_value_heads * c.head_dim
    encoder = model.kv_prefix.prefix_encoder[adapter_name]
    peft = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": config.num_virtual_tokens,
            "token_dim": D, "num_transformer_submodules": 1, "num_attention_heads": c.num_key_value_heads,
            "num_layers": c.num_hidden_layers, "encoder_hidden_size": config.encoder_hidden_size or D,
            "prefix_projection": config.projection, "init_weights": "zero" if config.init == "zero" else None,
            "inference_mode": True}
    extra = {ENCODER_FILE: dict(encoder.named_parameters())} if config.projection else {}
    with torch.no_grad():
        return peft, {"prompt_embeddings": encoder()}, extra


# adapter_config.json fields a PREFIX_TUNING folder is read with, and their kinds (peft_format.check_fields).
_FIELDS = {"num_virtual_tokens": "positive int", "token_dim": "positive int", "num_layers": "positive int",
           "num_attention_heads": "positive int", "num_transformer_submodules": "positive int",
           "encoder_hidden_size": "positive int", "prefix_projection": "bool", "modules_to_save": "name list"}


def load_peft(model: nn.Module, path: Path, peft: dict, tensors: dict, adapter_name: str):
    c = model.config
    D, L = c.num_key_value_heads * c.head_dim, c.num_hidden_layers
    where = path / CONFIG_FILE
    check_fields(peft, where, _FIELDS)
    P = peft.get("num_virtual_tokens")
    if P is None:
        raise AdapterError(f"{where}: field 'num_virtual_tokens' is missing")
    if peft.get("modules_to_save"):
        raise AdapterError(f"{where}: modules_to_save={peft['modules_to_save']!r} is not supported")
    expected = {"num_transformer_submodules": 1, "num_layers": L, "token_dim": D}
    for key, value in expected.items():
        if peft.get(key, value) not in (value, None):
            raise AdapterError(f"{where}: {key}={peft[key]!r}, but this model needs {value} "
                               f"({L} layers, {c.num_key_value_heads} key/value heads of {c.head_dim})")
    if set(tensors) != {"prompt_embeddings"}:
        raise AdapterError(f"{path / WEIGHTS_FILE}: expected one tensor, prompt_embeddings; found "
                           f"{sorted(tensors)}")
    E = tensors["prompt_embeddings"]
    if tuple(E.shape) != (P, 2 * L * D):
        raise AdapterError(f"{path / WEIGHTS_FILE}: prompt_embeddings has shape {tuple(E.shape)}, "
                           f"expected ({P}, {2 * L * D}) = (num_virtual_tokens, 2 · layers · token_dim)")
    projection = bool(peft.get("prefix_projection")) and (path / ENCODER_FILE).exists()
    config = PrefixConfig(P, projection, peft.get("encoder_hidden_size") if projection else None)
    state = {"embedding.weight": E}
    if projection:
        state, _ = read_tensors(path / ENCODER_FILE)
        with torch.device("meta"):
            wanted = PrefixEncoder(P, L, D, True, config.encoder_hidden_size or D, "random").state_dict()
        bad = {k: tuple(v.shape) for k, v in state.items() if k not in wanted or v.shape != wanted[k].shape}
        if bad or set(state) != set(wanted):
            raise AdapterError(f"{path / ENCODER_FILE}: expected {({k: tuple(v.shape) for k, v in wanted.items()})}, "
                               f"found {({k: tuple(v.shape) for k, v in state.items()})}")
    encoder = _add(model, config, adapter_name)
    with torch.no_grad():
        for k, p in encoder.named_parameters():
            p.copy_(state[k])


def _apply(model: nn.Module, num_virtual_tokens=20, prefix_projection=False) -> nn.Module:
    return apply_prefix(model, num_virtual_tokens=num_virtual_tokens, projection=prefix_projection)


PREFIX_TUNING = Method("prefix", _apply, "prefix tuning: learned keys and values before every layer's sequence",
                       lr=1e-2, mergeable=False, peft_type="PREFIX_TUNING", options=(
                           VIRTUAL_TOKENS,
                           Option("prefix_projection", False, "reparameterise the prefix through an MLP", flag=True)),
                       to_peft=to_peft, load_peft=load_peft)
