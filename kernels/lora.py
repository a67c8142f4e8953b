"""LoRA's product added into the base output, ``y = base_out + s (x A^T) B^T``, forward and backward in
Triton; twin of ``minicustom.methods.lora_layers._LoRAProduct`` (what ``LoRALinear.forward`` applies per
adapter, and the default path off the GPU).

LoRA (Hu et al. 2021, eq. 3, with §4.1's scaling): h = W0 x + (alpha / r) B A x, A (r, K) and B (N, r),
r << K, N. The caller computes W0 x (dense, 4-bit, merged adapters: its business) as base_out; this adds
the low-rank term. Dimension letters: M rows of x (batch x tokens), K in features, N out features, r
rank; X the compute dtype (autocast's, else x's). In fp32, every operand rounded to X first (as the twin
casts them):

    xa   = round_X(x A^T)                                  (M, r)   one register tile per program
    y    = round_X(round_X(base_out) + s * (xa B^T))       (M, N)   a new tensor (not base_out, in place)

Backward, with g = round_X(dy) and every product summed in fp32 then rounded as the twin rounds it:

    dxa  = round_X(round_X(g B) * s)                       (M, r)   = dL/d(xa)
    dx   = round_X(dxa A)                                  (M, K)   the LoRA path's part; W0's is the caller's
    dA   = round_X(dxa^T x)                                (r, K)
    dB   = round_X(round_X(g^T xa) * s)                    (N, r)
    d base_out = dy

Launches. Forward: one program per BLOCK_M rows walks K once for its (BLOCK_M, r) tile of xa (fp32
accumulator), rounds it, then walks N adding s * xa B^T into each base_out tile. Backward: (1) one
program per BLOCK_M rows walks N for dxa = s g B, then K writing dx = dxa A; (2) dA = dxa^T x and
dB = s g^T xa are sums over all M rows, taken by one kernel for thin transposed products (a program per
BLOCK_P columns walks its share of the rows; SPLIT ranges of rows land in an fp32 (SPLIT, ., .) buffer
that one torch sum reduces in a fixed order: deterministic, no atomics).

Saved for the backward (when B needs a gradient): xa, (M, r) in X, written once by the forward rather
than recomputed: dB needs it before dxa exists, so recomputing would read all of x a second time (M K
values) to save M r (r <= 128, K in the thousands). Values moved, each in its tensor's dtype (A and B
are re-read per tile, from L2):
    forward   x (M K) and base_out (M N) read; y (M N) and xa (M r) written
    backward  dy (M N) twice (for dxa, for dB), x (M K) once; dx (M K) written; xa, dxa (M r) small
The unfused twin moves the same dy, x and y, plus x rounded to X in a copy under autocast (rounded in
registers here) and one (M, r) round trip per product: the fusion saves launches and the cast copies,
not the big tensors. A backward that read dy once would take dB's sum over M inside the dxa pass: atomics,
or (M / BLOCK_M) N r fp32 partial sums written and read back (M N bytes at r = 16, BLOCK_M = 64: half
of a bf16 dy), for little gain.

Exactness: the kernel rounds where the twin rounds (round_X via ``round_to``, RNE as torch; the
interpreter truncates) and contracts nothing into FMAs (``enable_fp_fusion=False``); only the order of
the fp32 sums inside each product differs from the BLAS's, so the two agree to the bound the test derives
(gamma_n of the sums plus, where the sums differ, one ulp of X at each rounding), not bit for bit.
tl.dot takes fp32 registers: "ieee" products for fp32 X, "tf32" otherwise, exact there since every bf16
and fp16 value is a TF32 value (the interpreter's bf16 dot would multiply raw bits; see nf4_matmul); how
a tensor core orders and rounds the additions inside one MMA is the hardware's, so the bound is the
interpreter's. s is passed as fp32, as torch's addmm and ``* s`` on a tensor use it.

Left out: dropout on x (LoRALinear applies it before the product; a fused mask would need the RNG state
saved), DoRA's magnitude rescale, several adapters in one launch, writing y into base_out in place (it
breaks autograd for a base_out used elsewhere, as DoRA's is), ranks above MAX_R, autotuned tiles, and a
backward reading dy once (above).
"""

import torch
import triton
import triton.language as tl

from minicustom.precision import compute_dtype

from .nf4_dequant import round_to

MAX_R = 128  # xa (BLOCK_M, r) and the (BLOCK_P, r) sums live in registers
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
PROGRAMS_PER_SM = 4  # the split of dA's and dB's row sums aims at this many programs (a guess, as nf4_matmul's)


@triton.jit
def _lora_fwd(x_ptr, a_ptr, b_ptr, base_ptr, y_ptr, xa_ptr, M, N, K, R, s, stride_xm, stride_xk, stride_ar,
              stride_ak, stride_bn, stride_br, stride_base, SAVE_XA: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    X: tl.constexpr = y_ptr.dtype.element_ty
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    j = tl.arange(0, BLOCK_R)  # (BLOCK_R,) rank index; padding rows of A and columns of B load as 0
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        # x[m, k].to(X)                                                              (BLOCK_M, BLOCK_K)
        xs = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :] * stride_xk,
                     mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)
        xs = round_to(xs.to(tl.float32), X)
        # A.T[k, j].to(X)                                                            (BLOCK_K, BLOCK_R)
        at = tl.load(a_ptr + j[None, :] * stride_ar + k[:, None] * stride_ak,
                     mask=(j[None, :] < R) & (k[:, None] < K), other=0.0)
        at = round_to(at.to(tl.float32), X)
        # xa += x @ A.T, in fp32
        acc = tl.dot(xs, at, acc, input_precision=PRECISION)
    # xa = (x @ A.T) in X, as the twin's matmul returns it
    xa = round_to(acc, X)
    if SAVE_XA:
        tl.store(xa_ptr + m[:, None] * R + j[None, :], xa.to(X), mask=(m[:, None] < M) & (j[None, :] < R))
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        mask = (m[:, None] < M) & (n[None, :] < N)  # (BLOCK_M, BLOCK_N)
        # B.T[j, n].to(X)                                                            (BLOCK_R, BLOCK_N)
        bt = tl.load(b_ptr + n[None, :] * stride_bn + j[:, None] * stride_br,
                     mask=(n[None, :] < N) & (j[:, None] < R), other=0.0)
        bt = round_to(bt.to(tl.float32), X)
        # t = xa @ B.T, in fp32                                                      (BLOCK_M, BLOCK_N)
        t = tl.dot(xa, bt, input_precision=PRECISION)
        # base_out.to(X)
        base = round_to(tl.load(base_ptr + m[:, None] * stride_base + n[None, :], mask=mask, other=0.0)
                        .to(tl.float32), X)
        # torch.addmm(base_out, xa, B.T, alpha=s): s * t, then + base, one rounding each, then to X
        y = round_to(base + s * t, X)
        tl.store(y_ptr + m[:, None] * N + n[None, :], y.to(X), mask=mask)


@triton.jit
def _lora_bwd_rows(dy_ptr, a_ptr, b_ptr, dxa_ptr, dx_ptr, M, N, K, R, s, stride_dy, stride_ar, stride_ak,
                   stride_bn, stride_br, WRITE_DX: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    X: tl.constexpr = dxa_ptr.dtype.element_ty
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    j = tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        # g = dy.to(X)                                                               (BLOCK_M, BLOCK_N)
        g = tl.load(dy_ptr + m[:, None] * stride_dy + n[None, :], mask=(m[:, None] < M) & (n[None, :] < N),
                    other=0.0)
        g = round_to(g.to(tl.float32), X)
        # B[n, j].to(X)                                                              (BLOCK_N, BLOCK_R)
        b = tl.load(b_ptr + n[:, None] * stride_bn + j[None, :] * stride_br,
                    mask=(n[:, None] < N) & (j[None, :] < R), other=0.0)
        b = round_to(b.to(tl.float32), X)
        # acc += g @ B, in fp32
        acc = tl.dot(g, b, acc, input_precision=PRECISION)
    # dxa = (g @ B).to(X) * s, in X                                                  (BLOCK_M, BLOCK_R)
    dxa = round_to(round_to(acc, X) * s, X)
    tl.store(dxa_ptr + m[:, None] * R + j[None, :], dxa.to(X), mask=(m[:, None] < M) & (j[None, :] < R))
    if WRITE_DX:
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
            # A[j, k].to(X)                                                          (BLOCK_R, BLOCK_K)
            a = tl.load(a_ptr + j[:, None] * stride_ar + k[None, :] * stride_ak,
                        mask=(j[:, None] < R) & (k[None, :] < K), other=0.0)
            a = round_to(a.to(tl.float32), X)
            # dx = (dxa @ A).to(X), then to x's dtype                                (BLOCK_M, BLOCK_K)
            dx = round_to(tl.dot(dxa, a, input_precision=PRECISION), X)
            tl.store(dx_ptr + m[:, None] * K + k[None, :], dx.to(dx_ptr.dtype.element_ty),
                     mask=(m[:, None] < M) & (k[None, :] < K))


@triton.jit
def _thin_tn(l_ptr, r_ptr, out_ptr, M, P, R, M_SPLIT, stride_lm, stride_lp, stride_os, stride_op, stride_oj,
             PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr):
    """out[split, p, j] = sum over this split's rows m of L[m, p].to(X) * Rt[m, j], in fp32; Rt (M, r) is
    contiguous in X (xa or dxa), which sets X."""
    X: tl.constexpr = r_ptr.dtype.element_ty
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # (BLOCK_P,)
    j = tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    m_start = tl.program_id(1) * M_SPLIT
    m_end = tl.minimum(M, m_start + M_SPLIT)
    acc = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        # L.T[p, m].to(X): dy or x, transposed by the addressing                   (BLOCK_P, BLOCK_M)
        lt = tl.load(l_ptr + m[None, :] * stride_lm + p[:, None] * stride_lp,
                     mask=(m[None, :] < m_end) & (p[:, None] < P), other=0.0)
        lt = round_to(lt.to(tl.float32), X)
        # Rt[m, j]                                                                   (BLOCK_M, BLOCK_R)
        rt = tl.load(r_ptr + m[:, None] * R + j[None, :], mask=(m[:, None] < m_end) & (j[None, :] < R),
                     other=0.0).to(tl.float32)
        # acc += L.T @ Rt, in fp32
        acc = tl.dot(lt, rt, acc, input_precision=PRECISION)
    tl.store(out_ptr + tl.program_id(1) * stride_os + p[:, None] * stride_op + j[None, :] * stride_oj, acc,
             mask=(p[:, None] < P) & (j[None, :] < R))


def _check(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, base_out: torch.Tensor) -> None:
    """Errors a caller can act on: wrong device, dtype or shape."""
    if x.device.type == "cpu" and type(_lora_fwd).__name__ != "InterpretedFunction":
        raise RuntimeError("minicustom.kernels needs CUDA tensors (or TRITON_INTERPRET=1 set before importing "
                           "them); on CPU use LoRALinear's product (minicustom.methods.lora_layers)")
    named = {"x": x, "A": A, "B": B, "base_out": base_out}
    for name, t in named.items():
        if t.dtype not in FLOATS or t.device != x.device:
            raise ValueError(f"lora_linear: {name} is {t.dtype} on {t.device}; expected float32/bfloat16/float16 "
                             f"on {x.device} (x's device)")
    if A.dim() != 2 or B.dim() != 2:
        raise ValueError(f"lora_linear: A is {tuple(A.shape)} and B {tuple(B.shape)}; expected A (r, K), B (N, r)")
    r, K = A.shape
    if x.shape[-1] != K:
        raise ValueError(f"lora_linear: x has {x.shape[-1]} features (shape {tuple(x.shape)}) but A {tuple(A.shape)} "
                         f"expects K = {K}")
    if B.shape[1] != r:
        raise ValueError(f"lora_linear: B is {tuple(B.shape)} with rank {B.shape[1]}, A {tuple(A.shape)} with rank "
                         f"{r}; expected B ({B.shape[0]}, {r})")
    if base_out.shape != (*x.shape[:-1], B.shape[0]):
        raise ValueError(f"lora_linear: base_out is {tuple(base_out.shape)}; expected {(*x.shape[:-1], B.shape[0])} "
                         f"for x {tuple(x.shape)} and B {tuple(B.shape)}")
    if r > MAX_R:
        raise ValueError(f"lora_linear: rank {r} is above MAX_R = {MAX_R}; use LoRALinear's product")
    span = max(sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) for t in named.values())
    if max(t.numel() for t in named.values()) >= 2**31 or span >= 2**31:
        raise ValueError(f"lora_linear: x {tuple(x.shape)} or base_out {tuple(base_out.shape)} spans 2^31 "
                         "elements or more (int32 indexing)")


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """t as (M, n) rows with unit column stride: a view where one exists."""
    t = t.reshape(-1, n)
    return t if t.stride(-1) == 1 or t.shape[0] == 0 else t.contiguous()


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_m(M: int, block_m: int | None) -> int:
    return block_m or min(64, max(16, triton.next_power_of_2(M)))


def _sum_tn(L: torch.Tensor, Rt: torch.Tensor, transpose: bool, launch: dict) -> torch.Tensor:
    """L^T @ Rt for L (M, P) (any float dtype, rounded to Rt's) and Rt (M, r) contiguous: the fp32 sum over
    the M rows, as (P, r), or (r, P) with transpose."""
    M, P = L.shape
    r = Rt.shape[1]
    if M == 0:
        return torch.zeros((r, P) if transpose else (P, r), dtype=torch.float32, device=L.device)
    block_m, block_p = launch["block_m"] or 64, launch["block_p"]
    tiles = triton.cdiv(P, block_p)
    m_steps = triton.cdiv(M, block_m)
    split = launch["split_m"]
    if split is None:
        sms = torch.cuda.get_device_properties(L.device).multi_processor_count if L.is_cuda else 1
        split = max(1, min(triton.cdiv(PROGRAMS_PER_SM * sms, tiles), m_steps // 4))
    m_split = triton.cdiv(m_steps, max(1, min(split, m_steps))) * block_m  # whole BLOCK_M steps per split
    split = triton.cdiv(M, m_split)
    out = torch.zeros((split, r, P) if transpose else (split, P, r), dtype=torch.float32, device=L.device)
    stride_op, stride_oj = (1, P) if transpose else (r, 1)
    _thin_tn[(tiles, split)](L, Rt, out, M, P, r, m_split, L.stride(0), L.stride(1), out.stride(0), stride_op,
                             stride_oj, PRECISION=_precision(Rt.dtype), BLOCK_M=block_m, BLOCK_P=block_p,
                             BLOCK_R=max(16, triton.next_power_of_2(r)), num_warps=4, enable_fp_fusion=False)
    # the splits' sum in a fixed order
    return out.sum(0)


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base_out, x, A, B, s, launch):
        X = compute_dtype(x)
        (r, K), N = A.shape, B.shape[0]
        x2, y2 = x.reshape(-1, K), _rows(base_out, N)  # (M, K), (M, N)
        M = x2.shape[0]
        y = torch.empty((M, N), dtype=X, device=x.device)
        save_xa = ctx.needs_input_grad[3]  # only dB needs xa
        xa = torch.empty((M, r) if save_xa else (0, r), dtype=X, device=x.device)  # (M, r)
        block_m = _block_m(M, launch["block_m"])
        if M:
            _lora_fwd[(triton.cdiv(M, block_m),)](
                x2, A, B, y2, y, xa, M, N, K, r, s, x2.stride(0), x2.stride(1), A.stride(0), A.stride(1),
                B.stride(0), B.stride(1), y2.stride(0), SAVE_XA=save_xa, PRECISION=_precision(X),
                BLOCK_M=block_m, BLOCK_N=launch["block_n"], BLOCK_K=launch["block_k"],
                BLOCK_R=max(16, triton.next_power_of_2(r)), num_warps=4, enable_fp_fusion=False)
        ctx.save_for_backward(x2, xa, A, B)
        ctx.s, ctx.launch, ctx.x_shape, ctx.base_dtype = s, launch, x.shape, base_out.dtype
        return y.view(base_out.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, xa, A, B = ctx.saved_tensors
        (M, K), (N, r), X = x2.shape, B.shape, xa.dtype
        need_x, need_A, need_B = ctx.needs_input_grad[1:4]
        launch = ctx.launch
        dy2 = _rows(dy, N)  # (M, N)
        dx = dA = dB = None
        if need_x or need_A:
            dxa = torch.empty((M, r), dtype=X, device=dy.device)  # (M, r)
            dx2 = torch.empty((M, K) if need_x else (0, K), dtype=x2.dtype, device=dy.device)  # (M, K)
            block_m = _block_m(M, launch["block_m"])
            if M:
                _lora_bwd_rows[(triton.cdiv(M, block_m),)](
                    dy2, A, B, dxa, dx2, M, N, K, r, ctx.s, dy2.stride(0), A.stride(0), A.stride(1), B.stride(0),
                    B.stride(1), WRITE_DX=need_x, PRECISION=_precision(X), BLOCK_M=block_m,
                    BLOCK_N=launch["block_n"], BLOCK_K=launch["block_k"], BLOCK_R=max(16, triton.next_power_of_2(r)),
                    num_warps=4, enable_fp_fusion=False)
            dx = dx2.view(ctx.x_shape) if need_x else None
            if need_A:
                # dA = (dxa.T @ x).to(X), in A's dtype                                   (r, K)
                dA = _sum_tn(x2, dxa, True, dict(launch, block_p=launch["block_k"])).to(X).to(A.dtype)
        if need_B:
            # dB = (g.T @ xa).to(X) * s, in B's dtype                                    (N, r)
            dB = (_sum_tn(dy2, xa, False, dict(launch, block_p=launch["block_n"])).to(X) * ctx.s).to(B.dtype)
        return dy.to(ctx.base_dtype), dx, dA, dB, None, None


def lora_linear(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, base_out: torch.Tensor, *,
                block_m: int | None = None, block_n: int = 64, block_k: int = 64,
                split_m: int | None = None) -> torch.Tensor:
    """``base_out + scale * (x @ A.T) @ B.T`` for x (..., K), A (r, K), B (N, r), base_out (..., N), as a new
    tensor in the compute dtype (autocast's, else x's), differentiable in all four. block_m, block_n,
    block_k (powers of two >= 16) and split_m (row ranges of dA's and dB's sums; default from the SM count)
    are for tests and benchmarks."""
    _check(x, A, B, base_out)
    for name, block in (("block_m", block_m or 16), ("block_n", block_n), ("block_k", block_k)):
        if block < 16 or block & (block - 1):
            raise ValueError(f"lora_linear: {name} is {block}; expected a power of two >= 16 (tl.dot's minimum)")
    launch = dict(block_m=block_m, block_n=block_n, block_k=block_k, split_m=split_m)
    return LoRALinearFunction.apply(base_out, x, A, B, float(scale), launch)
