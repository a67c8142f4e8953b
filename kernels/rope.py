"""Rotary embedding (RoPE) forward and backward in Triton, bit-exact with ``minicustom.fused.rope_reference``.

x is q or k, (B, nh, T, hs); cos, sin are (B or 1, T, d) in Hugging Face's rotate_half layout (Su et al.
2021; ``minicustom/rope.py`` builds them), d even and d <= hs. With h = d / 2, for j < h, a = x[j] and
b = x[j + h]:

    y[j]     = a * cos[j]     - b * sin[j]         (x * cos + rotate_half(x) * sin, rotate_half(x) = [-b, a])
    y[j + h] = b * cos[j + h] + a * sin[j + h]
    y[k]     = x[k]                                 for d <= k < hs (partial rotary: Phi-3/Phi-4-mini)

The backward is the transpose of that linear map, dx = R^T dy:

    dx[j]     = dy[j] cos[j]         + dy[j + h] sin[j + h]
    dx[j + h] = dy[j + h] cos[j + h] - dy[j] sin[j]
    dx[k]     = dy[k]

which, as the two halves of cos and sin are equal in the rotate_half layout, is the rotation by -angle.

Exactness: torch computes each bf16/fp16 op in fp32 and rounds its result to the op's dtype, so the
kernel does the same products and sums in the same order, rounding each to the same dtype (RNE via
``round_to``; the interpreter truncates) and with FMA contraction off (``enable_fp_fusion=False``): the
results equal the twin's bit for bit, including a half x with fp32 tables (mixed precision: q comes out
of an autocast matmul in bf16, the tables in the fp32 residual's dtype). Then C = promote(x, cos) is the
output's dtype and every product's, and in the backward autograd casts each of dx's two terms to x's
dtype before adding them (each edge's gradient takes its input's dtype): hence round_X(round_X(.) + ...).

Each program rotates BLOCK_R rows (one row = one (b, head, t)) and copies their pass-through dims; x and
dy may be strided views (q.transpose(1, 2)) as long as the last dim is contiguous; the output is
contiguous. Memory bound: reads x (and d values of cos and sin per token, from L2), writes y.

Left out: gradients for cos and sin (RoPE tables are buffers; passing tables that require grad is an
error), q and k in one launch (Liger's), in-place rotation, and the GPT-NeoX-vs-GPT-J interleaved layout
(HF converts every checkpoint to rotate_half).
"""

import torch
import triton
import triton.language as tl

from .nf4_dequant import round_to

TILE = 2048  # rotated pairs a program holds: BLOCK_R = TILE // HALF rows (at least 1, at most 64)


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, n_rows, H, T, sx_b, sx_h, sx_t, sc_b, sc_t,
                 HS: tl.constexpr, D: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr,
                 HALF: tl.constexpr, PASS: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,) rows in (b, head, t) order
    b, head, t = r // (H * T), (r // T) % H, r % T
    x_row = (b * sx_b + head * sx_h + t * sx_t)[:, None]  # (BLOCK_R, 1)
    c_row = (b * sc_b + t * sc_t)[:, None]  # (BLOCK_R, 1)
    j = tl.arange(0, HALF)[None, :]  # (1, HALF)
    mask = (r[:, None] < n_rows) & (j < D // 2)  # (BLOCK_R, HALF)
    # x (forward) or dy (backward): a = first half of the rotated dims, b = second half
    a = tl.load(x_ptr + x_row + j, mask=mask, other=0.0).to(tl.float32)
    bb = tl.load(x_ptr + x_row + j + D // 2, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + c_row + j, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + c_row + j + D // 2, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + c_row + j, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + c_row + j + D // 2, mask=mask, other=0.0).to(tl.float32)
    OUT: tl.constexpr = out_ptr.dtype.element_ty
    if BACKWARD:
        C: tl.constexpr = x_ptr.dtype.element_ty  # dy has the forward output's dtype
        # dx[:h] = (dy * cos)[:h].to(x.dtype) + (dy * sin)[h:].to(x.dtype)
        o1 = round_to(round_to(round_to(a * c1, C), OUT) + round_to(round_to(bb * s2, C), OUT), OUT)
        # dx[h:] = (dy * cos)[h:].to(x.dtype) - (dy * sin)[:h].to(x.dtype)
        o2 = round_to(round_to(round_to(bb * c2, C), OUT) - round_to(round_to(a * s1, C), OUT), OUT)
    else:
        # y[:h] = rot[:h] * cos[:h] + (-rot[h:]) * sin[:h]
        o1 = round_to(round_to(a * c1, OUT) - round_to(bb * s1, OUT), OUT)
        # y[h:] = rot[h:] * cos[h:] + rot[:h] * sin[h:]
        o2 = round_to(round_to(bb * c2, OUT) + round_to(a * s2, OUT), OUT)
    out_row = r[:, None] * HS  # (BLOCK_R, 1)
    tl.store(out_ptr + out_row + j, o1.to(OUT), mask=mask)
    tl.store(out_ptr + out_row + j + D // 2, o2.to(OUT), mask=mask)
    if PASS > 0:
        # torch.cat((out, rest), -1): the last hs - d dims as they are (cast to the output's dtype)
        k = D + tl.arange(0, PASS)[None, :]  # (1, PASS)
        pmask = (r[:, None] < n_rows) & (k < HS)  # (BLOCK_R, PASS)
        rest = tl.load(x_ptr + x_row + k, mask=pmask, other=0.0).to(tl.float32)
        tl.store(out_ptr + out_row + k, round_to(rest, OUT).to(OUT), mask=pmask)


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Errors a caller can act on: wrong device, dtype or shape."""
    if x.device.type == "cpu" and type(_rope_kernel).__name__ != "InterpretedFunction":
        raise RuntimeError("minicustom.kernels needs CUDA tensors (or TRITON_INTERPRET=1 set before importing "
                           "them); on CPU use minicustom.fused.rope_reference")
    floats = (torch.float32, torch.bfloat16, torch.float16)
    if x.dtype not in floats or cos.dtype not in floats or sin.dtype != cos.dtype:
        raise ValueError(f"rope takes float32/bfloat16/float16 x and tables of one dtype, not x {x.dtype}, "
                         f"cos {cos.dtype}, sin {sin.dtype}")
    if x.dim() != 4 or cos.dim() != 3:
        raise ValueError(f"x is {tuple(x.shape)} and cos {tuple(cos.shape)}; expected (B, nh, T, hs) and "
                         "(B, T, d)")
    B, _, T, hs = x.shape
    d = cos.shape[-1]
    if sin.shape != cos.shape or cos.shape[0] not in (1, B) or cos.shape[1] != T or d % 2 or d > hs:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} do not fit x {tuple(x.shape)}: "
                         f"expected both ({B} or 1, {T}, d) with d even and d <= {hs}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("rope does not differentiate the tables: detach cos and sin (RoPE's are buffers)")
    if x.device != cos.device or x.device != sin.device:
        raise ValueError(f"x is on {x.device}, cos on {cos.device}, sin on {sin.device}; expected one device")
    if x.numel() >= 2**31 or sum((n - 1) * abs(s) for n, s in zip(x.shape, x.stride())) >= 2**31:
        raise ValueError(f"x of shape {tuple(x.shape)} spans 2^31 elements or more (int32 indexing)")


def _launch(src: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype, backward: bool,
            block_r: int | None) -> torch.Tensor:
    """The kernel over src (B, nh, T, hs) (x, or dy for the backward), into a new contiguous tensor of dtype."""
    if src.stride(-1) != 1:
        src = src.contiguous()
    cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (cos, sin))
    if sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    B, H, T, HS = src.shape
    D = cos.shape[-1]
    out = torch.empty((B, H, T, HS), dtype=dtype, device=src.device)
    half = triton.next_power_of_2(max(D // 2, 1))
    block_r = block_r or max(1, min(64, TILE // half))
    if block_r & (block_r - 1):
        raise ValueError(f"block_r is {block_r}; expected a power of two")
    n_rows = B * H * T
    if n_rows:
        _rope_kernel[(triton.cdiv(n_rows, block_r),)](
            src, cos, sin, out, n_rows, H, T, *src.stride()[:3], cos.stride(0) if cos.shape[0] > 1 else 0,
            cos.stride(1), HS=HS, D=D, BACKWARD=backward, BLOCK_R=block_r, HALF=half,
            PASS=triton.next_power_of_2(HS - D) if HS > D else 0, num_warps=4, enable_fp_fusion=False)
    return out


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, block_r):
        ctx.save_for_backward(cos, sin)
        ctx.x_dtype, ctx.block_r = x.dtype, block_r
        return _launch(x, cos, sin, torch.promote_types(x.dtype, cos.dtype), False, block_r)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _launch(dy, cos, sin, ctx.x_dtype, True, ctx.block_r), None, None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, block_r: int | None = None) -> torch.Tensor:
    """x (B, nh, T, hs) with its first d dims rotated by cos, sin (B or 1, T, d), differentiable in x;
    ``block_r`` (rows per program, default TILE // (d / 2)) is for tests and benchmarks."""
    _check(x, cos, sin)
    return RoPEFunction.apply(x, cos, sin, block_r)
