"""A decoder-only transformer for the Llama family and its relatives, with Hugging Face's parameter names and math.

    h   = x + o_proj(Attention(RoPE(q_proj(n1(x))), RoPE(k_proj(n1(x))), v_proj(n1(x))))
    out = h + down_proj(act(gate_proj(n2(h))) * up_proj(n2(h)))          n1, n2: RMSNorm, act: silu

What each family changes, as config fields read in the places marked `# family:` below:
- Llama 2/3, SmolLM/SmolLM2: the equations above; Llama 3.1 scales RoPE (`rope.py` has every scaling).
- Mistral: sliding-window attention (a key is seen by the next `sliding_window` queries only).
- Qwen2/2.5: q/k/v biases. Qwen3: RMSNorm over each head of q and k before RoPE.
- Gemma 2/3: GeGLU (act = tanh-GELU); RMSNorm times (1 + w); embeddings times sqrt(C); "sandwich" norms
  (the attention's and the MLP's outputs are normed too); scores scaled by query_pre_attn_scalar^-1/2;
  sliding and global layers by `layer_types`. Gemma 2 soft-caps scores and logits (cap * tanh(x / cap));
  Gemma 3 norms q/k per head, and its sliding layers use a RoPE base of their own.
- Phi-3/Phi-4-mini: fused qkv_proj = [q; k; v] and gate_up_proj = [gate; up] as the checkpoint stores them;
  only the first part of each head rotates (partial_rotary_factor); longrope scaling.
- Qwen3-MoE, Mixtral: a sparse Mixture-of-Experts block (`moe.py`) in place of the MLP, in the layers the
  config names; Mixtral calls it block_sparse_moe and its experts' linears w1, w3, w2.
Grouped-query attention runs through `F.scaled_dot_product_attention` (soft-capped scores, which SDPA
cannot cap, are written out; LLaMA-Adapter's gated branch is left uncapped, as no reference caps it), but
for one cached token a row, where two grouped products (`decode_attention`) are faster on CPU. Module
names are transformers' (`model.layers.0.self_attn.q_proj`, ...), so
a checkpoint loads without a key map and a PEFT key is "base_model.model." + name.

This file knows nothing about LoRA, quantization or prompts. Methods attach by swapping modules, or
through two seams: `inputs_embeds`, and `kv_prefix`, a module that gives each layer extra keys/values
(`Prefix`) seen by every query. A *joint* prefix of P positions (prefix tuning; prompt tuning and
p-tuning, whose virtual tokens' keys/values it is) sits before the tokens under one softmax: it shifts
token positions by P, is always visible whatever the attention mask says, and is written once into
the KV cache when the cache is made. A *gated* prefix (LLaMA-Adapter) gets its own softmax whose
output, scaled by a gate, is added to the attention's. Left out on purpose: tensor parallelism, fusing
q/k/v where the checkpoint keeps them apart (it would move the keys), and FlashAttention (packed batches
use a block-diagonal mask on plain SDPA instead).

Dimensions: B batch, T new tokens, S keys (cached + new), C hidden, nh query heads, nkv key/value
heads, hs head dim, V vocabulary.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .moe import SparseMoE
from .precision import compute_dtype
from .rope import RoPE, apply_rope


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 and cast back before the weight, as HF does.

    family: Gemma (plus_one) scales by (1 + w), w stored around 0, and multiplies before the cast back."""

    def __init__(self, dim: int, eps: float, plus_one: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))
        self.eps, self.plus_one = eps, plus_one

    def forward(self, x):
        w = 1.0 + self.weight.float() if self.plus_one else self.weight
        if x.dtype == torch.float32:  # the same math in one fused op: about 1.8x faster forward + backward on CPU
            return F.rms_norm(x, (x.shape[-1],), w, self.eps)
        dtype = x.dtype
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * w).to(dtype) if self.plus_one else w * y.to(dtype)


@dataclass
class Prefix:
    """Extra keys/values for one layer: k, v (B|1, nkv, P, hs), already in attention space.

    gate None: joined with the tokens' keys under one softmax. Else (LLaMA-Adapter): attended with a
    separate softmax, and gate * that output is added to the attention output before o_proj.
    """

    k: torch.Tensor
    v: torch.Tensor
    gate: torch.Tensor | None = None


def joint_length(prefixes: list[Prefix | None] | None) -> int:
    """P, the positions of the joint prefix (0 if none); every layer's joint prefix has the same P."""
    return next((p.k.shape[2] for p in prefixes or () if p is not None and p.gate is None), 0)


class KVCache:
    """Keys and values of every layer, preallocated: k[l], v[l] are (B, nkv, S_max, hs).

    `length` positions are filled. A forward with T new tokens writes them at [length, length + T)
    in every layer and attends over [0, length + T); the model then advances `length` by T. A joint
    prefix is written at [0, P) when the cache is made (`prefix_length` = P); gated prefixes are kept
    as they are (`gated`), for every later forward.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int, dtype, device,
                 prefixes: list[Prefix | None] | None = None):
        P = joint_length(prefixes)
        shape = (batch_size, config.num_key_value_heads, max_length + P, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.length = 0
        self.max_length = max_length + P
        self.prefix_length = P
        self.gated = [p if p is not None and p.gate is not None else None for p in prefixes or ()] or None
        for layer, p in enumerate(prefixes or ()):
            if p is not None and p.gate is None:
                self.update(layer, p.k.expand(batch_size, -1, -1, -1), p.v.expand(batch_size, -1, -1, -1))
        self.length = P

    def update(self, layer: int, k, v):
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; {end} were asked for")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, nkv, S, hs)

    def take(self, rows: torch.Tensor) -> KVCache:
        """This cache's rows `rows` (B',) as a new cache of B' rows: a prompt computed once for the rows that
        repeat it. Only for caches without a prefix (whose tensors may be shared by all rows)."""
        if self.prefix_length or self.gated:
            raise ValueError("a KV cache that holds a prefix cannot be re-indexed by rows")
        new = copy.copy(self)  # length, max_length, prefix_length, gated: the same
        new.k, new.v = [t[rows] for t in self.k], [t[rows] for t in self.v]  # (B', nkv, S_max, hs) each
        return new


class PromptKV:
    """A KV cache that keeps autograd's graph: it records a forward's keys and values, then joins them to others.

    Passed as `kv_cache` to a forward over a prompt (1, P), it records each layer's keys and values as
    computed (again, unchanged, when a checkpointed layer is recomputed). After `join()`, it gives one
    forward over continuations (B, T) each layer's recorded keys joined (torch.cat, no in-place write) to
    the continuations' own, at positions P, P + 1, ... Training on the G samples of a prompt (GRPO) then
    runs the prompt once, and its gradient is the sum of the rows', as if each row had run it. Uses: the
    rollouts' shared prompts (train/rollout.py) and prompt tuning's virtual tokens (recorded only).
    """

    gated, prefix_length = None, 0

    def __init__(self):
        self.k: dict[int, torch.Tensor] = {}  # layer -> (1, nkv, P, hs)
        self.v: dict[int, torch.Tensor] = {}
        self.length = 0  # positions before the next forward's tokens: the model sets it to P after the prompt's
        self.joining = False

    def join(self) -> PromptKV:
        self.joining = True
        return self

    def update(self, layer: int, k, v):
        if not self.joining:
            self.k[layer], self.v[layer] = k, v
            return k, v
        B = k.shape[0]
        return (torch.cat([self.k[layer].expand(B, -1, -1, -1), k], dim=2),  # (B, nkv, P + T, hs)
                torch.cat([self.v[layer].expand(B, -1, -1, -1), v], dim=2))


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c, hs = config, config.head_dim
        self.layer_idx = layer_idx
        self.nh, self.nkv, self.hs = c.num_attention_heads, c.num_key_value_heads, hs
        if c.fused_projections:  # family: Phi-3 stores [q; k; v] as one matrix
            self.qkv_proj = nn.Linear(c.hidden_size, (self.nh + 2 * self.nkv) * hs, bias=c.qkv_bias)
        else:
            self.q_proj = nn.Linear(c.hidden_size, self.nh * hs, bias=c.qkv_bias)
            self.k_proj = nn.Linear(c.hidden_size, self.nkv * hs, bias=c.qkv_bias)
            self.v_proj = nn.Linear(c.hidden_size, self.nkv * hs, bias=c.qkv_bias)
        self.o_proj = nn.Linear(self.nh * hs, c.hidden_size, bias=c.o_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(hs, c.rms_norm_eps, c.norm_plus_one)
            self.k_norm = RMSNorm(hs, c.rms_norm_eps, c.norm_plus_one)
        # family: Gemma scales scores by query_pre_attn_scalar^-1/2 (None: SDPA's head_dim^-1/2); Gemma 2 caps them
        self.qk_scale = c.query_pre_attn_scalar ** -0.5 if c.query_pre_attn_scalar else None
        self.softcap = c.attn_logit_softcapping

    def qkv(self, x):
        """q (B, T, nh, hs), k and v (B, T, nkv, hs)."""
        B, T, _ = x.shape
        if hasattr(self, "qkv_proj"):
            q, k, v = self.qkv_proj(x).split([self.nh * self.hs, self.nkv * self.hs, self.nkv * self.hs],
                                             dim=-1)  # (B, T, nh hs), (B, T, nkv hs), (B, T, nkv hs)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return q.view(B, T, self.nh, self.hs), k.view(B, T, self.nkv, self.hs), v.view(B, T, self.nkv, self.hs)

    def forward(self, x, cos, sin, mask, kv_cache, prefix: Prefix | None = None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        v = v.transpose(1, 2)  # (B, nkv, T, hs)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # (B, nh, T, hs)
        k = apply_rope(k.transpose(1, 2), cos, sin)  # (B, nkv, T, hs)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nkv, S, hs)
        elif prefix is not None and prefix.gate is None:  # joint prefix (with a cache it is in the cache)
            k = torch.cat([prefix.k.expand(B, -1, -1, -1), k], dim=2)  # (B, nkv, S, hs)
            v = torch.cat([prefix.v.expand(B, -1, -1, -1), v], dim=2)
        # mask: None (no constraint), "causal" (square, no cache), or a bool tensor (B, 1, T, S).
        is_causal = isinstance(mask, str)
        gqa = self.nkv != self.nh
        if gqa and (self.softcap or torch.is_tensor(mask) and T > 1):
            # Measured on CPU (torch 2.13): with a mask tensor and many queries, SDPA's GQA path is slower
            # than giving each query head its own copy of its key/value head, so copy.
            k, v = (t.repeat_interleave(self.nh // self.nkv, dim=1) for t in (k, v))  # (B, nh, S, hs)
            gqa = False
        if self.softcap:  # family: Gemma 2, scores -> cap * tanh(scores / cap) before the mask, written out
            scores = q @ k.transpose(2, 3) * (self.qk_scale or self.hs ** -0.5)  # (B, nh, T, S)
            scores = torch.tanh(scores / self.softcap) * self.softcap
            if is_causal:
                mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril()
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            y = scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v  # (B, nh, T, hs)
        elif T == 1 and kv_cache is not None:
            y = decode_attention(q, k, v, mask, self.qk_scale or self.hs ** -0.5)  # (B, nh, 1, hs)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if is_causal else mask, is_causal=is_causal, enable_gqa=gqa, scale=self.qk_scale
            )  # (B, nh, T, hs)
        if prefix is not None and prefix.gate is not None:  # gated prefix: its own softmax, no mask
            y = y + prefix.gate * F.scaled_dot_product_attention(
                q, prefix.k.expand(B, -1, -1, -1), prefix.v.expand(B, -1, -1, -1), enable_gqa=self.nkv != self.nh,
                scale=self.qk_scale)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hs))  # (B, T, C)


def decode_attention(q, k, v, mask, scale: float):
    """softmax(q k^T * scale) v for one new token per row, q (B, nh, 1, hs) against the cache's k, v (B, nkv, S,
    hs), the query heads that share a key/value head stacked as rows of one product (no copies of k and v).
    Measured on CPU (torch 2.13, SmolLM2 at 32 rows): SDPA's flash kernel takes about 0.8 ms a layer in fp32
    and 1.9 ms in bf16 for this, the two products below a tenth of that. Scores and softmax in fp32."""
    B, nh, _, hs = q.shape
    nkv = k.shape[1]
    scores = (q.reshape(B, nkv, nh // nkv, hs).float() @ k.float().transpose(2, 3)) * scale  # (B, nkv, nh/nkv, S)
    if mask is not None:  # (B|1, 1, 1, S)
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1).to(v.dtype) @ v).view(B, nh, 1, hs)


def activation(config: ModelConfig):
    """The gate's nonlinearity. family: Gemma's GeGLU uses the tanh approximation of GELU ("gelu_pytorch_tanh")."""
    return F.silu if config.hidden_act == "silu" else partial(F.gelu, approximate="tanh")


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        C, I, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        if config.fused_projections:  # family: Phi-3 stores [gate; up] as one matrix
            self.gate_up_proj = nn.Linear(C, 2 * I, bias=bias)
        else:
            self.gate_proj = nn.Linear(C, I, bias=bias)
            self.up_proj = nn.Linear(C, I, bias=bias)
        self.down_proj = nn.Linear(I, C, bias=bias)
        self.act = activation(config)

    def forward(self, x):
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, T, I) each
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        C, eps, one = config.hidden_size, config.rms_norm_eps, config.norm_plus_one
        self.input_layernorm = RMSNorm(C, eps, one)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(C, eps, one)
        if config.sandwich_norms:  # family: Gemma 2/3, post_attention_layernorm norms the attention's output
            self.pre_feedforward_layernorm = RMSNorm(C, eps, one)
            self.post_feedforward_layernorm = RMSNorm(C, eps, one)
        # family: Qwen3-MoE and Mixtral route tokens to experts (moe.py), in every layer or those the config says
        ffn = SparseMoE(config, activation(config)) if config.sparse_layers[layer_idx] else MLP(config)
        if config.model_type == "mixtral" and not config.fused_experts:
            self.block_sparse_moe = ffn  # Mixtral's checkpoint name for it
        else:
            self.mlp = ffn

    def feed_forward(self, x):
        return self.mlp(x) if hasattr(self, "mlp") else self.block_sparse_moe(x)

    def forward(self, x, cos, sin, mask, kv_cache=None, prefix=None):
        if hasattr(self, "pre_feedforward_layernorm"):
            x = x + self.post_attention_layernorm(self.self_attn(matmul_input(self.input_layernorm(x)), cos, sin, mask,
                                                                 kv_cache, prefix))
            return x + self.post_feedforward_layernorm(self.feed_forward(matmul_input(self.pre_feedforward_layernorm(x))))
        x = x + self.self_attn(matmul_input(self.input_layernorm(x)), cos, sin, mask, kv_cache, prefix)
        return x + self.feed_forward(matmul_input(self.post_attention_layernorm(x)))


def matmul_input(h):
    """A norm's output, which only matmuls read (q/k/v or gate/up, LoRA's A, a router), as they read it. Under
    autocast without a graph (generation), cast once here rather than by each of them: the same rounding,
    done once. With a graph each keeps its own cast, so that their gradients are summed in fp32."""
    if torch.is_grad_enabled():
        return h
    return h.to(compute_dtype(h))


class Decoder(nn.Module):
    """The `model.` prefix of HF's checkpoints: embeddings, blocks, final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        pad = config.pad_token_id  # as HF: the padding row gets no gradient
        pad = pad if isinstance(pad, int) and 0 <= pad < config.vocab_size else None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=pad)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_plus_one)
        # family: Gemma multiplies the embeddings by sqrt(C), rounded to fp32 then to the weights' dtype, as HF
        self.embed_scale = float(torch.tensor(config.hidden_size ** 0.5, device="cpu")) if config.embed_scale else None

    def embed(self, input_ids):
        x = self.embed_tokens(input_ids)  # (B, T, C)
        if x.dtype != torch.float32 and torch.is_autocast_enabled(x.device.type):
            x = x.float()  # mixed precision (precision.py): the residual stream stays fp32
        return x if self.embed_scale is None else x * torch.tensor(self.embed_scale, dtype=x.dtype)


def build_mask(T, S, past, device, attention_mask=None, seq_ids=None, window=None, prefix=0):
    """Which keys each query may see: None / "causal" when SDPA needs no tensor, else bool (B|1, 1, T, S).

    Query t sits at cache index past + t; key s is visible when s <= past + t (causal), the key is not
    padding (attention_mask[b, s] == 1, over all S keys), it is in the same packed document (seq_ids) or
    in the joint prefix (s < prefix), and it is within the sliding window (past + t - s < window).
    Every query also sees itself, so that the rows of left-padding queries are not empty (an all-False
    row would make SDPA return NaN).
    """
    if attention_mask is None and seq_ids is None and (window is None or S <= window):
        if T == 1:
            return None
        if past == 0:
            return "causal"
    q_idx = torch.arange(past, past + T, device=device)[:, None]  # (T, 1)
    k_idx = torch.arange(S, device=device)[None, :]  # (1, S)
    mask = k_idx <= q_idx  # (T, S)
    if window is not None:
        mask = mask & (q_idx - k_idx < window)
    mask = mask[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :].bool()  # (B, 1, T, S)
    if seq_ids is not None:
        if past != prefix:
            raise ValueError("seq_ids (packed sequences) cannot be combined with a KV cache")
        same = seq_ids[:, None, :, None] == seq_ids[:, None, None, :]  # (B, 1, T, T)
        mask = mask & F.pad(same, (prefix, 0), value=True)  # (B, 1, T, S): the prefix is every document's
    return mask | (k_idx == q_idx)[None, None]


def packed_position_ids(seq_ids):
    """Per-document positions for packed rows: seq_ids (B, T) -> 0, 1, 2, ... restarting at each new id."""
    T = seq_ids.shape[1]
    idx = torch.arange(T, device=seq_ids.device).expand_as(seq_ids)  # (B, T)
    new_doc = torch.ones_like(seq_ids, dtype=torch.bool)
    new_doc[:, 1:] = seq_ids[:, 1:] != seq_ids[:, :-1]
    start = torch.where(new_doc, idx, torch.zeros_like(idx)).cummax(dim=1).values  # (B, T)
    return idx - start


class SoftCapped(nn.Module):
    """family: Gemma 2's logits, cap * tanh(head(h) / cap). Made on demand by `Transformer.head`; holds no weights."""

    def __init__(self, head: nn.Module, cap: float):
        super().__init__()
        self.inner, self.cap = head, cap

    def forward(self, h):
        return torch.tanh(self.inner(h) / self.cap) * self.cap


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope = RoPE(config)
        self.gradient_checkpointing = False
        # The seam for prefix methods: a module called as kv_prefix(batch_size) -> one Prefix or None per
        # layer (or None when it has nothing active). Set by prefix tuning, prompt tuning, p-tuning and
        # LLaMA-Adapter (minicustom/methods/).
        self.kv_prefix: nn.Module | None = None
        # Adapter name -> its method's config, for the adapters attached to this model (the model itself reads
        # none of it: saving an adapter reads it to know the method).
        self.adapter_configs: dict[str, object] = {}

    def prefixes(self, batch_size: int) -> list[Prefix | None] | None:
        return self.kv_prefix(batch_size) if self.kv_prefix is not None else None

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward_hidden(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, position_ids=None,
                       seq_ids=None, kv_cache: KVCache | None = None):
        """Final-norm hidden states (B, T, C).

        input_ids (B, T) or inputs_embeds (B, T, C); attention_mask (B, S - P) with 1 for real tokens
        over cached + new token positions (left padding); seq_ids (B, T) marks packed documents, which
        then see only themselves and get per-document positions; position_ids count tokens (default
        past, past + 1, ...) and are shifted by the P positions of a joint prefix, as PEFT's are.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.model.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        if T == 0:
            raise ValueError("empty input: at least one token is needed")
        if kv_cache is not None:  # its joint prefix is in it already
            prefixes, P, past = kv_cache.gated, kv_cache.prefix_length, kv_cache.length
        else:
            prefixes = self.prefixes(B)
            P = past = joint_length(prefixes)
        S = past + T
        if attention_mask is not None:
            if attention_mask.shape[-1] != S - P:
                raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions; expected {S - P}"
                                 f" ({past - P} cached + {T} new)")
            attention_mask = F.pad(attention_mask, (P, 0), value=1)  # (B, S): the prefix is never padding
        if position_ids is None:
            position_ids = (packed_position_ids(seq_ids) + P if seq_ids is not None
                            else torch.arange(past, S, device=x.device).expand(B, T))
        else:
            position_ids = position_ids + P
        kinds = set(self.config.layer_types)  # family: Gemma alternates sliding and global layers
        masks = {kind: build_mask(T, S, past, x.device, attention_mask, seq_ids,
                                  self.config.sliding_window if kind == "sliding_attention" else None, P)
                 for kind in kinds}
        tables = {kind: self.rope.tables(position_ids, kind, x.dtype) for kind in kinds}  # cos, sin (B, T, d)
        for i, (layer, kind) in enumerate(zip(self.model.layers, self.config.layer_types)):
            prefix = prefixes[i] if prefixes is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, *tables[kind], masks[kind], kv_cache, prefix, use_reentrant=False)
            else:
                x = layer(x, *tables[kind], masks[kind], kv_cache, prefix)
        if kv_cache is not None:
            kv_cache.length = S
        return self.model.norm(x)

    def forward(self, input_ids=None, **kwargs):
        """Logits (B, T, V); keyword arguments as in `forward_hidden`."""
        return self.head()(self.forward_hidden(input_ids, **kwargs))

    def head(self) -> nn.Module:
        """The module that maps hidden states to logits: lm_head, soft-capped where the family says so."""
        cap = self.config.final_logit_softcapping
        return self.lm_head if cap is None else SoftCapped(self.lm_head, cap)

    def new_kv_cache(self, batch_size: int, max_length: int) -> KVCache:
        """A cache for max_length tokens, holding the active prefix (if any) besides them."""
        w = self.model.embed_tokens.weight
        return KVCache(self.config, batch_size, max_length, w.dtype, w.device, self.prefixes(batch_size))

    def generate(self, input_ids, max_new_tokens: int = 32, **kwargs):
        """Continue input_ids (B, T) by up to max_new_tokens; see `minicustom.generate.generate`."""
        from .generate import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Run the block in eval mode (no dropout): generation, log-probs without a graph, held-out loss. The
    caller's mode comes back, even on an error."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
