"""The PyTorch twins of the training kernels in ``minicustom.kernels``: the default path, and the oracle.

Each function computes what ``model.py`` computes today, op for op (the same casts, the same dtypes out),
so a kernel tested against its twin is tested against the model; ``tests/test_kernels_train.py`` checks
the twins against ``model.py`` itself, bit for bit, forward and backward.

    rms_norm_reference(x, w, eps, plus_one)   model.RMSNorm: w * x / sqrt(mean(x^2) + eps), (1 + w) for Gemma
    rope_reference(x, cos, sin)               rope.apply_rope: x*cos + rotate_half(x)*sin on the first d dims
    swiglu_reference(gate, up, act)           model.MLP's act(gate) * up, act = silu or tanh-GELU (GeGLU)
    linear_cross_entropy_reference(h, W, y)   mean (or sum) of CE(h W^T, y) over rows with y != ignore_index:
                                              losses.LinearCrossEntropy, the chunked loss of sft_loss

Gradients are autograd's (the chunked loss makes its own, in its forward). This module imports neither
``model.py`` nor the kernels, so the model may one day dispatch to either without an import cycle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .losses import LinearCrossEntropy
from .rope import apply_rope

ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # config.hidden_act's values
REDUCTIONS = ("mean", "sum")


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


def check_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                               reduction: str) -> None:
    """Errors a caller can act on, for the twin and the kernel alike: dtypes, shapes, devices, label range.
    The range check reads the labels (a device sync on a GPU)."""
    floats = (torch.float32, torch.bfloat16, torch.float16)
    if h.dtype not in floats or weight.dtype not in floats:
        raise ValueError(f"linear_cross_entropy takes float32/bfloat16/float16 h and weight, not {h.dtype} and "
                         f"{weight.dtype}")
    if labels.dtype != torch.int64:
        raise ValueError(f"labels are {labels.dtype}; expected torch.int64 (long) class ids, as F.cross_entropy")
    if weight.dim() != 2 or h.dim() < 1 or weight.shape[1] != h.shape[-1]:
        raise ValueError(f"weight is {tuple(weight.shape)} for h of shape {tuple(h.shape)}; expected (V, "
                         f"{h.shape[-1] if h.dim() else 'C'}), the lm_head's (vocab, hidden)")
    if labels.shape != h.shape[:-1]:
        raise ValueError(f"labels are {tuple(labels.shape)}; expected {tuple(h.shape[:-1])}, one per row of h "
                         f"{tuple(h.shape)}")
    if not h.device == weight.device == labels.device:
        raise ValueError(f"h, weight and labels are on {h.device}, {weight.device} and {labels.device}; "
                         "expected one device")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction is {reduction!r}; expected one of {REDUCTIONS}")
    V = weight.shape[0]
    bad = labels[(labels != ignore_index) & ((labels < 0) | (labels >= V))]
    if bad.numel():
        raise ValueError(f"labels hold {bad.numel()} ids outside [0, {V}) that are not ignore_index "
                         f"{ignore_index}, e.g. {bad[0].item()}")


def linear_cross_entropy_reference(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   ignore_index: int = -100, reduction: str = "mean",
                                   chunk: int = 512) -> torch.Tensor:
    """CE(h W^T, labels) over the rows of h (..., C) whose label is not ignore_index, summed or averaged
    (fp32, 0-dim); weight (V, C), labels (...) int64. The rows kept go through losses.LinearCrossEntropy
    N_c = chunk at a time: logits in compute_dtype(h) (autocast's, else h's), an fp32 log-softmax, grads
    in h's and weight's dtypes. A mean over no row is nan with zero grads, as F.cross_entropy's."""
    check_linear_cross_entropy(h, weight, labels, ignore_index, reduction)
    keep = labels != ignore_index  # (...)
    hk, yk = h[keep], labels[keep]  # (n, C), (n,)
    n = yk.numel()
    if n == 0:
        zero = (h.sum() + weight.sum()).float() * 0.0  # in the graph, with zero grads
        return zero + float("nan") if reduction == "mean" else zero
    total = LinearCrossEntropy.apply(hk, weight, yk, chunk)
    return total / n if reduction == "mean" else total
