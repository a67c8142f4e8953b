"""Fused NF4 / FP4 dequantize + matmul for the QLoRA forward: ``y = x @ W.T (+ bias)``, W held in 4 bits.

QLoRA (Dettmers et al. 2023, eq. 5) computes ``Y = X doubleDequant(c1, c2, W_nf4) + X L1 L2`` in the
compute dtype; this is the first term. Dimension letters: M rows of x (batch x tokens), K input features,
N output features; W is (N, K) and its flattened index is n*K + k, so a quantization block (b = index //
blocksize) can start mid-row when blocksize does not divide K: the scale is looked up per element (or
per byte), never per row.

Each program owns a (BLOCK_M, BLOCK_N) tile of y and walks K in steps of BLOCK_K. At each step it
dequantizes the (BLOCK_K, BLOCK_N) tile of W.T in registers (same arithmetic as ``nf4_dequant``) and
multiplies it into an fp32 accumulator; the weight is read once per M-tile, at 4.13 bits per value,
which should let small M (decode, M <= 64) run at the speed of memory instead of 16-bit weights. On the
first GPU it ran on (an H200, README) it did not: 11 to 76 GB/s, 1.3 to 6x slower than dequantize + cuBLAS
at 1 and 16 rows, so minicustom.quant.linear4bit routes no rows here (FUSED_MAX_ROWS = 0) until it is tuned.
For large M (training, prefill) W is re-dequantized per M-tile and ``nf4_dequant.dequantize`` followed
by cuBLAS is faster; bitsandbytes makes the same split (gemv_4bit for one token, dequantize + matmul
otherwise).

Semantics: W is rounded to x.dtype first, so y = x @ dequantize(state, x.dtype).T with fp32 accumulation,
as bitsandbytes computes it when the weight was quantized from x.dtype (it rounds to the weight's original
dtype, then to x.dtype); the fp32 result (+ bias in fp32) is rounded once to x.dtype.

The products run on tensor cores as TF32 on fp32 registers, not as bf16/fp16 MMAs: every fp16 and bf16
value is exactly a TF32 value (10 mantissa bits >= 10 and 7; 8 exponent bits cover both ranges), and
the product of two TF32 values is exact in fp32, so the result is that of a bf16 MMA accumulating in
fp32, at half its peak FLOPs, which small M never reaches. It also runs under the Triton interpreter,
whose bf16 dot multiplies the raw bits. An fp32 x uses IEEE fp32 products (CUDA cores), not TF32.

When K is even (every real model), row n starts on a byte, and the kernel reads W.T as a (BLOCK_K/2,
BLOCK_N) tile of bytes: high nibbles are the even k, low nibbles the odd k, multiplied with x's even and
odd columns in two dots; no shuffle. An odd K takes the general path: one byte load per element,
``packed[i // 2] >> (4 if i is even else 0)``.

Split-K. At small M a GEMV is bound by memory latency, and N / BLOCK_N output tiles are too few programs
to keep enough loads in flight (N = 1024 at BLOCK_N = 32: 32 programs for an H100's 132 SMs). So K is cut
into SPLIT_K ranges of whole k-steps, one program each; each writes its fp32 partial sum to a (SPLIT_K, M,
N) buffer and a second launch adds them in split order (deterministic, unlike atomics), adds the bias and
rounds. The error bound is unchanged: still K + 1 terms summed in fp32, in another order.

Left out: autotuning (the tile defaults and PROGRAMS_PER_SM are guesses, which ``benchmarks/bench_nf4.py
--sweep`` measures), the backward (QLoRA's base weight is frozen: dx = dy @ W, which ``nf4_dequant`` +
matmul gives), and a persistent / stream-K schedule that would save the second launch.
"""

import torch
import triton
import triton.language as tl

from minicustom.quant import nf4

from .nf4_dequant import block_absmax, check_state, kernel_args, round_to

PROGRAMS_PER_SM = 4  # a guess to keep enough loads in flight; benchmarks/bench_nf4.py --sweep measures others


@triton.jit
def _store(acc, m, n, M, N, bias_ptr, y_ptr, HAS_BIAS: tl.constexpr):
    """y[m, n] = (acc + bias).to(y.dtype) for the (BLOCK_M, BLOCK_N) tile acc."""
    if HAS_BIAS:
        # acc + bias.float()
        acc = acc + tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
    # acc.to(x.dtype): round_to rounds to nearest even on every backend, .to then drops zero bits
    y = round_to(acc, y_ptr.dtype.element_ty).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + m[:, None] * N + n[None, :], y, mask=(m[:, None] < M) & (n[None, :] < N))


@triton.jit
def _linear_kernel(x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr,
                   bias_ptr, y_ptr, partial_ptr, M, N, K, K_SPLIT, stride_xm, stride_xk,
                   BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                   HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr, SPLIT_K: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    # this program's k range: [k_start, k_end), K_SPLIT a multiple of BLOCK_K
    k_start = tl.program_id(2) * K_SPLIT
    k_end = tl.minimum(K, k_start + K_SPLIT)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if EVEN_K:
        for k0 in range(k_start, k_end, BLOCK_K):
            # j: byte within a row; byte j of row n holds k = 2j (high nibble) and k = 2j + 1 (low)
            j = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # (BLOCK_K/2,)
            mask_w = (j[:, None] < K // 2) & (n[None, :] < N)  # (BLOCK_K/2, BLOCK_N)
            # byte index of W[n, 2j] in the flat packing: (n*K + 2j) // 2
            idx = n[None, :] * (K // 2) + j[:, None]  # (BLOCK_K/2, BLOCK_N)
            # byte = packed[idx]
            byte = tl.load(packed_ptr + idx, mask=mask_w, other=0)
            # absmax of block (2 idx) // blocksize, shared by the byte's two nibbles
            s = block_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, idx // (BLOCKSIZE // 2),
                             mask_w, DOUBLE_QUANT, NESTED_BLOCKSIZE)
            # W.T[2j, n] = (code[byte >> 4] * absmax).to(x.dtype), 0 outside W
            w_even = tl.where(mask_w, round_to(tl.load(code_ptr + (byte >> 4).to(tl.int32)) * s,
                                               x_ptr.dtype.element_ty), 0.0)
            # W.T[2j + 1, n] = (code[byte & 0xF] * absmax).to(x.dtype)
            w_odd = tl.where(mask_w, round_to(tl.load(code_ptr + (byte & 0xF).to(tl.int32)) * s,
                                              x_ptr.dtype.element_ty), 0.0)
            mask_x = (m[:, None] < M) & (j[None, :] < K // 2)  # (BLOCK_M, BLOCK_K/2)
            # x[m, 2j].float() and x[m, 2j + 1].float()
            x_even = tl.load(x_ptr + m[:, None] * stride_xm + (2 * j)[None, :] * stride_xk, mask=mask_x, other=0.0)
            x_odd = tl.load(x_ptr + m[:, None] * stride_xm + (2 * j + 1)[None, :] * stride_xk, mask=mask_x,
                            other=0.0)
            # acc += x[:, 0::2] @ W.T[0::2, :] + x[:, 1::2] @ W.T[1::2, :]      (BLOCK_M, BLOCK_N)
            acc = tl.dot(x_even.to(tl.float32), w_even, acc, input_precision=PRECISION)
            acc = tl.dot(x_odd.to(tl.float32), w_odd, acc, input_precision=PRECISION)
    else:
        for k0 in range(k_start, k_end, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
            mask_w = (k[:, None] < K) & (n[None, :] < N)  # (BLOCK_K, BLOCK_N)
            # i = n*K + k, W's flat index
            i = n[None, :] * K + k[:, None]  # (BLOCK_K, BLOCK_N)
            # q = (packed[i // 2] >> 4) if i is even else (packed[i // 2] & 0xF)
            byte = tl.load(packed_ptr + i // 2, mask=mask_w, other=0)
            q = tl.where(i % 2 == 0, byte >> 4, byte & 0xF).to(tl.int32)
            # absmax of block i // blocksize
            s = block_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, i // BLOCKSIZE, mask_w,
                             DOUBLE_QUANT, NESTED_BLOCKSIZE)
            # W.T[k, n] = (code[q] * absmax).to(x.dtype), 0 outside W
            w = tl.where(mask_w, round_to(tl.load(code_ptr + q) * s, x_ptr.dtype.element_ty), 0.0)
            # x[m, k].float()
            xs = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :] * stride_xk,
                         mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)
            # acc += x @ W.T                                                        (BLOCK_M, BLOCK_N)
            acc = tl.dot(xs.to(tl.float32), w, acc, input_precision=PRECISION)
    if SPLIT_K == 1:
        _store(acc, m, n, M, N, bias_ptr, y_ptr, HAS_BIAS)
    else:
        # partial[split, m, n] = acc                                        (SPLIT_K, M, N) fp32
        tl.store(partial_ptr + tl.program_id(2) * M * N + m[:, None] * N + n[None, :], acc,
                 mask=(m[:, None] < M) & (n[None, :] < N))


@triton.jit
def _sum_splits_kernel(partial_ptr, bias_ptr, y_ptr, M, N, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    mask = (m[:, None] < M) & (n[None, :] < N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):
        # partial.sum(0), in split order: deterministic
        acc += tl.load(partial_ptr + split * M * N + m[:, None] * N + n[None, :], mask=mask, other=0.0)
    _store(acc, m, n, M, N, bias_ptr, y_ptr, HAS_BIAS)


def default_split_k(x: torch.Tensor, tiles: int, k_steps: int) -> int:
    """Splits for about PROGRAMS_PER_SM programs per SM, keeping at least 4 k-steps each; 1 off the GPU."""
    if x.device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count  # cached by torch
    return max(1, min(triton.cdiv(PROGRAMS_PER_SM * sms, tiles), k_steps // 4))


def linear(x: torch.Tensor, state: nf4.QuantState, bias: torch.Tensor | None = None, *,
           block_n: int = 32, block_k: int = 128, num_warps: int = 4, split_k: int | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for x (..., K) and a 4-bit W of shape (N, K); fp32 accumulation, output x.dtype.
    block_n (>= 16), block_k (>= 32; powers of two), num_warps and split_k (the number of K ranges summed by
    a second launch; default from the SM count) tune the launch."""
    if len(state.shape) != 2:
        raise ValueError(f"linear needs a 2-D (out_features, in_features) weight, got shape {tuple(state.shape)}")
    N, K = state.shape
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features (shape {tuple(x.shape)}); the weight {N}x{K} needs {K}")
    if x.dtype not in nf4.FLOAT_DTYPES:
        raise ValueError(f"x must be float32/float16/bfloat16, got {x.dtype}")
    check_state(state, x.device)
    if bias is not None and (bias.shape != (N,) or bias.device != x.device):
        raise ValueError(f"bias is {tuple(bias.shape)} on {bias.device}, expected ({N},) on {x.device}")
    x2 = x.reshape(-1, K)  # (M, K)
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)  # (M, N)
    if M == 0:
        return y.view(*x.shape[:-1], N)
    block_m = min(64, max(16, triton.next_power_of_2(M)))
    tiles = (triton.cdiv(N, block_n), triton.cdiv(M, block_m))
    k_steps = triton.cdiv(K, block_k)
    split_k = min(split_k or default_split_k(x, tiles[0] * tiles[1], k_steps), k_steps)
    k_split = triton.cdiv(k_steps, split_k) * block_k  # a multiple of block_k: splits never share a k-step
    split_k = triton.cdiv(K, k_split)
    partial = torch.empty((split_k, M, N), dtype=torch.float32, device=x.device) if split_k > 1 else y
    bias_arg = bias if bias is not None else y
    _linear_kernel[(*tiles, split_k)](
        x2, state.packed.reshape(-1), *kernel_args(state), state.code, bias_arg, y, partial, M, N, K, k_split,
        x2.stride(0), x2.stride(1), BLOCKSIZE=state.blocksize, DOUBLE_QUANT=state.double_quant,
        NESTED_BLOCKSIZE=state.nested_blocksize, HAS_BIAS=bias is not None, EVEN_K=K % 2 == 0,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", SPLIT_K=split_k,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, enable_fp_fusion=False)
    if split_k > 1:
        _sum_splits_kernel[tiles](partial, bias_arg, y, M, N, HAS_BIAS=bias is not None, SPLIT_K=split_k,
                                  BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return y.view(*x.shape[:-1], N)  # (..., N)
