"""Fused linear + cross-entropy in Triton, the logits never written to memory; twin of
``minicustom.fused.linear_cross_entropy_reference`` (= losses.LinearCrossEntropy on the rows kept).

For rows h_i (N, C), the lm_head W (V, C) and labels y_i, rows with y_i = ignore_index left out (n kept):

    z_i    = round_X(h_i W^T)                (V,) logits, fp32 accumulation, rounded to the compute dtype X
    loss_i = logsumexp(z_i) - z_i[y_i]       in fp32;  loss = sum_i loss_i  (or / n: reduction "mean")
    dz_i   = round_X(softmax(z_i) - onehot(y_i))        d loss_i / d z_i, rounded to X as the twin does
    dh_i   = round_X(round_X(dz_i W) * g)     g = the incoming gradient (/ n for "mean"), then h's dtype
    dW     = round_W(g * sum_i dz_i^T h_i)    the sum in fp32

X is compute_dtype(h): autocast's dtype under mixed precision, else h's; h and W are cast to it first, as
the twin casts them. The forward streams over the vocabulary in blocks of BLOCK_V with an online
logsumexp (Milakov & Gimelshein 2018): per row a running max m and sum s,

    m'  = max(m, max_v z_v),    s' = s exp(m - m') + sum_v exp(z_v - m'),    lse = m + log s

and picks z[y] out of the block that holds column y; it keeps lse (4 bytes a row) for the backward, which
recomputes each (BLOCK_N, BLOCK_V) tile of logits, p = exp(z - lse), and the tile of dz, in two kernels:
``_dh_bwd`` (one program per BLOCK_N rows, walking V: dh += dz W) and ``_dw_bwd`` (one program per BLOCK_V
vocabulary rows, walking N: dW += dz^T h). Each program owns its rows of an fp32 accumulator, so the sums
are deterministic without atomics; a torch epilogue applies g and rounds, in the twin's expressions.

Work and memory. The logits of a row block are (BLOCK_N, BLOCK_V) at a time, in registers: nothing of size
N x V is ever allocated (the twin writes and re-reads an (N_c, V) fp32 chunk several times). The price is
matmul work: 2NVC forward, 8NVC backward (the logits twice, dh, dW), 10NVC against 6NVC for an unfused
linear + cross-entropy; Cut Cross-Entropy (Wijmans et al. 2024) makes it 8NVC by adding dh and dW from one
tile with atomics, at the cost of a run-to-run nondeterministic gradient. Bytes: the forward reads W once
per row block ((N / BLOCK_N) V C |X| bytes) and writes 8 bytes a row; the backward reads and writes its
fp32 accumulators once per tile of the other dimension ((V / BLOCK_V) N C 8 and (N / BLOCK_N) V C 8
bytes, mostly through L2). Memory held: lse (N floats), and in the backward the fp32 dh (N, C) and dW
(V, C), which the twin holds too.

Exactness: not bit for bit. The products are exact (X values in fp32 registers; TF32 dots for 16-bit X,
whose values TF32 holds exactly, as in nf4_matmul.py; IEEE fp32 dots for fp32), FMA contraction is off
(``enable_fp_fusion=False``) and the roundings to X are RNE on every backend (``round_to``), but the sums
over C, V and N run in another order than torch's and the logsumexp is the online one (plus, on a GPU,
ex2.approx for exp: 2 ulp). ``tests/test_kernels_linear_ce.py`` derives the bound, from gamma_k = k u /
(1 - k u) of each sum and a few u per exp and log; in bf16 a logit or gradient whose fp32 values on the
two sides may round to neighbouring bf16 numbers costs an ulp, and everywhere else the test requires the
kernel's bf16 values to equal the twin's.

A row whose label is ignore_index adds 0 to the loss and gets a zero dh; a mean over no row is nan (0 / 0)
with zero gradients, as F.cross_entropy's.

Left out: label smoothing, z-loss, logit soft-capping (Gemma 2), a bias, per-row weights and reduction
"none", a split over V in the forward and the dh kernel (N / BLOCK_N programs: few when N is small), CCE's
skipping of tiles whose softmax is below rounding, bf16 MMAs (TF32 runs at half their peak), autotuning
(the block sizes are guesses), and a second gradient.
"""

import torch
import triton
import triton.language as tl

from minicustom.fused import check_linear_cross_entropy
from minicustom.precision import compute_dtype

from .nf4_dequant import round_to

BLOCK_N, BLOCK_V, BLOCK_C, NUM_WARPS = 64, 128, 64, 8  # defaults (rows, vocabulary, hidden); guesses


@triton.jit
def _logits(h_ptr, w_ptr, rows, v, N, V, C, stride_h, stride_w, PRECISION: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr):
    """z = round_X(h[rows] @ W[v].T), (BLOCK_N, BLOCK_V) in fp32; 0 for rows >= N or v >= V."""
    z = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
        # h[rows, c].float()                                                        (BLOCK_N, BLOCK_C)
        hb = tl.load(h_ptr + rows.to(tl.int64)[:, None] * stride_h + c[None, :],
                     mask=(rows[:, None] < N) & (c[None, :] < C), other=0.0).to(tl.float32)
        # W[v, c].T.float()                                                         (BLOCK_C, BLOCK_V)
        wt = tl.load(w_ptr + v.to(tl.int64)[None, :] * stride_w + c[:, None],
                     mask=(v[None, :] < V) & (c[:, None] < C), other=0.0).to(tl.float32)
        # z += h @ W.T, exact products, fp32 sums                                   (BLOCK_N, BLOCK_V)
        z = tl.dot(hb, wt, z, input_precision=PRECISION)
    # (h @ W.T) in X, the twin's matmul output, then .float()
    return round_to(z, h_ptr.dtype.element_ty)


@triton.jit
def _dlogits(z, v, y, lse, keep, V, X: tl.constexpr):
    """dz = round_X(softmax(z) - onehot(y)) for the (BLOCK_N, BLOCK_V) tile z; 0 on ignored rows, v >= V."""
    # p = exp(log_softmax(z)) = exp(z - lse)
    p = tl.exp(z - lse[:, None])
    # p[y] -= 1
    dz = tl.where(v[None, :] == y[:, None], p - 1.0, p)
    # dz.to(X), zero where no loss is taken
    return tl.where(keep[:, None] & (v[None, :] < V), round_to(dz, X), 0.0)


@triton.jit
def _lse_fwd(h_ptr, w_ptr, y_ptr, lse_ptr, loss_ptr, N, V, C, stride_h, stride_w, ignore_index,
             PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    y = tl.load(y_ptr + rows, mask=rows < N, other=ignore_index)  # (BLOCK_N,) int64
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)  # running max
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)  # running sum of exp(z - m)
    zy = tl.zeros((BLOCK_N,), dtype=tl.float32)  # z[y]
    for v0 in range(0, V, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)  # (BLOCK_V,)
        z = _logits(h_ptr, w_ptr, rows, v, N, V, C, stride_h, stride_w, PRECISION, BLOCK_N, BLOCK_V, BLOCK_C)
        z = tl.where(v[None, :] < V, z, float("-inf"))  # columns past V: exp(-inf) = 0
        # m' = max(m, z.max(-1)): finite, every block holds a column < V
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # s' = s * exp(m - m') + exp(z - m').sum(-1)
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
        # z.gather(1, y): one block holds column y, the others add zeros
        zy += tl.sum(tl.where(v[None, :] == y[:, None], z, 0.0), axis=1)
    # lse = z.logsumexp(-1)
    lse = m + tl.log(s)
    # loss = lse - z[y], 0 where y = ignore_index
    loss = tl.where(y != ignore_index, lse - zy, 0.0)
    tl.store(lse_ptr + rows, lse, mask=rows < N)
    tl.store(loss_ptr + rows, loss, mask=rows < N)


@triton.jit
def _dh_bwd(h_ptr, w_ptr, y_ptr, lse_ptr, dh_ptr, N, V, C, stride_h, stride_w, ignore_index,
            PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    y = tl.load(y_ptr + rows, mask=rows < N, other=ignore_index)
    lse = tl.load(lse_ptr + rows, mask=rows < N, other=0.0)
    keep = y != ignore_index  # False past N too
    for v0 in range(0, V, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)  # (BLOCK_V,)
        z = _logits(h_ptr, w_ptr, rows, v, N, V, C, stride_h, stride_w, PRECISION, BLOCK_N, BLOCK_V, BLOCK_C)
        dz = _dlogits(z, v, y, lse, keep, V, h_ptr.dtype.element_ty)  # (BLOCK_N, BLOCK_V)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
            # W[v, c].float()                                                       (BLOCK_V, BLOCK_C)
            wb = tl.load(w_ptr + v.to(tl.int64)[:, None] * stride_w + c[None, :],
                         mask=(v[:, None] < V) & (c[None, :] < C), other=0.0).to(tl.float32)
            # this program's rows of the fp32 accumulator: loaded and stored through the same pointers
            ptrs = dh_ptr + rows.to(tl.int64)[:, None] * C + c[None, :]  # (BLOCK_N, BLOCK_C)
            mask = (rows[:, None] < N) & (c[None, :] < C)
            # dh[rows, c] += dz @ W[v, c]
            acc = tl.load(ptrs, mask=mask, other=0.0)
            tl.store(ptrs, tl.dot(dz, wb, acc, input_precision=PRECISION), mask=mask)


@triton.jit
def _dw_bwd(h_ptr, w_ptr, y_ptr, lse_ptr, dw_ptr, N, V, C, stride_h, stride_w, ignore_index,
            PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr):
    v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)  # (BLOCK_V,)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        y = tl.load(y_ptr + rows, mask=rows < N, other=ignore_index)
        lse = tl.load(lse_ptr + rows, mask=rows < N, other=0.0)
        keep = y != ignore_index
        z = _logits(h_ptr, w_ptr, rows, v, N, V, C, stride_h, stride_w, PRECISION, BLOCK_N, BLOCK_V, BLOCK_C)
        dz = _dlogits(z, v, y, lse, keep, V, h_ptr.dtype.element_ty)  # (BLOCK_N, BLOCK_V)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
            # h[rows, c].float()                                                    (BLOCK_N, BLOCK_C)
            hb = tl.load(h_ptr + rows.to(tl.int64)[:, None] * stride_h + c[None, :],
                         mask=(rows[:, None] < N) & (c[None, :] < C), other=0.0).to(tl.float32)
            ptrs = dw_ptr + v.to(tl.int64)[:, None] * C + c[None, :]  # (BLOCK_V, BLOCK_C)
            mask = (v[:, None] < V) & (c[None, :] < C)
            # dW[v, c] += dz.T @ h[rows, c]
            acc = tl.load(ptrs, mask=mask, other=0.0)
            tl.store(ptrs, tl.dot(tl.trans(dz), hb, acc, input_precision=PRECISION), mask=mask)


def _check(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str) -> None:
    if h.device.type == "cpu" and type(_lse_fwd).__name__ != "InterpretedFunction":
        raise RuntimeError("minicustom.kernels needs CUDA tensors (or TRITON_INTERPRET=1 set before importing "
                           "them); on CPU use minicustom.fused.linear_cross_entropy_reference")
    check_linear_cross_entropy(h, weight, labels, ignore_index, reduction)


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """t (rows, C) with unit column stride: itself where it has one."""
    return t if t.stride(-1) == 1 or t.shape[0] == 0 else t.contiguous()


def _blocks(N: int, C: int, block_n: int | None, block_v: int | None, block_c: int | None) -> dict:
    """The launch's block sizes: powers of two >= 16 (tl.dot's minimum), no larger than the problem needs."""
    blocks = dict(BLOCK_N=block_n or min(BLOCK_N, max(16, triton.next_power_of_2(N))), BLOCK_V=block_v or BLOCK_V,
                  BLOCK_C=block_c or min(BLOCK_C, max(16, triton.next_power_of_2(C))))
    for name, b in blocks.items():
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name.lower()} is {b}; expected a power of two >= 16")
    return blocks


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, ignore_index, reduction, blocks):
        X = compute_dtype(h)  # the twin's matmul dtype: autocast's, else h's
        C = h.shape[-1]
        h2 = _unit_stride(h.reshape(-1, C).to(X))  # (N, C)
        W = _unit_stride(weight.to(X))  # (V, C)
        y = labels.reshape(-1).contiguous()  # (N,)
        N, V = h2.shape[0], W.shape[0]
        lse = torch.empty(N, dtype=torch.float32, device=h.device)
        loss = torch.zeros(N, dtype=torch.float32, device=h.device)
        config = dict(PRECISION="ieee" if X == torch.float32 else "tf32", **_blocks(N, C, *blocks),
                      num_warps=NUM_WARPS, enable_fp_fusion=False)
        if N:
            _lse_fwd[(triton.cdiv(N, config["BLOCK_N"]),)](
                h2, W, y, lse, loss, N, V, C, h2.stride(0), W.stride(0), ignore_index, **config)
        n = (y != ignore_index).sum()  # rows kept, on the device
        ctx.save_for_backward(h2, W, y, lse, n)
        ctx.config, ctx.ignore_index, ctx.reduction = config, ignore_index, reduction
        ctx.h_shape, ctx.dtypes = h.shape, (h.dtype, weight.dtype)
        total = loss.sum()  # fixed order; the loss of an ignored row is 0
        return total / n if reduction == "mean" else total

    @staticmethod
    def backward(ctx, g):
        h2, W, y, lse, n = ctx.saved_tensors
        (N, C), V = h2.shape, W.shape[0]
        config = ctx.config
        # d loss / d loss_i: g, or g / n for the mean (no row: no gradient, as F.cross_entropy's)
        scale = g.float() if ctx.reduction == "sum" else torch.where(n > 0, g.float() / n, 0.0)
        args = (N, V, C, h2.stride(0), W.stride(0), ctx.ignore_index)
        dh = dW = None
        if ctx.needs_input_grad[0]:
            acc = torch.zeros((N, C), dtype=torch.float32, device=h2.device)  # (N, C) fp32
            if N:
                _dh_bwd[(triton.cdiv(N, config["BLOCK_N"]),)](h2, W, y, lse, acc, *args, **config)
            # (grad_h.to(X) * g).to(h.dtype), grad_h = dz @ W in X: the twin's expression, the product in fp32
            dh = (acc.to(h2.dtype).float() * scale).to(h2.dtype).to(ctx.dtypes[0]).view(ctx.h_shape)
        if ctx.needs_input_grad[1]:
            acc = torch.zeros((V, C), dtype=torch.float32, device=W.device)  # (V, C) fp32
            if N:
                _dw_bwd[(triton.cdiv(V, config["BLOCK_V"]),)](h2, W, y, lse, acc, *args, **config)
            # (grad_W * g).to(W.dtype), grad_W = sum_i dz_i^T h_i in fp32
            dW = (acc * scale).to(ctx.dtypes[1])
        return dh, dW, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "mean", *, block_n: int | None = None, block_v: int | None = None,
                         block_c: int | None = None) -> torch.Tensor:
    """CE(h W^T, labels) over the rows of h (..., C) whose label is not ignore_index, "mean" or "sum"
    (fp32, 0-dim), differentiable in h and weight (V, C); labels (...) int64. A mean over no row is nan
    with zero gradients, as F.cross_entropy's. block_n, block_v, block_c (powers of two >= 16) tune the
    launch and let tests cut small shapes into several blocks."""
    _check(h, weight, labels, ignore_index, reduction)
    return LinearCrossEntropyFunction.apply(h, weight, labels, int(ignore_index), reduction,
                                            (block_n, block_v, block_c))
