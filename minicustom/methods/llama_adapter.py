"""LLaMA-Adapter (Zhang et al., 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models with
Zero-init Attention", arXiv:2303.16199).

The top L layers each get an adaption prompt A^l (n, C) of learned vectors. The layer's own frozen
projections turn it into keys and values, and the tokens' queries attend to them with a softmax of
their own, scaled by a gate g^l that starts at zero:

    y = Attention(q, K, V) + g^l · softmax(q (W_k A^l)^T / √hs) (W_v A^l)         before o_proj

With g = 0 the model is exactly the base at step 0 ("zero-init attention"), and the gate learns how
much of the prompt to let in. The adapter keys carry no RoPE (they are not at any position); the
queries are the layer's rotated ones. Grouped-query models share each key/value head among its query
heads, as for the tokens; models with per-head key norms (Qwen3) norm the adapter keys too.

The prompts reach the model through its `kv_prefix` seam as *gated* prefixes (model.py): one extra
SDPA call per adapted layer. In generation their keys/values are computed once, when the KV cache is
made. Left out: the paper's multi-modal (image-conditioned) variant.

Files: PEFT's ADAPTION_PROMPT format, "base_model.model.model.layers.{i}.self_attn.adaption_prompt"
(1, n, C) and "...adaption_gate" (1,), adapter_len = n, adapter_layers = L. PEFT's own implementation
adds o_proj(gate · ...) after o_proj, which is the same product when o_proj has no bias (Llama,
Mistral); with a bias, PEFT adds it a second time (even at g = 0) and we do not.

Dimensions: L adapted layers, n prompt length, C hidden, nkv key/value heads, hs head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..argtypes import COUNT
from ..model import Prefix
from .base import (
    Method,
    Option,
    PrefixLayer,
    adapter_configs,
    prefix_layer,
    register_config,
    report,
    set_adapter,
)
from .peft_format import CONFIG_FILE, PREFIX, WEIGHTS_FILE, AdapterError, check_fields


@dataclass
class LlamaAdapterConfig:
    peft_type: ClassVar[str] = "ADAPTION_PROMPT"

    adapter_len: int = 10  # n
    adapter_layers: int = 8  # L, counted from the top

    def __post_init__(self):
        if self.adapter_len <= 0 or self.adapter_layers <= 0:
            raise ValueError(f"adapter_len and adapter_layers must be positive, got {self.adapter_len}, "
                             f"{self.adapter_layers}")


class AdaptionPrompts(nn.Module):
    """One adapter: prompts (L, n, C), N(0, 1) as PEFT, and gates (L,) at zero."""

    def __init__(self, L: int, n: int, C: int, device=None, dtype=None):
        super().__init__()
        self.prompt = nn.Parameter(torch.randn(L, n, C, device=device, dtype=dtype))
        self.gate = nn.Parameter(torch.zeros(L, device=device, dtype=dtype))


class LlamaAdapter(PrefixLayer):
    """The model's kv_prefix: named adaption prompts; the active one gives each top layer a gated prefix."""

    name_of_method = "LLaMA-Adapter"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.adaption = nn.ModuleDict()  # adapter name -> AdaptionPrompts
        self._layers = [model.model.layers]  # a list: the model is not registered as a child of its own seam

    def encoders(self) -> nn.ModuleDict:
        return self.adaption

    def forward(self, batch_size: int) -> list[Prefix | None] | None:
        if (a := self.active_adapter()) is None:
            return None
        layers = self._layers[0]
        first = len(layers) - a.prompt.shape[0]
        out: list[Prefix | None] = [None] * first
        for j, block in enumerate(layers[first:]):
            attn = block.self_attn
            A = a.prompt[j][None]  # (1, n, C)
            _, k, v = attn.qkv(A)  # (1, n, nkv, hs) each
            if hasattr(attn, "k_norm"):
                k = attn.k_norm(k)
            out.append(Prefix(k.transpose(1, 2), v.transpose(1, 2), gate=a.gate[j]))  # (1, nkv, n, hs)
        return out


def _add(model: nn.Module, config: LlamaAdapterConfig, adapter_name: str) -> AdaptionPrompts:
    c, w = model.config, model.model.embed_tokens.weight
    if config.adapter_layers > c.num_hidden_layers:
        raise ValueError(f"adapter_layers={config.adapter_layers}, but the model has {c.num_hidden_layers} layers")
    module = prefix_layer(model, LlamaAdapter, model)
    register_config(model, adapter_name, config)
    prompts = AdaptionPrompts(config.adapter_layers, config.adapter_len, c.hidden_size, w.device, w.dtype)
    module.adaption[adapter_name] = prompts
    return prompts


def apply_llama_adapter(model: nn.Module, adapter_len: int = 10, adapter_layers: int = 8,
                        adapter_name: str = "default", verbose: bool = True,
                        config: LlamaAdapterConfig | None = None) -> nn.Module:
    """Attach LLaMA-Adapter as adapter `adapter_name` (top `adapter_layers` layers, `adapter_len` prompt
    vectors each), make it the active one, and freeze everything else."""
    config = config or LlamaAdapterConfig(adapter_len, adapter_layers)
    _add(model, config, adapter_name)
    set_adapter(model, adapter_name)
    if verbose:
        report(model, f"LLaMA-Adapter '{adapter_name}' (top {config.adapter_layers} layers)")
    return model


# -- PEFT files -------------------------------------------------------------------------------------

def _key(layer: int, what: str) -> str:
    return f"{PREFIX}model.layers.{layer}.self_attn.adaption_{what}"


def to_peft(model: nn.Module, adapter_name: str):
    config: LlamaAdapterConfig = adapter_configs(model)[adapter_name]
    a = model.kv_prefix.adaption[adapter_name]
    first = model.config.num_hidden_layers - config.adapter_layers
    tensors = {}
    for j in range(config.adapter_layers):
        tensors[_key(first + j, "prompt")] = a.prompt[j][None]  # (1, n, C)
        tensors[_key(first + j, "gate")] = a.gate[j : j + 1]  # (1,)
    peft = {"peft_type": "ADAPTION_PROMPT", "task_type": "CAUSAL_LM", "adapter_len": config.adapter_len,
            "adapter_layers": config.adapter_layers, "target_modules": "self_attn", "inference_mode": True}
    return peft, tensors, {}


def load_peft(model: nn.Module, path: Path, peft: dict, tensors: dict, adapter_name: str):
    where, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    check_fields(peft, where, {"adapter_len": "positive int", "adapter_layers": "positive int",
                               "target_modules": "str"})
    n, L = peft.get("adapter_len"), peft.get("adapter_layers")
    for field, value in (("adapter_len", n), ("adapter_layers", L)):
        if value is None:
            raise AdapterError(f"{where}: field {field!r} is missing")
    if peft.get("target_modules") not in (None, "self_attn"):
        raise AdapterError(f"{where}: target_modules={peft['target_modules']!r} is not supported (self_attn)")
    layers, C = model.config.num_hidden_layers, model.config.hidden_size
    if L > layers:
        raise AdapterError(f"{where}: adapter_layers={L}, but this model has {layers} layers")
    first = layers - L
    wanted = {_key(first + j, w): s for j in range(L) for w, s in (("prompt", (1, n, C)), ("gate", (1,)))}
    problems = [f"{k}: unexpected key" for k in sorted(set(tensors) - set(wanted))]
    problems += [f"{k}: missing" for k in sorted(set(wanted) - set(tensors))]
    problems += [f"{k}: shape {tuple(t.shape)}, expected {wanted[k]}" for k, t in sorted(tensors.items())
                 if k in wanted and tuple(t.shape) != wanted[k]]
    if problems:
        raise AdapterError(f"{weights}: the adapter does not fit this model:\n  " + "\n  ".join(problems))
    a = _add(model, LlamaAdapterConfig(n, L), adapter_name)
    with torch.no_grad():
        for j in range(L):
            a.prompt[j].copy_(tensors[_key(first + j, "prompt")][0])
            a.gate[j].copy_(tensors[_key(first + j, "gate")][0])


def _apply(model: nn.Module, adapter_len=10, adapter_layers=None) -> nn.Module:
    if adapter_layers is None:  # the paper's top 8 layers, or every layer of a smaller model
        adapter_layers = min(8, model.config.num_hidden_layers)
    return apply_llama_adapter(model, adapter_len=adapter_len, adapter_layers=adapter_layers)


LLAMA_ADAPTER = Method("llama-adapter", _apply, "LLaMA-Adapter: gated prompts in the top layers' attention", lr=1e-2,
                       mergeable=False, peft_type="ADAPTION_PROMPT", options=(
                           Option("adapter_len", 10, "prompt vectors per layer", type=COUNT),
                           Option("adapter_layers", None, "adapted layers, from the top (default: 8, or every layer "
                                  "of a smaller model)", type=COUNT)),
                       to_peft=to_peft, load_peft=load_peft)
