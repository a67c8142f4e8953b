"""Rotary position embeddings (RoPE, Su et al. 2021) and the context-extension scalings, as transformers computes them.

    angle(p, i) = p * inv_freq_i,   inv_freq_i = theta^(-2i/d),   i < d/2
    RoPE(x)     = [x_rot * cos + rotate_half(x_rot) * sin,  x_pass],   cos, sin times attention_scaling

d is the rotary width: head_dim, or int(head_dim * partial_rotary_factor) when only the first dims of each
head rotate (Phi-4-mini: 0.75); the other dims pass through. rotate_half([a, b]) = [-b, a] (HF's layout).
Scalings of inv_freq (`rope_type`), each as transformers' `modeling_rope_utils`:
- linear: position interpolation (Chen et al. 2023), inv_freq / factor.
- llama3 (Llama 3.1): keep high frequencies, divide low ones by factor, interpolate smoothly in between.
- yarn (Peng et al. 2023, "YaRN", eq. 17-20): per band, mix interpolation inv_freq/factor and extrapolation
  inv_freq with a linear ramp over the dims between beta_fast and beta_slow rotations in the original
  context; attention_scaling 0.1 ln(factor) + 1 (or mscale / mscale_all_dim as DeepSeek writes it).
- longrope (Ding et al. 2024, Phi-3's "su"): inv_freq_i / ext_i with per-band factors: short_factor while the
  forward's positions stay within original_max_position_embeddings, long_factor beyond (decided per forward,
  as transformers does); attention_scaling
  sqrt(1 + ln(factor) / ln(original_max_position_embeddings)). When generation crosses the original context,
  generate.py drops the cache (keys rotated with the short factors) and runs the sequence again, as
  transformers' Phi-3 does.
Gemma 3 rotates its sliding-window layers with a base of its own (`rope_local_theta`, no scaling).
Left out: dynamic NTK (its tables change with the cache length in ways a cached forward cannot replay).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """theta^(-2i/d) for i < d/2, in fp32 from int64 exponents, as transformers builds it."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def scaled_inv_freq(theta: float, dim: int, s: dict | None, long: bool = False) -> tuple[torch.Tensor, float]:
    """(inv_freq (d/2,), attention_scaling) for scaling s (None: plain RoPE); `long` picks longrope's long factors."""
    inv = default_inv_freq(theta, dim)
    kind = s["rope_type"] if s else "default"
    if kind == "default":
        return inv, 1.0
    factor = s["factor"]
    if kind == "linear":
        return inv / factor, 1.0
    old_ctx = s["original_max_position_embeddings"]
    if kind == "llama3":
        lo, hi = s["low_freq_factor"], s["high_freq_factor"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_ctx / hi) & ~(wavelen > old_ctx / lo)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "longrope":
        ext = torch.tensor(s["long_factor" if long else "short_factor"], dtype=torch.float32)
        scale = s.get("attention_factor")
        if scale is None:
            scale = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(old_ctx))
        return 1.0 / (ext * theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), scale
    # yarn: band i rotates old_ctx * inv_i / 2pi times over the original context. Bands that turn more than
    # beta_fast times extrapolate (keep inv), those under beta_slow interpolate (inv / factor), a ramp between.
    def band(rotations):  # the (fractional) band index that turns `rotations` times over old_ctx
        return dim * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = band(s.get("beta_fast") or 32), band(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the band's frequency, 0: interpolate it
    pos = theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)  # 1 / inv_freq
    inv = 1.0 / (factor * pos) * (1 - extrapolate) + 1.0 / pos * extrapolate
    scale = s.get("attention_factor")
    if scale is None:
        def m(x):
            return 1.0 if factor <= 1 else 0.1 * x * math.log(factor) + 1.0
        mscale, all_dim = s.get("mscale"), s.get("mscale_all_dim")
        scale = m(mscale) / m(all_dim) if mscale and all_dim else m(1)
    return inv, float(scale)


class RoPE(nn.Module):
    """The rotary tables of one model: `tables(position_ids, kind, dtype)` gives the (cos, sin) of a layer kind.

    Buffers (not in checkpoints): inv_freq (full-attention layers, and every layer of a one-base model),
    local_inv_freq (Gemma 3's sliding layers) and long_inv_freq (longrope beyond the original context).
    """

    def __init__(self, config):
        super().__init__()
        c, s = config, config.rope_scaling
        self.rotary_dim = c.rotary_dim
        inv, self.attention_scaling = scaled_inv_freq(c.rope_theta, c.rotary_dim, s)
        self.register_buffer("inv_freq", inv, persistent=False)
        local = default_inv_freq(c.rope_local_theta, c.rotary_dim) if c.rope_local_theta else None
        self.register_buffer("local_inv_freq", local, persistent=False)
        is_long = s is not None and s["rope_type"] == "longrope"
        self.original_context = s["original_max_position_embeddings"] if is_long else None
        long = scaled_inv_freq(c.rope_theta, c.rotary_dim, s, long=True)[0] if is_long else None
        self.register_buffer("long_inv_freq", long, persistent=False)

    def tables(self, position_ids, kind: str, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, T, d) for positions (B, T): angle[b, t, i] = pos[b, t] * inv_freq[i], duplicated to d."""
        scale = self.attention_scaling
        if kind == "sliding_attention" and self.local_inv_freq is not None:
            inv, scale = self.local_inv_freq, 1.0
        elif self.long_inv_freq is not None and int(position_ids.max()) + 1 > self.original_context:
            inv = self.long_inv_freq
        else:
            inv = self.inv_freq
        freqs = position_ids[..., None].float() * inv  # (B, T, d/2), fp32 like HF
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, d): HF's rotate_half layout
        if scale == 1.0:
            return emb.cos().to(dtype), emb.sin().to(dtype)
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rope(x, cos, sin):
    """x (B, n, T, hs) with its first d dims rotated: x*cos + rotate_half(x)*sin; the other hs - d pass through."""
    d = cos.shape[-1]
    rot, rest = (x, None) if d == x.shape[-1] else (x[..., :d], x[..., d:])
    a, b = rot.chunk(2, dim=-1)
    out = rot * cos[:, None] + torch.cat((-b, a), dim=-1) * sin[:, None]
    return out if rest is None else torch.cat((out, rest), dim=-1)
