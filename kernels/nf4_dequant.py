"""NF4 / FP4 dequantization in one Triton launch, bit-exact with ``minicustom.nf4.dequantize``.

For element i of the flattened weight, in block b = i // blocksize (QLoRA, Dettmers et al. 2023, §3):

    absmax_b = nested_code[absmax_codes[b]] * nested_absmax[b // 256] + offset    (double quantization)
    absmax_b = absmax[b]                                                           (without)
    W_i      = code[q_i] * absmax_b                  in fp32, then rounded once to the output dtype

Two indices share a byte, q_{2j} in the high nibble of packed[j]. Every blocksize is even, so both
elements of byte j sit in block b = 2j // blocksize = j // (blocksize / 2). Each program takes BLOCK
bytes as a (ROWS, COLS) tile whose rows are blocks (COLS = blocksize / 2 bytes) or, for blocksizes above
2 * BLOCK, parts of one; it decodes one scale per row (the 8-bit double quantization is undone here, so
there is no second launch for the absmax and no fp32 absmax tensor in memory), looks both nibbles up in
the 16-entry code (16 floats that stay in L1) and writes 2 * BLOCK outputs, interleaved (high, low).

Bytes moved per weight, blocksize 64 with double quantization, fp16 out: 0.5 read (packed) + 1/64 (codes)
+ 4/(64*256) (nested scales) + 2 written = 2.516; a memory-bound kernel, measured in
``benchmarks/bench_nf4.py`` against the GPU's peak bandwidth and bitsandbytes' CUDA kernel.

Exactness: the kernel does the reference's fp32 operations in the same order, each rounded once. Two
things would break that and are pinned down:

* FMA contraction. ``nested_code[c] * nested_absmax + offset`` rounds twice in PyTorch (two kernels); the
  compiler would fuse it into one fma that rounds once. The launch passes ``enable_fp_fusion=False``.
* bf16 rounding. PyTorch rounds fp32 -> bf16 to nearest even (c10's ``round_to_nearest_even``:
  ``(bits + 0x7FFF + ((bits >> 16) & 1)) >> 16``). The GPU's ``cvt.rn.bf16.f32`` agrees, but the Triton
  interpreter truncates, so :func:`round_to` does the rounding on the bits, the same arithmetic as c10,
  and the final cast only drops zero bits on every backend. fp16 is a plain cast (RNE on GPU and in numpy).

Left out: bitsandbytes' other formats (8-bit blockwise, int8 outlier matmul) and storage dtypes other than
uint8; NaN/inf weights (``nf4.quantize`` rejects them). Weights must have fewer than 2^31 - 1 elements
(int32 indexing), which every layer of Llama 3.1 405B has (its embedding: 2.1e9).
"""

import torch
import triton
import triton.language as tl

from minicustom.quant import nf4

BLOCK = 1024  # bytes per program (2048 outputs); a power of two, as every blocksize is
NUM_WARPS = 4


@triton.jit
def block_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, b, mask,
                 DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """fp32 scale of block(s) b (any shape); 0 where ~mask (and ``offset`` with double quantization)."""
    if DOUBLE_QUANT:
        # c = absmax_codes[b]
        c = tl.load(absmax_ptr + b, mask=mask, other=0).to(tl.int32)
        # nested_code[c] * nested_absmax[b // 256]     (one fp32 rounding)
        s = tl.load(nested_code_ptr + c) * tl.load(nested_absmax_ptr + b // NESTED_BLOCKSIZE, mask=mask, other=0)
        # ... + offset                                   (a second rounding: no fma, see the launch)
        s = s + tl.load(offset_ptr)
    else:
        # absmax[b]
        s = tl.load(absmax_ptr + b, mask=mask, other=0)
    return s


@triton.jit
def round_to(w, DTYPE: tl.constexpr):
    """w (fp32) rounded to nearest even in DTYPE, still held as fp32 (exactly representable in DTYPE)."""
    if DTYPE == tl.bfloat16:
        # bits = w.view(torch.int32)
        bits = w.to(tl.uint32, bitcast=True)
        # bits + 0x7FFF + ((bits >> 16) & 1): carries into bit 16 past the midpoint, and on it when odd
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        # w.to(torch.bfloat16).float(): clear the 16 bits bf16 does not keep
        w = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    elif DTYPE == tl.float16:
        # w.to(torch.float16).float()
        w = w.to(tl.float16).to(tl.float32)
    return w


@triton.jit
def _dequant_kernel(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr, out_ptr,
                    n, n_bytes, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                    NESTED_BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    # this program's ROWS * COLS bytes as a (ROWS, COLS) tile; COLS divides blocksize / 2, so a row is in one block
    row = tl.program_id(0) * (ROWS * COLS) + tl.arange(0, ROWS) * COLS  # (ROWS,) first byte of each row
    j = row[:, None] + tl.arange(0, COLS)[None, :]  # (ROWS, COLS)
    # byte = packed[j]
    byte = tl.load(packed_ptr + j, mask=j < n_bytes, other=0)
    # absmax of block 2j // blocksize = j // (blocksize / 2): one per row, shared by both nibbles
    s = block_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, row // (BLOCKSIZE // 2),
                     row < n_bytes, DOUBLE_QUANT, NESTED_BLOCKSIZE)[:, None]  # (ROWS, 1)
    # W[2j] = code[byte >> 4] * absmax_b
    hi = tl.load(code_ptr + (byte >> 4).to(tl.int32)) * s
    # W[2j + 1] = code[byte & 0xF] * absmax_b
    lo = tl.load(code_ptr + (byte & 0xF).to(tl.int32)) * s
    # W[2j : 2j + 2] = (hi, lo), rounded to the output dtype                               (ROWS, 2 COLS)
    w = tl.interleave(round_to(hi, out_ptr.dtype.element_ty), round_to(lo, out_ptr.dtype.element_ty))
    # i = 2j, 2j + 1; an odd n drops the last byte's padding nibble
    i = 2 * row[:, None] + tl.arange(0, 2 * COLS)[None, :]  # (ROWS, 2 COLS)
    # out[i] = W[i].to(dtype): exact, the rounding is done
    tl.store(out_ptr + i, w.to(out_ptr.dtype.element_ty), mask=i < n)


def kernel_args(state: nf4.QuantState) -> tuple:
    """(absmax, nested_absmax, nested_code, offset) pointers for the kernels; without double quantization
    the nested ones are never read, and absmax stands in for them."""
    if state.double_quant:
        return state.absmax, state.nested_absmax, state.nested_code, state.offset
    return state.absmax, state.absmax, state.absmax, state.absmax


def check_state(state: nf4.QuantState, device: torch.device) -> None:
    """Errors a caller can act on: what is on the wrong device or of the wrong type."""
    if device.type == "cpu" and type(_dequant_kernel).__name__ != "InterpretedFunction":
        raise RuntimeError("minicustom.kernels needs CUDA tensors (or TRITON_INTERPRET=1 set before importing "
                           "them); on CPU use minicustom.nf4.dequantize")
    tensors = {"packed": state.packed, "absmax": state.absmax, "code": state.code}
    if state.double_quant:
        tensors.update(offset=state.offset, nested_absmax=state.nested_absmax, nested_code=state.nested_code)
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"QuantState.{name} is on {t.device}, expected {device} like the rest; use state.to()")
    want_absmax = torch.uint8 if state.double_quant else torch.float32
    if state.absmax.dtype != want_absmax or state.code.dtype != torch.float32 or state.packed.dtype != torch.uint8:
        raise ValueError(f"QuantState holds packed {state.packed.dtype}, absmax {state.absmax.dtype}, code "
                         f"{state.code.dtype}; expected uint8, {want_absmax}, float32")
    if state.numel >= 2**31 - 1:
        raise ValueError(f"a weight of {state.numel} elements overflows the kernels' int32 indexing")


def dequantize(state: nf4.QuantState, dtype: torch.dtype | None = None, out: torch.Tensor | None = None):
    """``code[q] * absmax`` as ``dtype`` (default: the original dtype) in the original shape, one launch;
    ``out``, if given, must be a contiguous tensor of that shape, dtype and device."""
    dtype = dtype or state.dtype
    if dtype not in nf4.FLOAT_DTYPES:
        raise ValueError(f"dequantize to float32/float16/bfloat16, not {dtype}")
    device = state.packed.device
    check_state(state, device)
    if out is None:
        out = torch.empty(state.shape, dtype=dtype, device=device)
    elif out.shape != state.shape or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"out is {out.dtype} {tuple(out.shape)} on {out.device} (contiguous: "
                         f"{out.is_contiguous()}); expected contiguous {dtype} {tuple(state.shape)} on {device}")
    n, packed = state.numel, state.packed.reshape(-1)
    cols = min(BLOCK, state.blocksize // 2)  # bytes per tile row: one block, or part of one
    _dequant_kernel[(triton.cdiv(packed.numel(), BLOCK),)](
        packed, *kernel_args(state), state.code, out, n, packed.numel(), BLOCKSIZE=state.blocksize,
        DOUBLE_QUANT=state.double_quant, NESTED_BLOCKSIZE=state.nested_blocksize, ROWS=BLOCK // cols, COLS=cols,
        num_warps=NUM_WARPS, enable_fp_fusion=False)
    return out
