"""The PyTorch twins of the training kernels in ``minicustom.kernels``: the default path, and the oracle.

Each function computes what ``model.py`` computes today, op for op (the same casts, the same dtypes out),
so a kernel tested against its twin is tested against the model; ``tests/test_kernels_train.py`` checks
the twins against ``model.py`` itself, bit for bit, forward and backward.

    rms_norm_reference(x, w, eps, plus_one)   model.RMSNorm: w * x / sqrt(mean(x^2) + eps), (1 + w) for Gemma
    rope_reference(x, cos, sin)               rope.apply_rope: x*cos + rotate_half(x)*sin on the first d dims
    swiglu_reference(gate, up, act)           model.MLP's act(gate) * up, act = silu or tanh-GELU (GeGLU)

Gradients are autograd's. This module imports neither ``model.py`` nor the kernels, so the model may one
day dispatch to either without an import cycle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .rope import apply_rope

ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # config.hidden_act's values


def rms_norm_reference(x: torch.Tensor, w: torch.Tensor, eps: float, plus_one: bool = False) -> torch.Tensor:
    """RMSNorm over the last dim, as ``model.RMSNorm.forward``: fp32 math; a half-precision x is rounded
    back to its dtype before the product with w (whose dtype then sets the output's), except with
    plus_one (Gemma), where (1 + w) multiplies in fp32 and the product is rounded to x.dtype."""
    w = 1.0 + w.float() if plus_one else w
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    dtype = x.dtype
    y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return (y * w).to(dtype) if plus_one else w * y.to(dtype)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, T, hs) with its first d dims rotated by the tables cos, sin (B, T, d) in rotate_half layout."""
    return apply_rope(x, cos, sin)


def activation(act: str):
    """The gate's nonlinearity by config.hidden_act name, as ``model.activation``."""
    if act == "silu":
        return F.silu
    if act == "gelu_pytorch_tanh":
        return lambda g: F.gelu(g, approximate="tanh")
    raise ValueError(f"act is {act!r}; expected one of {ACTIVATIONS}")


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """act(gate) * up (SwiGLU, Shazeer 2020; GeGLU with act = tanh-GELU), in gate's dtype like the model."""
    return activation(act)(gate) * up
