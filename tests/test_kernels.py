"""Triton kernels vs the PyTorch reference, run by the Triton interpreter on CPU.

tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton: the variable is read when a
function is decorated with @triton.jit (triton's own helpers such as tl.interleave are decorated when
triton is first imported), so setting it later, even before importing minicustom.kernels, is not enough.
The module checks that the kernels really are interpreted rather than passing vacuously.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton.language as tl
from kernel_checks import U, assert_interpreted, interpreted
from minicustom.kernels import nf4_dequant, nf4_matmul

from minicustom import nf4

ROOT = Path(__file__).resolve().parents[1]


def test_the_kernels_are_interpreted():
    assert_interpreted(tl.interleave, nf4_dequant._dequant_kernel, nf4_matmul._linear_kernel)

SHAPES = [(33, 70), (5, 7, 9), (1, 4097), (128, 96)]  # odd numel, a partial block, spanning rows
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def weight(shape, seed):
    """Spread-out magnitudes so that blocks have very different scales, and some exact zeros."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.exp(2 * torch.randn(shape, generator=g))
    w.view(-1)[::11] = 0
    return w


@interpreted
@pytest.mark.parametrize("quant_type", nf4.QUANT_TYPES)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
def test_dequantize_is_bit_exact(quant_type, double_quant, blocksize):
    """The same fp32 products and sums as nf4.dequantize, rounded once: equal in every dtype, fp16 and bf16
    included (not merely within an ulp)."""
    for i, shape in enumerate(SHAPES):
        state = nf4.quantize(weight(shape, i), blocksize, double_quant, quant_type)
        for dtype in DTYPES:
            out = nf4_dequant.dequantize(state, dtype)
            assert out.shape == shape and out.dtype == dtype
            torch.testing.assert_close(out, nf4.dequantize(state, dtype), rtol=0, atol=0, msg=str((shape, dtype)))


@interpreted
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # numpy, casting 70000 to fp16: inf, as torch
def test_dequantize_rounding_ties_and_overflow():
    """Code values placed on the bf16 and fp16 rounding midpoints (ties go to even), next to them, and
    beyond fp16's range (inf): the kernel rounds exactly as torch's .to(dtype)."""
    ties = [1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, 1 + 2**-11, 1 + 3 * 2**-11, -(1 + 2**-8), 2**-30, 0.0]
    code = torch.tensor(ties + [70000.0, 65519.0, 65520.0, -3e38, 3.3e38, 1 - 2**-24, 1.5, -1.0])
    state = nf4.QuantState(packed=torch.arange(8, dtype=torch.uint8)[:, None] * 0x22 + 0x01,  # codes 0..15
                           absmax=torch.ones(1), code=code, blocksize=64, quant_type="nf4",
                           shape=torch.Size([16]), dtype=torch.float32)
    for dtype in DTYPES:
        ours, ref = nf4_dequant.dequantize(state, dtype), nf4.dequantize(state, dtype)
        assert torch.equal(ours.float().view(torch.int32), ref.float().view(torch.int32)), (dtype, ours, ref)


@interpreted
def test_dequantize_out_and_errors():
    state = nf4.quantize(weight((9, 15), 0), 32)
    out = torch.full((9, 15), float("nan"), dtype=torch.bfloat16)
    assert nf4_dequant.dequantize(state, torch.bfloat16, out=out) is out
    assert torch.equal(out, nf4.dequantize(state, torch.bfloat16))
    with pytest.raises(ValueError, match="expected contiguous torch.float32"):
        nf4_dequant.dequantize(state, torch.float32, out=out)
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        nf4_dequant.dequantize(state, torch.int8)


def check_linear(x, state, bias, **launch):
    """Two bounds, u = unit roundoff (u32 = 2^-24; u_x, u_out of x.dtype; u_x = 0 for fp32 x, whose W is
    not rounded), S = |x| @ |W|.T + |bias|, K + 1 terms per output (the bias is one more):

    1. vs ref = x.float() @ W32.T + bias in fp32 (torch). Both sides sum K + 1 products in fp32 in some
       order, each within gamma_{K+1} S of its exact value (Higham, Accuracy and Stability, eq. 3.5,
       gamma_n = n u32 / (1 - n u32)); the kernel's W is rounded to x.dtype first (|dW| <= u_x |W|, at
       most u_x S on the sum); the output is rounded once (u_out |y|). So
           |y - ref| <= u_out |ref| + (1 + u_out) ((2 + u_x) gamma_{K+1} + u_x) S
                     <= u_out |ref| + 2 (2 (K + 1) u32 + u_x) S + eta,
       the factor 2 covering the (1 + u) and 1 / (1 - n u) terms, eta = half fp16's subnormal spacing
       (underflow, 2^-25; < 1e-38 for bf16 and fp32).
    2. vs ref64 = x.double() @ dequantize(state, x.dtype).double().T + bias: the kernel's only errors are
       its fp32 accumulation and the final rounding, |y - ref64| <= u_out |ref64| + 2 (K + 1) u32 S + eta.
    In bf16 the bounds are u_out |y| + 2^-7 S: the rounding of the output and of W, not the kernel.
    """
    y = nf4_matmul.linear(x, state, bias, **launch)
    assert y.shape == (*x.shape[:-1], state.shape[0]) and y.dtype == x.dtype
    K, u_out = state.shape[1], U[x.dtype]
    u_x = 0.0 if x.dtype == torch.float32 else u_out
    eta = torch.finfo(x.dtype).tiny * torch.finfo(x.dtype).eps / 2
    W32 = nf4.dequantize(state, torch.float32)
    b = torch.zeros(state.shape[0]) if bias is None else bias.float()
    S = x.float().abs() @ W32.abs().T + b.abs()
    ref = x.float() @ W32.T + b
    tol = u_out * ref.abs() + 2 * (2 * (K + 1) * 2.0**-24 + u_x) * S + eta
    err = (y.float() - ref).abs()
    assert (err <= tol).all(), f"fp32 reference: max err / bound {(err / tol).max():.3g}"
    ref64 = x.double() @ nf4.dequantize(state, x.dtype).double().T + b.double()
    tol64 = u_out * ref64.abs() + 2 * (K + 1) * 2.0**-24 * S.double() + eta
    err64 = (y.double() - ref64).abs()
    assert (err64 <= tol64).all(), f"x.dtype weight reference: max err / bound {(err64 / tol64).max():.3g}"
    return y


@interpreted
@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("N, K", [(33, 70), (64, 128), (100, 257)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_reference(M, N, K, dtype):
    """Even K (bytes along k) and odd K (one byte per element), blocks that start mid-row (64 does not
    divide 70 or 257), N and K not multiples of the tile; nf4 and fp4, with and without double quant; one
    launch, and split-K (K cut into 2 or 3 ranges of 32-wide k-steps, the last one partial, summed by the
    second kernel)."""
    seed = M * 1000 + N
    state = nf4.quantize(weight((N, K), seed) * 0.05, blocksize=(64, 32)[seed % 2],
                         double_quant=bool(seed % 3), quant_type=nf4.QUANT_TYPES[(seed // 3) % 2])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    for b, launch in [(None, {}), (bias, {}), (None, dict(split_k=3, block_k=32, block_n=16)),
                      (bias, dict(split_k=2, block_k=32))]:
        check_linear(x, state, b, **launch)


@interpreted
def test_linear_3d_strided_and_fp16():
    """x of shape (B, T, K), a non-contiguous x (a column slice), fp16, and M = 70 > BLOCK_M = 64 (two
    M-tiles)."""
    state = nf4.quantize(weight((48, 40), 7) * 0.05, blocksize=64)
    g = torch.Generator().manual_seed(0)
    for dtype in DTYPES:
        x = torch.randn(2, 5, 40, generator=g).to(dtype)
        y = check_linear(x, state, torch.randn(48, generator=g).to(dtype))
        assert y.shape == (2, 5, 48)
        wide = torch.randn(70, 100, generator=g).to(dtype)[:, 30:70]  # (70, 40), row stride 100
        check_linear(wide, state, None)
    with pytest.raises(ValueError, match="needs 40"):
        nf4_matmul.linear(torch.randn(3, 41), state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_kernels_on_gpu():
    """The compiled kernels (not the interpreter) on the GPU: bit-exact dequant, linear within bound."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_nf4.py"), "--check-only"],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
