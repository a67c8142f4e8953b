"""LoRA's fused product (kernels/lora.py) vs its twin, LoRALinear's ``_LoRAProduct``, forward and backward,
run by the Triton interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1; see tests/test_kernels.py).

Dimension letters: M rows, K in features, N out features, r rank; X the compute dtype, s the scaling.

Tolerances, derived (Higham, "Accuracy and Stability of Numerical Algorithms", 2002, ch. 2-3). u32 =
2^-24 is fp32's unit roundoff, u_X X's (2^-8 for bf16; for X = fp32 the rounding to X is no rounding at
all), eta_X half X's smallest subnormal (what one rounding below the normal range can lose), and

    gamma_n = n u32 / (1 - n u32),       prod of n factors (1 + d_i), |d_i| <= u32, within 1 + gamma_n

Every quantity below is elementwise, in float64, from the actual tensors (the inputs as rounded to X,
which both sides do first and identically): v the exact value, e a bound on |computed - v|.

* A sum of n products in fp32, in any order, carries each term through at most n roundings (its product
  and n - 1 additions): |fl(a.b) - a.b| <= gamma_n sum_i |a_i b_i| + n eta32. The kernel's tl.dot per tile
  followed by + acc takes each term through at most n + 1 (a later tile holds at least one term), dA's
  and dB's split sums through split - 1 more; the twin's BLAS may fold s into a packed operand (two more
  roundings a term, for t = xa B^T). So gamma_{n+1}, gamma_{n+split} and gamma_{r+3} bound both sides.
* Operands that carry errors e_a, e_b: a~ b~ - a b = (a~ - a) b + a (b~ - b) + (a~ - a)(b~ - b), and the
  sum's own error is taken on |a~_i| |b~_i| <= (|a_i| + e_a)(|b_i| + e_b): the products of the absolute
  values of the actual tensors, |x| |A^T| for xa, and so on.
* One rounding of v~: |fl(v~) - v| <= e + u (|v| + e) + eta; s is rounded to fp32 and s v~ once more:
  |s| e + ((1 + u32)^2 - 1) |s| (|v| + e) + eta32.

``bound`` takes each value through the chain both sides compute (g = dy rounded to X, t = xa B^T):

    xa  = round_X(x A^T)        y = round_X(round32(round_X(s t) + base_out))
    dxa = round_X(round_X(g B) s)    dx = round_X(dxa A)    dA = round_X(dxa^T x)    dB = round_X(round_X(g^T xa) s)

(round_X(s t) is the twin's bf16 addmm, which may round the product before the sum; the kernel does not,
and an extra rounding only widens the bound). Both sides are within e of the exact value, so within 2 e
of each other: the bound asserted. In fp32 that is about 2 gamma_{n+1} times the sums of |terms| at each
level (1e-4 to 6e-4 of |v|, median, at M = 37, K = 72, N = 100); in bf16 about 2 u_X (|v| + the rounded operands' errors carried through
the next sum): 2-6% of |y| and |dx| (median), 5-10% of |dA| and |dB|, whose sums over M add up the
rounding errors of xa and dxa. The sides agree bit for bit on most elements, and by an ulp of X where
their fp32 sums fall on either side of a rounding boundary. d base_out is dy on both sides: exact.
"""

from typing import NamedTuple

import pytest
import torch
from kernel_checks import BF16, ETA, F32, U32, U, assert_interpreted, compiled_on_cuda, within
from minicustom.kernels import lora

from minicustom.methods import lora_layers


def test_the_kernels_are_interpreted():
    assert_interpreted(lora._lora_fwd, lora._lora_bwd_rows, lora._thin_tn)


_compiled_on_cuda = compiled_on_cuda((lora, "lora_linear"))  # compiled, on a GPU


def twin(x, A, B, s, base_out):
    """The oracle: LoRALinear's product, called as LoRALinear.forward calls it."""
    return lora_layers._LoRAProduct.apply(base_out, x, A, B, s)


# ---------------------------------------------------------------- the error analysis of the module docstring


def gamma(n):
    return n * U32 / (1 - n * U32)


class V(NamedTuple):
    """A computed value v~ of the exact v (float64, from the inputs as rounded to X): |v~ - v| <= e."""

    v: torch.Tensor
    e: torch.Tensor

    @property
    def T(self):
        return V(self.v.T, self.e.T)


def exact(t):
    """An input as both sides use it: rounded to X first (by the caller), then exact."""
    return V(t.double(), torch.zeros(t.shape, dtype=torch.float64))


def dot(a, b, extra=1):
    """fl32(a~ @ b~), each term through at most n + extra roundings (n the length of the sums): the operands'
    errors carried, plus gamma_{n+extra} on the sum of |terms| |a~_i| |b~_i| <= (|a_i| + e)(|b_i| + e)."""
    n = a.v.shape[-1]
    A, B = a.v.abs(), b.v.abs()
    e = a.e @ B + A @ b.e + a.e @ b.e + gamma(n + extra) * ((A + a.e) @ (B + b.e)) + n * ETA[F32]
    return V(a.v @ b.v, e)


def rnd(x, u, eta):
    """One rounding of x~: |fl(x~) - x~| <= u |x~| + eta, |x~| <= |x| + e."""
    return V(x.v, x.e + u * (x.v.abs() + x.e) + eta)


def to_x(x, X):
    """round_X: nothing in fp32."""
    return x if X == F32 else rnd(x, U[X], ETA[X])


def scaled(x, s):
    """fp32(s) * x~, rounded to fp32: two roundings of u32 on |s x~|."""
    return V(s * x.v, abs(s) * x.e + ((1 + U32) ** 2 - 1) * abs(s) * (x.v.abs() + x.e) + ETA[F32])


def bound(x, A, B, s, base_out, dy, X, split):
    """2 e for y, dx, dA, dB (shapes of base_out, x, A, B), from the inputs as rounded to X."""
    K, N = x.shape[-1], B.shape[0]
    xv, Av, Bv = (exact(t.detach().to(X)) for t in (x.reshape(-1, K), A, B))
    yv, gv = exact(base_out.detach().reshape(-1, N).to(X)), exact(dy.reshape(-1, N).to(X))
    xa = to_x(dot(xv, Av.T), X)  # (M, r)
    st = to_x(scaled(dot(xa, Bv.T, extra=3), s), X)  # (M, N)
    y = to_x(rnd(V(yv.v + st.v, st.e), U32, ETA[F32]), X)
    dxa = to_x(scaled(to_x(dot(gv, Bv), X), s), X)  # (M, r)
    dx = to_x(dot(dxa, Av), X)  # (M, K)
    dA = to_x(dot(dxa.T, xv, extra=split), X)  # (r, K)
    dB = to_x(scaled(to_x(dot(gv.T, xa, extra=split), X), s), X)  # (N, r)
    return 2 * y.e.reshape(base_out.shape), 2 * dx.e.reshape(x.shape), 2 * dA.e, 2 * dB.e


def check(x, A, B, s, base_out, g, split=1, **launch):
    """Kernel vs twin: y and the gradient of every input that requires one, within the derived bound."""
    y = lora.lora_linear(x, A, B, s, base_out, split_m=split, **launch)
    ref = twin(x, A, B, s, base_out)
    dy = torch.randn(y.shape, generator=g).to(y.dtype)
    named = [(n, t) for n, t in (("dx", x), ("dA", A), ("dB", B), ("d base_out", base_out)) if t.requires_grad]
    grads = torch.autograd.grad(y, [t for _, t in named], dy)
    grads_ref = torch.autograd.grad(ref, [t for _, t in named], dy)
    bound_y, *bounds = bound(x, A, B, s, base_out, dy, y.dtype, split)
    # d base_out is dy.to(base_out.dtype) on both sides: exact
    bounds = dict(zip(("dx", "dA", "dB", "d base_out"), [*bounds, torch.zeros(base_out.shape, dtype=torch.float64)]))
    what = f"{y.dtype} x {tuple(x.shape)} r {A.shape[0]} N {B.shape[0]}"
    within(y, ref, bound_y, f"y {what}")
    for (name, _), d, d_ref in zip(named, grads, grads_ref):
        within(d, d_ref, bounds[name], f"{name} {what}")
    return y, grads


def inputs(M, K, N, r, dtype, g, B_scale=1.0):
    """x, A, B, base_out, all requiring grad; B nonzero (LoRA's B starts at 0, which makes the product 0)."""
    x = torch.randn(M, K, generator=g).to(dtype)
    A = (torch.randn(r, K, generator=g) / K**0.5).to(dtype)
    B = (B_scale * torch.randn(N, r, generator=g)).to(dtype)
    base_out = torch.randn(M, N, generator=g).to(dtype)
    return tuple(t.requires_grad_() for t in (x, A, B, base_out))


# ---------------------------------------------------------------- kernel vs twin


@pytest.mark.parametrize("r", [1, 8, 13])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_matches_twin_on_awkward_shapes(r, dtype):
    """M = 37 rows in tiles of 16 (the last one 5 rows), K = 72 in steps of 64 (the second 8 wide), N = 100
    in tiles of 64 (the second 36 wide), r padded to 16; dA's and dB's row sums split in 3 ranges."""
    g = torch.Generator().manual_seed(100 * r + (dtype == BF16))
    x, A, B, base_out = inputs(37, 72, 100, r, dtype, g)
    check(x, A, B, 16 / r, base_out, g, split=3, block_m=16)  # s = alpha / r, alpha = 16


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_strided_views_and_frozen_inputs(dtype):
    """x a (B, T, K) column slice, A stored transposed, B every other column of a wider matrix (as
    LoRAExperts' B[:, e::E]), base_out a column slice; then x and A frozen, then B and base_out."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 9, 80, generator=g).to(dtype)[..., 3:75].requires_grad_()  # (2, 9, K = 72)
    A = torch.randn(72, 5, generator=g).to(dtype).T.requires_grad_()  # (r = 5, K), strides (1, 5)
    B = torch.randn(40, 10, generator=g).to(dtype)[:, ::2].requires_grad_()  # (N = 40, r), strides (10, 2)
    base_out = torch.randn(2, 9, 50, generator=g).to(dtype)[..., :40].requires_grad_()  # (2, 9, N)
    check(x, A, B, 2.0, base_out, g)
    check(x.detach(), A.detach(), B, 2.0, base_out, g)
    check(x, A, B.detach(), 2.0, base_out.detach(), g)  # B frozen: the forward saves no xa


def test_matches_twin_under_autocast():
    """fp32 master A and B, an fp32 x (the residual stream) and base_out, under bf16 autocast: both sides
    round every operand to bf16, y comes out bf16, and dA, dB, dx, d base_out in their inputs' fp32."""
    g = torch.Generator().manual_seed(11)
    x, A, B, base_out = inputs(21, 40, 33, 8, F32, g)
    with torch.autocast("cpu", dtype=BF16):
        y, grads = check(x, A, B, 0.5, base_out, g, block_m=16)
    assert y.dtype == BF16 and [d.dtype for d in grads] == [F32] * 4


# ---------------------------------------------------------------- identities and errors


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_zero_B_or_zero_scale_leaves_base_out(dtype):
    """B = 0 (LoRA's init) or s = 0: every product is an exact 0, so y == base_out bit for bit, and dx and
    dA are exact zeros (dxa = s g B = 0); with s = 0, dB too. d base_out is dy."""
    g = torch.Generator().manual_seed(3)
    for s, zero_B in ((2.0, True), (0.0, False)):
        x, A, B, base_out = inputs(37, 72, 100, 13, dtype, g, B_scale=0.0 if zero_B else 1.0)
        y = lora.lora_linear(x, A, B, s, base_out, block_m=16)
        assert torch.equal(y, base_out) and y.dtype == dtype
        dy = torch.randn(y.shape, generator=g).to(dtype)
        dx, dA, dB, db = torch.autograd.grad(y, (x, A, B, base_out), dy)
        assert torch.equal(db, dy) and not dx.any() and not dA.any()
        assert dB.any() == zero_B


def test_no_rows():
    """x (0, K), as an empty batch: y (0, N), zero gradients for A and B, no launch with an empty grid."""
    x, A, B, base_out = inputs(0, 72, 100, 8, F32, torch.Generator().manual_seed(0))
    y = lora.lora_linear(x, A, B, 2.0, base_out)
    assert y.shape == (0, 100)
    dx, dA, dB = torch.autograd.grad(y, (x, A, B), torch.zeros(0, 100))
    assert dx.shape == (0, 72) and not dA.any() and not dB.any()


def test_bad_inputs_say_what_was_expected():
    x, A, B, base_out = torch.randn(4, 72), torch.randn(8, 72), torch.randn(100, 8), torch.randn(4, 100)
    with pytest.raises(ValueError, match=r"B is \(100, 7\) with rank 7, A \(8, 72\) with rank 8; "
                                         r"expected B \(100, 8\)"):
        lora.lora_linear(x, A, torch.randn(100, 7), 2.0, base_out)
    with pytest.raises(ValueError, match=r"x has 70 features .* expects K = 72"):
        lora.lora_linear(torch.randn(4, 70), A, B, 2.0, base_out)
    with pytest.raises(ValueError, match=r"base_out is \(4, 99\); expected \(4, 100\)"):
        lora.lora_linear(x, A, B, 2.0, torch.randn(4, 99))
    with pytest.raises(ValueError, match="A is torch.float64 on (cpu|cuda:0); expected float32/bfloat16/float16"):
        lora.lora_linear(x, A.double(), B, 2.0, base_out)
    with pytest.raises(ValueError, match="rank 129 is above MAX_R"):
        lora.lora_linear(x, torch.randn(129, 72), torch.randn(100, 129), 2.0, base_out)
    with pytest.raises(ValueError, match="block_n is 24; expected a power of two >= 16"):
        lora.lora_linear(x, A, B, 2.0, base_out, block_n=24)
