"""Autoregressive generation with the model's KV cache: greedy, temperature, top-k and top-p sampling.

One prefill forward over the prompt (left-padded when batched), then one token per step for every row.
Positions follow the real tokens (cumsum of the attention mask), so a left-padded row generates exactly
what it would alone. Rows that hit a stop sequence are filled with `pad_token_id` from then on, and the
loop ends when every row has stopped. Left out: beam search, repetition penalties, speculative decoding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .precision import compute_dtype


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int = 0):
    """Ragged token lists -> input_ids (B, T) and attention_mask (B, T), padded on the left."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("empty prompt: every row needs at least one token")
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = torch.as_tensor(r, dtype=torch.long)
        mask[b, T - len(r):] = 1
    return ids, mask


def sample(logits, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None):
    """Next token (B,) from last-position logits (B, V): argmax at temperature 0, else a draw from
    softmax(logits / temperature) restricted to the k most likely tokens and/or the smallest set whose
    probability reaches top_p (the most likely token is always kept)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already reaches p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return draw(logits.softmax(dim=-1), generator)


def draw(probs, generator: torch.Generator | None = None):
    """One index per row of probs (B, V), row b drawn with probability probs[b, i] / sum(probs[b]): the
    first i whose cumulative sum exceeds u * sum, u uniform in [0, 1) (inverse transform sampling, in
    float64). One random number a row, where torch.multinomial draws V of them (30 ms a step at
    32 x 49152 on a 2-core CPU, more than the model's forward at bf16); a zero-probability index is never
    drawn."""
    cdf = probs.double().cumsum(dim=-1)  # (B, V)
    if not bool((cdf[:, -1] > 0).all()):  # nan > 0 is False too
        raise ValueError("cannot sample: a row's probabilities are NaN or all zero (are the model's logits finite?)")
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device, generator=generator)
    index = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # (B, 1): cdf[i-1] <= u * sum < cdf[i]
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1, keepdim=True)  # u * sum rounded up
    return torch.minimum(index, last).squeeze(-1)


def _head(model, h):
    """model.head(), with a plain linear head's weight cast once under autocast rather than at every token
    (the same rounding autocast makes: for SmolLM2's tied 49152 x 576 matrix, 16 ms a token saved)."""
    head, dtype = model.head(), compute_dtype(h)
    if type(head) is not nn.Linear or head.bias is not None or head.weight.dtype == dtype:
        return head
    weight = head.weight.to(dtype)
    return lambda x: F.linear(x.to(dtype), weight)


def _stop_sequences(stop) -> list[list[int]]:
    if stop is None:
        return []
    if isinstance(stop, int):
        return [[stop]]
    return [[s] if isinstance(s, int) else list(s) for s in stop if isinstance(s, int) or len(s)]


def _prefill(model, input_ids, attention_mask, position_ids, max_length: int):
    """Run the prompts (B, T) into a new KV cache for max_length tokens; returns it and the last hidden state
    (B, C). Rows that repeat a prompt (the G samples of one prompt GRPO draws) share its forward: the distinct
    prompts are run once and their cache rows copied to every row that holds them."""
    B, device = input_ids.shape[0], input_ids.device
    key = input_ids if attention_mask is None else torch.cat([input_ids, attention_mask], dim=1)
    distinct, rows = torch.unique(key, dim=0, return_inverse=True)
    if model.kv_prefix is not None or len(distinct) == B:
        cache = model.new_kv_cache(B, max_length)
        h = model.forward_hidden(input_ids, attention_mask=attention_mask, position_ids=position_ids, kv_cache=cache)
        return cache, h[:, -1]
    first = torch.full((len(distinct),), B, device=device).scatter_reduce(
        0, rows, torch.arange(B, device=device), "amin")  # (U,) a row holding each distinct prompt
    cache = model.new_kv_cache(len(first), max_length)
    h = model.forward_hidden(input_ids[first], attention_mask=None if attention_mask is None else attention_mask[first],
                             position_ids=position_ids[first], kv_cache=cache)[:, -1]  # (U, C)
    return cache.take(rows), h[rows]


@torch.inference_mode()
def generate(model, input_ids, max_new_tokens: int = 32, *, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, stop: int | Iterable[int | Sequence[int]] | None = None,
             attention_mask=None, pad_token_id: int | None = None, generator: torch.Generator | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None):
    """input_ids (B, T) -> (B, T + n) with n <= max_new_tokens new tokens.

    stop: token ids and/or token-id sequences that end a row (included in the output);
    attention_mask (B, T): 1 on real tokens, 0 on left padding; on_token receives each new
    column (B,) as it is produced, for streaming.
    """
    if isinstance(input_ids, (list, tuple)):
        input_ids, attention_mask = left_pad(input_ids, pad_token_id or 0)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    B, T = input_ids.shape
    if T == 0:
        raise ValueError("empty prompt: input_ids has no tokens")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    context = model.config.max_position_embeddings
    if T + max_new_tokens > context:  # the KV cache holds every position; past the context RoPE extrapolates
        raise ValueError(f"the prompt ({T} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"context, max_position_embeddings = {context}")
    device = model.model.embed_tokens.weight.device
    input_ids = input_ids.to(device)
    stops = _stop_sequences(stop)
    if pad_token_id is None:
        pad_token_id = stops[0][-1] if stops else 0
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device)
    if (attention_mask.sum(dim=1) == 0).any():
        raise ValueError("empty prompt: a row of attention_mask has no real token")
    if (attention_mask[:, 1:] < attention_mask[:, :-1]).any():
        raise ValueError("attention_mask has right padding; generation needs prompts padded on the left")
    padded = bool((attention_mask == 0).any())

    long_at = model.rope.original_context  # longrope only: its tables change past this length
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, T)
    cache, h = _prefill(model, input_ids, attention_mask if padded else None, position_ids, T + max_new_tokens)
    head = _head(model, h)
    logits = head(h)  # (B, V): only the last position is needed
    out = [input_ids]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    next_pos = position_ids[:, -1:] + 1  # (B, 1)
    for step in range(max_new_tokens):
        token = sample(logits, temperature, top_k, top_p, generator)  # (B,)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        out.append(token[:, None])
        if on_token is not None:
            on_token(token)
        if stops:
            seq = torch.cat(out, dim=1)
            for s in stops:
                if seq.shape[1] - T >= len(s):
                    done |= (seq[:, -len(s):] == torch.as_tensor(s, device=device)).all(dim=1)
        if done.all() or step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(token)[:, None]], dim=1)  # (B, S)
        # the new token's position + 1 (a joint prefix shifts positions by its length) against the cached ones'
        if long_at is not None and cache.prefix_length + attention_mask.shape[1] > long_at >= cache.length:
            # family: longrope has just switched to its long factors (Phi-3). As transformers does, drop the
            # cache, whose keys were rotated with the short ones, and run the whole sequence again.
            cache = model.new_kv_cache(B, T + max_new_tokens)
            position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
            h = model.forward_hidden(torch.cat(out, dim=1), attention_mask=attention_mask if padded else None,
                                     position_ids=position_ids, kv_cache=cache)
            next_pos = position_ids[:, -1:]
        else:
            h = model.forward_hidden(token[:, None], attention_mask=attention_mask if padded else None,
                                     position_ids=next_pos, kv_cache=cache)
        logits = head(h[:, -1])
        next_pos = next_pos + 1
    return torch.cat(out, dim=1)
