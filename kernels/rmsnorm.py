"""RMSNorm forward and backward in Triton, twin of ``minicustom.fused.rms_norm_reference`` (= model.RMSNorm).

For a row x of N values (Zhang & Sennrich 2019), in fp32 whatever x's dtype:

    r    = 1 / sqrt(sum(x^2) / N + eps)        (one per row, kept for the backward: 4 bytes a row)
    xhat = x * r
    y    = w * round_X(xhat)       rounded to O = promote(X, W)     (Llama: the cast back comes first)
    y    = xhat * (1 + w)          rounded to X                      (Gemma's plus_one: the product first)

round_X is the cast to x's dtype (identity in fp32). Backward, with g the gradient reaching xhat:

    g    = round_X(round_O(dy * w))            as autograd rounds it (dy * w in O, cast back to X)
    g    = dy * (1 + w)                        plus_one (fp32)
    dx   = r * (g - xhat * mean(g * xhat))     since d r / d x_k = -r^3 x_k / N, so that
           dx_k = g_k r + sum_j g_j x_j (-r^3 x_k / N) = r (g_k - xhat_k * mean_j(g_j xhat_j))
    dw   = sum over rows of dy * round_X(xhat)   (dy * xhat with plus_one), in fp32, rounded once to W

The forward makes one pass over x (each program holds BLOCK_M whole rows); the backward recomputes xhat
from x and the saved r, and each program walks a contiguous range of rows adding its dw into an fp32
row of a (programs, N) buffer, which one torch sum reduces in a fixed order: deterministic, no atomics
(Liger-Kernel's layout). Bytes moved per element: forward read x, write y; backward read x and dy, write
dx (plus N * programs * 4 for dw).

Exactness: the kernel rounds where the twin rounds (the casts above, RNE via ``round_to``, since the
interpreter truncates), divides and takes the square root correctly rounded (``div_rn``, ``sqrt_rn``; a
GPU's default fp32 division is ``div.full``, 2 ulp) as torch does on CPU, and contracts nothing into FMAs
(``enable_fp_fusion=False``), so each operation rounds once, as the test's error analysis counts. The
sums over a row run in another order than torch's, so results agree to the bound the test derives (N/2
unit roundoffs in r), not bit for bit.

Left out: rows longer than 65536 (one row must fit one tile; Liger has the same limit), a second gradient,
LayerNorm's mean and bias, fusing the residual add into the norm, and NaN payloads (a NaN stays NaN,
possibly with other bits).
"""

import torch
import triton
import triton.language as tl

from .nf4_dequant import round_to

MAX_N = 65536
TILE = 4096  # elements a program holds: BLOCK_M = TILE // BLOCK_N rows (at least 1, at most 64)


@triton.jit
def _rms_norm_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, M, N, stride_x, eps,
                  PLUS_ONE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    mask = (rows[:, None] < M) & (cols[None, :] < N)  # (BLOCK_M, BLOCK_N)
    # x.float()
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    # x.pow(2).mean(-1): padding adds zeros; a correctly rounded division by the true N, as torch's
    ms = tl.math.div_rn(tl.sum(x * x, axis=1), tl.full((BLOCK_M,), N, tl.float32))  # (BLOCK_M,)
    # torch.rsqrt(ms + eps): a correctly rounded sqrt, then 1 / it, as torch's CPU rsqrt
    r = tl.math.div_rn(1.0, tl.sqrt_rn(ms + eps))
    # y = x * r
    xhat = x * r[:, None]
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]  # (1, BLOCK_N)
    if PLUS_ONE:
        # (y * (1.0 + w.float())).to(dtype)
        y = xhat * (1.0 + w)
    else:
        # w * y.to(dtype): the product of two 16-bit values is exact in fp32, rounded once below
        y = w * round_to(xhat, x_ptr.dtype.element_ty)
    y = round_to(y, y_ptr.dtype.element_ty).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], y, mask=mask)
    tl.store(rstd_ptr + rows, r, mask=rows < M)


@triton.jit
def _rms_norm_bwd(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, M, N, stride_dy, stride_x, ROWS_PER_PROGRAM,
                  PLUS_ONE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]  # (1, BLOCK_N)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_end = tl.minimum(M, (pid + 1) * ROWS_PER_PROGRAM)
    for start in range(pid * ROWS_PER_PROGRAM, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        mask = (rows[:, None] < row_end) & (cols[None, :] < N)  # (BLOCK_M, BLOCK_N)
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        r = tl.load(rstd_ptr + rows, mask=rows < row_end, other=0.0)[:, None]  # (BLOCK_M, 1)
        # xhat = x.float() * r, as the forward computed it
        xhat = x * r
        if PLUS_ONE:
            # grad of y * (1 + w) in fp32: dy.float() * (1 + w)
            g = dy * (1.0 + w)
            # dw += (dy * y).sum(rows)
            dw += tl.sum(dy * xhat, axis=0)
        else:
            # grad of w * y.to(dtype): (dy * w) in dy's dtype, then cast to x's (autograd's two roundings)
            g = round_to(round_to(dy * w, dy_ptr.dtype.element_ty), dx_ptr.dtype.element_ty)
            # dw += (dy * y.to(dtype)).sum(rows), in fp32
            dw += tl.sum(dy * round_to(xhat, dx_ptr.dtype.element_ty), axis=0)
        # dx = r * (g - xhat * mean(g * xhat))
        c = tl.math.div_rn(tl.sum(g * xhat, axis=1), tl.full((BLOCK_M,), N, tl.float32))  # (BLOCK_M,)
        dx = (g - xhat * c[:, None]) * r
        dx = round_to(dx, dx_ptr.dtype.element_ty).to(dx_ptr.dtype.element_ty)
        tl.store(dx_ptr + rows[:, None] * N + cols[None, :], dx, mask=mask)
    tl.store(dw_ptr + pid * N + cols, dw, mask=cols < N)


def _check(x: torch.Tensor, w: torch.Tensor) -> None:
    """Errors a caller can act on: wrong device, dtype or shape."""
    if x.device.type == "cpu" and type(_rms_norm_fwd).__name__ != "InterpretedFunction":
        raise RuntimeError("minicustom.kernels needs CUDA tensors (or TRITON_INTERPRET=1 set before importing "
                           "them); on CPU use minicustom.fused.rms_norm_reference")
    floats = (torch.float32, torch.bfloat16, torch.float16)
    if x.dtype not in floats or w.dtype not in floats:
        raise ValueError(f"rms_norm takes float32/bfloat16/float16 x and w, not {x.dtype} and {w.dtype}")
    if w.shape != x.shape[-1:] or w.device != x.device:
        raise ValueError(f"w is {tuple(w.shape)} on {w.device}; expected ({x.shape[-1]},) on {x.device} "
                         f"for x of shape {tuple(x.shape)}")
    span = sum((n - 1) * abs(s) for n, s in zip(x.shape, x.stride()))
    if x.shape[-1] > MAX_N or x.numel() >= 2**31 or span >= 2**31:
        raise ValueError(f"x of shape {tuple(x.shape)}: rows longer than {MAX_N} or 2^31 elements are not "
                         "supported (int32 indexing, one row per tile)")


def _rows(t: torch.Tensor, N: int) -> torch.Tensor:
    """t as (M, N) rows with unit column stride: a view where one exists."""
    t = t.reshape(-1, N)
    return t if t.stride(-1) == 1 or t.shape[0] == 0 else t.contiguous()


def _blocks(N: int, block_m: int | None) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for rows of N."""
    block_n = triton.next_power_of_2(N)
    block_m = block_m or max(1, min(64, TILE // block_n))
    if block_m & (block_m - 1):
        raise ValueError(f"block_m is {block_m}; expected a power of two")
    return block_m, block_n, min(16, max(1, block_m * block_n // 512))


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, eps, plus_one, block_m):
        N = x.shape[-1]
        x2 = _rows(x, N)  # (M, N)
        M = x2.shape[0]
        dtype = x.dtype if plus_one else torch.promote_types(x.dtype, w.dtype)
        y = torch.empty((M, N), dtype=dtype, device=x.device)
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
        BLOCK_M, BLOCK_N, num_warps = _blocks(N, block_m)
        if M:
            _rms_norm_fwd[(triton.cdiv(M, BLOCK_M),)](
                x2, w, y, rstd, M, N, x2.stride(0), eps, PLUS_ONE=plus_one, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                num_warps=num_warps, enable_fp_fusion=False)
        ctx.save_for_backward(x2, w, rstd)
        ctx.plus_one, ctx.block_m, ctx.shape = plus_one, block_m, x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w, rstd = ctx.saved_tensors
        M, N = x2.shape
        dy2 = _rows(dy, N)  # (M, N)
        dx = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
        BLOCK_M, BLOCK_N, num_warps = _blocks(N, ctx.block_m)
        tiles = triton.cdiv(M, BLOCK_M)
        sms = torch.cuda.get_device_properties(x2.device).multi_processor_count if x2.is_cuda else 4
        rows_per_program = triton.cdiv(tiles, min(tiles, sms) or 1) * BLOCK_M
        programs = triton.cdiv(M, rows_per_program)
        dw = torch.zeros((max(programs, 1), N), dtype=torch.float32, device=x2.device)  # (programs, N)
        if M:
            _rms_norm_bwd[(programs,)](
                dy2, x2, w, rstd, dx, dw, M, N, dy2.stride(0), x2.stride(0), rows_per_program,
                PLUS_ONE=ctx.plus_one, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=num_warps, enable_fp_fusion=False)
        # sum over programs in a fixed order, rounded once to w's dtype
        return dx.view(ctx.shape), dw.sum(0).to(w.dtype), None, None, None


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, plus_one: bool = False,
             block_m: int | None = None) -> torch.Tensor:
    """RMSNorm of x (..., N) by w (N,), differentiable in x and w; ``block_m`` (rows per program, default
    TILE // N) is for tests and benchmarks."""
    _check(x, w)
    return RMSNormFunction.apply(x, w, float(eps), bool(plus_one), block_m)
