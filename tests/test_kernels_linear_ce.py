"""The fused linear + cross-entropy kernel (kernels/linear_ce.py) vs its twin, the chunked loss of losses.py
behind ``fused.linear_cross_entropy_reference``, and vs the plain definition F.cross_entropy(h W^T, y):
loss, dh and dW, run by the Triton interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1; see
tests/test_kernels.py).

Tolerances, derived (``bounds``, from the actual tensors). u = 2^-24 is fp32's unit roundoff, u_X that of
the compute dtype X, eta_X half X's smallest subnormal, and gamma_k = k u / (1 - k u) bounds the error of
any k-term fp32 sum, in any order (Higham, Thm 3.1: |fl(sum a_k) - sum a_k| <= gamma_k sum |a_k|; the
products of X values are exact in fp32, or rounded once for fp32 X, which gamma_k also covers). exp is
taken within c_e = 4 u (2 ulp, a GPU's ex2.approx) relative plus 1.5 u |argument| (the product by log2 e),
log within c_l = 4 u. Each side is bounded against an exact value computed in float64 from the X-rounded
inputs H, W, and kernel vs twin allowed twice the bound. Every rounding to X goes through ``settle``: a
value known within err of c, rounded to X, is exactly round_X(c) where no rounding boundary of X lies
within err of c (rounding is monotonic: the two ends round alike), else within err + u_X |c| of c. So in
bf16 the kernel must equal the twin wherever the two could not round apart (half the gradients or more,
here), and a rounding left out or added shows (the mutations tried: each fails a test).

* logits: z = round_X(H W^T) within E = gamma_{C+1} S of zeta = H W^T, S = |H| |W|^T, then settled.
* logsumexp, by the logits alone: |lse(z) - lse(zeta)| <= sum_v p_v E_v + max_v E_v^2 / 2 (Taylor; the
  Hessian diag(p) - p p^T has |d^T H d| <= max |d|^2). Its evaluation: s = sum_v exp(z_v - m) within
  gamma_{V+1} (the sum) + (nb + 1)(c_e + 2) u (each term's exp and subtraction; the kernel's nb = V /
  BLOCK_V rescales s exp(m - m')) + 10 u A (the exp's arguments, <= 2A, A = max |z|); then log (c_l u |log
  s| <= c_l u log V) and the roundings of m + log s, of lse - z[y] and of z[y] - m: u (|lse| + |L| + 2A).
  loss_i within B_i = that + E_iy; the sum over n rows within sum B_i + gamma_n sum(|L_i| + B_i); the mean
  one u more.
* dz = round_X(p - onehot): z - lse within delta = E + (the lse bound) + u (3 |t| + 2A + 2), t = log p,
  so p within p (expm1(delta) + c_e u), and p - onehot one u |dz| more; settled.
* dh = round_X(round_X(dz W) s), s = g (or g / n in fp32, as autograd rounds it): the fp32 sum over V
  within Dz |W| + gamma_{V+1} (|dz| + Dz) |W|, settled; times s, within |s| (that) + 2u |dh s|, settled;
  cast to h's dtype (settled again where that does not hold X).
* dW = round_W(s sum_i dz_i^T h_i): |s| (Dz^T |H| + gamma_{N+1} (|dz| + Dz)^T |H|) + 2u |s dW|, settled
  in W's dtype.

The bound is first order; second-order terms (products of two u's, < 1e-6 of it) are covered by the
constants rounded up (2.5 -> 3, 2 ulp for a 1 ulp exp, C + 1 terms for C, whose spare term also covers
float64's own error). The plain F.cross_entropy(h.float() @ W.float().T) rounds nothing to X and scales
by g / n before its matmul rather than after (one u each way, counted in the 2u): it is held to the same
bound without settling (every rounding to X counted at u_X |c|), where the worst case of a bf16 logit's
rounding dominates.
"""

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import (
    BF16,
    COMPILED,
    ETA,
    F16,
    F32,
    U32,
    U,
    assert_interpreted,
    compiled_on_cuda,
    on_cuda,
    within,
)
from minicustom.kernels import linear_ce

from minicustom import fused

C_EXP = C_LOG = 4  # units of u: 2 ulp
IGNORE = -100


def test_the_kernels_are_interpreted():
    assert_interpreted(linear_ce._lse_fwd, linear_ce._dh_bwd, linear_ce._dw_bwd)


_compiled_on_cuda = compiled_on_cuda((linear_ce, "linear_cross_entropy"))  # compiled, on a GPU


def gamma(k: int) -> float:
    return k * U32 / (1 - k * U32)


def settle(center, err, dtype, tight=True):
    """A value known to lie within err of center (float64 tensors), then rounded to dtype: (center, err)
    of the result. Where every fp32 number in [center - err, center + err] rounds to one dtype number
    (rounding is monotonic, so checking the two ends suffices), it is exactly that number (err 0); else
    (tight=False: always) within err (1 + u) + u |center| + eta. fp32: nothing more is rounded."""
    if dtype == F32:
        return center, err
    lo, hi = ((center + sign * err).float().to(dtype) for sign in (-1, 1))  # float64 -> fp32 -> dtype: monotonic
    sure = (lo == hi) & tight
    return (torch.where(sure, lo.double(), center),
            torch.where(sure, 0.0, err * (1 + U[dtype]) + U[dtype] * center.abs() + ETA[dtype]))


def bounds(h, W, y, X, reduction, g, block_v, tight=True):
    """[(center, err)] for the loss, dh and dW: each side lies within err of center, as derived in the module
    docstring; tight=False where a side (F.cross_entropy) rounds nothing to X."""
    C, V = h.shape[-1], W.shape[0]
    H, Wd = h.detach().to(X).double().reshape(-1, C), W.detach().to(X).double()  # (N, C), (V, C)
    y, N = y.reshape(-1), H.shape[0]
    keep = (y != IGNORE)[:, None]  # (N, 1)
    target = torch.nn.functional.one_hot(torch.where(keep[:, 0], y, 0), V).double()  # (N, V)
    # logits: fp32 sums within gamma S, rounded to X (C + 1: the spare term covers float64's own error)
    z, E = settle(H @ Wd.T, gamma(C + 1) * (H.abs() @ Wd.abs().T), X, tight)  # (N, V)
    lse, p = torch.logsumexp(z, 1), torch.softmax(z, 1)  # (N,), (N, V)
    L = lse - (z * target).sum(1)  # (N,) loss of each row
    A = z.abs().amax(1) + E.amax(1)  # max |logit|
    rel_s = gamma(V + 1) + (-(-V // block_v) + 1) * (C_EXP + 2) * U32 + 10 * U32 * A
    lam = ((p * E).sum(1) + E.amax(1) ** 2 / 2 + rel_s + C_LOG * U32 * math.log(V)
           + U32 * (lse.abs() + L.abs() + 2 * A))  # (N,) lse error
    B = torch.where(keep[:, 0], lam + (E * target).sum(1), 0.0)  # (N,) loss_i error
    L = torch.where(keep[:, 0], L, 0.0)
    n = int(keep.sum())
    loss = (L.sum(), B.sum() + gamma(N) * (L.abs() + B).sum())
    if reduction == "mean":
        loss = (loss[0] / n, loss[1] / n + U32 * abs(L.sum() / n))
    # the scale, as torch rounds it: g, or g / n in fp32
    s = float(torch.tensor(g, dtype=F32) / n) if reduction == "mean" else g
    # dz = round_X(p - onehot): p within P, the subtraction one u
    delta = E + lam[:, None] + U32 * (3 * (z - lse[:, None]).abs() + 2 * A[:, None] + 2)
    dz = torch.where(keep, p - target, 0.0)  # (N, V)
    dz, Dz = settle(dz, p * (torch.expm1(delta) + C_EXP * U32) + U32 * dz.abs(), X, tight)
    dz, Dz = torch.where(keep, dz, 0.0), torch.where(keep, Dz, 0.0)
    # dh = round_X(round_X(dz W) s), then h's dtype
    dh = settle(dz @ Wd, Dz @ Wd.abs() + gamma(V + 1) * (dz.abs() + Dz) @ Wd.abs(), X, tight)
    dh = settle(dh[0] * s, abs(s) * dh[1] + 2 * U32 * (dh[0] * s).abs(), X, tight)
    if h.dtype not in (F32, X):
        dh = settle(*dh, h.dtype, tight)
    # dW = round_W(s sum_i dz_i^T h_i)
    dW = dz.T @ H, Dz.T @ H.abs() + gamma(N + 1) * (dz.abs() + Dz).T @ H.abs()  # (V, C)
    dW = settle(dW[0] * s, abs(s) * dW[1] + 2 * U32 * (dW[0] * s).abs(), W.dtype, tight)
    return [loss, (dh[0].reshape(h.shape), dh[1].reshape(h.shape)), dW]


def run(fn, h, W, y, reduction, g, autocast, **blocks):
    """fn's loss and its grads in h and W for the incoming gradient g, under autocast(bf16) if asked."""
    h, W = h.detach().requires_grad_(), W.detach().requires_grad_()
    with torch.autocast("cpu", dtype=BF16) if autocast else contextlib.nullcontext():
        loss = fn(h, W, y, reduction=reduction, **blocks)
    return (loss, *torch.autograd.grad(loss, (h, W), torch.tensor(g)))


def plain(h, W, y, reduction):
    """The definition: F.cross_entropy of the fp32 logits."""
    return F.cross_entropy((h.float() @ W.float().T).reshape(-1, W.shape[0]), y.reshape(-1), ignore_index=IGNORE,
                           reduction=reduction)


def check(h, W, y, reduction, g=0.75, autocast=False, with_plain=False, **blocks):
    """Kernel and twin (and F.cross_entropy of fp32 logits if with_plain): loss, dh, dW each within its
    bound of the exact value, so kernel and twin within twice it; the loss fp32 and 0-dim, the grads in
    the inputs' dtypes."""
    X = BF16 if autocast else h.dtype
    block_v = blocks.get("block_v") or linear_ce.BLOCK_V
    what = f"{h.dtype} {W.dtype} X={X} h {tuple(h.shape)} V={W.shape[0]} {reduction}"
    out = run(linear_ce.linear_cross_entropy, h, W, y, reduction, g, autocast, **blocks)
    assert out[0].dtype == F32 and out[0].shape == () and out[1].dtype == h.dtype and out[2].dtype == W.dtype
    twin = run(fused.linear_cross_entropy_reference, h, W, y, reduction, g, autocast)
    exact = bounds(h, W, y, X, reduction, g, block_v)
    for name, a, b, (center, err) in zip(("loss", "dh", "dW"), out, twin, exact):
        within(a.double(), center, err, f"{name} kernel vs exact, {what}")
        within(b.double(), center, err, f"{name} twin vs exact, {what}")
        within(a, b, 2 * err, f"{name} kernel vs twin, {what}")
    if COMPILED:  # the twin on CUDA (the default path there) within the same bounds
        for name, b, (center, err) in zip(("loss", "dh", "dW"), run(on_cuda(fused.linear_cross_entropy_reference),
                                                                     h, W, y, reduction, g, autocast), exact):
            within(b.double(), center, err, f"{name} twin on cuda vs exact, {what}")
    if with_plain:
        ref = run(plain, h, W, y, reduction, g, False)
        for name, a, b, (_center, err) in zip(("loss", "dh", "dW"), out, ref,
                                              bounds(h, W, y, X, reduction, g, block_v, tight=False)):
            within(a, b, 2 * err, f"{name} kernel vs plain, {what}")


def inputs(N, C, V, dtype, w_dtype=None, seed=0, shape=None):
    """h with rows of very different scales (logits from about 0.3 to 30: the online max moves, exp
    underflows), W ~ 0.3 randn, labels with a few ignored rows."""
    g = torch.Generator().manual_seed(seed + N + C + V)
    h = torch.randn(N, C, generator=g) * torch.exp(torch.randn(N, 1, generator=g))
    W = 0.3 * torch.randn(V, C, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    y[1::5] = IGNORE
    y[-1] = V - 1  # the last column, in the last (partial) block
    if shape is not None:
        h, y = h.reshape(*shape, C), y.reshape(shape)
    return h.to(dtype), W.to(w_dtype or dtype), y


CASES = [  # (N, C, V, blocks, reduction): rows, hidden, vocabulary not multiples of their blocks
    (40, 72, 1000, dict(block_n=16, block_v=128, block_c=32), "mean"),  # 3 x 8 x 3 blocks, all partial
    (1, 72, 4099, dict(block_v=256), "sum"),  # one row; 17 vocabulary blocks, the last 3 wide
    (33, 24, 131, {}, "mean"),  # the default blocks: 64 rows, 128 + 3 columns, 32 hidden
]


@pytest.mark.parametrize("N, C, V, blocks, reduction", CASES)
@pytest.mark.parametrize("dtype, w_dtype", [(F32, F32), (BF16, BF16), (BF16, F32)])
def test_matches_twin(N, C, V, blocks, reduction, dtype, w_dtype):
    """fp32, bf16, and bf16 h with an fp32 W (X = bf16: W cast, its grad fp32)."""
    h, W, y = inputs(N, C, V, dtype, w_dtype)
    check(h, W, y, reduction, **blocks)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_matches_the_plain_definition(dtype):
    """F.cross_entropy(h.float() @ W.float().T, y, ignore_index=-100), "mean" and "sum"; leading dims (B, T)."""
    h, W, y = inputs(24, 40, 300, dtype, shape=(2, 12))
    check(h, W, y.clone(), "mean", g=1.0, with_plain=True, block_n=16, block_v=64, block_c=16)
    check(h, W, y, "sum", g=-0.5, with_plain=True, block_n=16, block_v=64, block_c=16)


def test_autocast_fp16_and_strided_rows():
    """fp32 h and W under autocast(bf16): logits in bf16, grads fp32. fp16 throughout. h a column slice of a
    wider tensor (row stride 80) and a row block (16 rows) whose labels are all ignore_index."""
    h, W, y = inputs(40, 72, 500, F32, seed=1)
    y[16:32] = IGNORE
    check(h, W, y, "mean", autocast=True, block_n=16, block_v=128)
    check(h.to(F16), W.to(F16), y, "sum", block_n=16, block_v=128)
    wide = torch.randn(40, 80, generator=torch.Generator().manual_seed(2))
    wide[:, 4:76] = h
    check(wide[:, 4:76], W, y, "mean", block_n=16, block_v=128)


def test_all_rows_ignored():
    """No row kept: the mean is nan (0 / 0) and the sum 0, both with zero grads, as F.cross_entropy's."""
    h, W, y = inputs(5, 24, 70, F32)
    y[:] = IGNORE
    for reduction in ("mean", "sum"):
        for fn in (linear_ce.linear_cross_entropy, fused.linear_cross_entropy_reference, plain):
            loss, dh, dW = run(fn, h, W, y, reduction, 1.0, False)
            assert (loss.isnan() if reduction == "mean" else loss == 0), (fn, reduction, loss)
            assert not dh.any() and not dW.any(), (fn, reduction)


def test_bad_inputs():
    h, W, y = inputs(4, 24, 70, F32)
    for fn in (linear_ce.linear_cross_entropy, fused.linear_cross_entropy_reference):
        with pytest.raises(ValueError, match=r"weight is \(70, 23\) .* expected \(V, 24\)"):
            fn(h, W[:, :23], y)
        with pytest.raises(ValueError, match=r"labels are \(3,\); expected \(4,\)"):
            fn(h, W, y[:3])
        with pytest.raises(ValueError, match="labels are torch.int32; expected torch.int64"):
            fn(h, W, y.int())
        with pytest.raises(ValueError, match="labels are torch.float32; expected torch.int64"):
            fn(h, W, y.float())
        with pytest.raises(ValueError, match=r"ids outside \[0, 70\) .* e.g. 70"):
            fn(h, W, torch.tensor([0, 70, IGNORE, 3]))
        with pytest.raises(ValueError, match="float32/bfloat16/float16"):
            fn(h.double(), W, y)
        with pytest.raises(ValueError, match="reduction is 'none'"):
            fn(h, W, y, reduction="none")
    with pytest.raises(ValueError, match="block_v is 48; expected a power of two >= 16"):
        linear_ce.linear_cross_entropy(h, W, y, block_v=48)
