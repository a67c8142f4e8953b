"""The training kernels (RMSNorm, RoPE, SwiGLU) vs their PyTorch twins in minicustom/fused.py, forward and
backward, run by the Triton interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1; see
tests/test_kernels.py), and the twins vs model.py itself.

Tolerances. u is a dtype's unit roundoff (eps / 2: u32 = 2^-24, 2^-11 fp16, 2^-8 bf16) and eta half its
smallest subnormal (the absolute error of a rounding below the normal range). Each bound is first order:
terms of order (N u32)^2 < 1e-8 are covered by rounding the constants up.

* RoPE: exact (rtol = atol = 0), every dtype, forward and backward: the kernel performs the fp32 products
  and sums that torch performs for each op, in the same order, rounded to the same dtypes (RNE), with no
  FMA contraction; there is no reduction and no transcendental function.
* RMSNorm: not exact: both sides sum x^2 (and, backward, g * xhat) over the row, in different orders. See
  ``check_rms_norm`` for the derivation: 2 (N/2 + 5) u32 + 2 (u_X + u_O) relative to |w xhat| forward.
* SwiGLU: not exact: exp (kernel) vs exp or tanh (torch's vectorized libm) differ in the last fp32 bits.
  See ``check_swiglu``: a few u32 times (1 + |argument of exp|), then one ulp of the output dtype.
"""

from types import SimpleNamespace

import pytest
import torch
from kernel_checks import BF16, ETA, F16, F32, U32, U, assert_interpreted, compiled_on_cuda, within
from minicustom.kernels import rmsnorm, rope, swiglu

from minicustom import fused, model
from minicustom.rope import RoPE


def test_the_kernels_are_interpreted():
    assert_interpreted(rmsnorm._rms_norm_fwd, rmsnorm._rms_norm_bwd, rope._rope_kernel, swiglu._swiglu_fwd, swiglu._swiglu_bwd)


_compiled_on_cuda = compiled_on_cuda((rmsnorm, "rms_norm"), (rope, "rope"), (swiglu, "swiglu"))  # compiled, on a GPU


def strided_like(shape, dtype, g, pad=3):
    """randn of `shape` as a view whose rows are `pad` elements longer (row stride != last dim)."""
    return torch.randn(*shape[:-1], shape[-1] + pad, generator=g).to(dtype)[..., : shape[-1]]


def grads(out, inputs, dy):
    return torch.autograd.grad(out, inputs, dy)


# ---------------------------------------------------------------- the twins are model.py's computation


@pytest.mark.parametrize("x_dtype, w_dtype", [(F32, F32), (BF16, BF16), (BF16, F32), (F16, F16)])
@pytest.mark.parametrize("plus_one", [False, True])
def test_twins_equal_the_model(x_dtype, w_dtype, plus_one):
    """rms_norm_reference is model.RMSNorm and swiglu_reference model.MLP's act(gate) * up, bit for bit,
    forward and backward (rope_reference calls rope.apply_rope itself)."""
    g = torch.Generator().manual_seed(1)
    norm = model.RMSNorm(70, 1e-6, plus_one).to(w_dtype)
    with torch.no_grad():
        norm.weight.add_((0.3 * torch.randn(70, generator=g)).to(w_dtype))
    x = torch.randn(3, 5, 70, generator=g).to(x_dtype).requires_grad_()
    w = norm.weight.detach().clone().requires_grad_()
    ours, theirs = fused.rms_norm_reference(x, w, 1e-6, plus_one), norm(x)
    dy = torch.randn(ours.shape, generator=g).to(ours.dtype)
    assert torch.equal(ours, theirs) and ours.dtype == theirs.dtype
    for a, b in zip(grads(ours, (x, w), dy), grads(theirs, (x, norm.weight), dy)):
        assert torch.equal(a, b)
    act = "gelu_pytorch_tanh" if plus_one else "silu"  # Gemma's pair
    gate, up = (torch.randn(4, 33, generator=g).to(x_dtype).requires_grad_() for _ in range(2))
    ours = fused.swiglu_reference(gate, up, act)
    theirs = model.activation(SimpleNamespace(hidden_act=act))(gate) * up
    assert torch.equal(ours, theirs)
    dy = torch.randn(ours.shape, generator=g).to(x_dtype)
    for a, b in zip(grads(ours, (gate, up), dy), grads(theirs, (gate, up), dy)):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- RMSNorm


def check_rms_norm(x, w, plus_one, g, eps=1e-6, **launch):
    """Kernel vs twin, y, dx and dw. Per row of N (X, W, O: the dtypes of x, w and y; u_X = u32 for fp32):

    r = (sum(x^2)/N + eps)^-1/2 on each side: N - 1 additions of positive terms (relative error <= (N - 1)
    u32), the square, the division by N, + eps, sqrt (halves the relative error) and 1 / (one each), so
    r and then xhat = x r (one more) are each within e = (N/2 + 4) u32 of exact, relatively.
    y  = round_O(w round_X(xhat)) (plus_one: round_X(xhat (1 + w))): each side within (e + u32 + u_X + u_O)
         |w' xhat| + eta_X |w'| + eta_O of exact, w' = w or 1 + w; the bound is twice that.
    dx = r (g - xhat c), c = mean(g xhat), g = round_X(round_O(dy w)) (dy (1 + w) with plus_one) is the
         same on both sides. c: N-term sum of products each within e + u32, <= (1.5 N + 6) u32 mean|g xhat|;
         xhat c: + e + u32; the subtraction and the product with r: + e + 2 u32. Each side within
         (2.5 N + 17) u32 M + u_X |dx| + eta_X, M = r (|g| + |xhat| mean|g xhat|): bound 2 (2.5 N + 20) u32 M
         + 2 u_X M + 2 eta_X.
    dw = sum over the R rows of dy round_X(xhat): the rounded xhat may differ by 2 (e + u_X) between the
         sides; the twin rounds each product to O and its sum to O then W, the kernel its fp32 sum to W; both
         sums (R terms, R - 1 additions) within R u32: bound (2 e + 2 (R + 1) u32 + 2 (u_X + u_O + u_W))
         sum|dy xhat| + 4 eta_W.
    """
    x, w = x.requires_grad_(), w.requires_grad_()
    y = rmsnorm.rms_norm(x, w, eps, plus_one, **launch)
    ref = fused.rms_norm_reference(x, w, eps, plus_one)
    dy = strided_like(y.shape, y.dtype, g)
    (dx, dw), (dx_ref, dw_ref) = grads(y, (x, w), dy), grads(ref, (x, w), dy)
    N = x.shape[-1]
    R = x.numel() // N
    uX, uO, uW, eX, eO, eW = U[x.dtype], U[y.dtype], U[w.dtype], ETA[x.dtype], ETA[y.dtype], ETA[w.dtype]
    X, D = x.detach().double().reshape(R, N), dy.double().reshape(R, N)  # (R, N)
    wp = 1 + w.detach().double() if plus_one else w.detach().double()  # (N,)
    r = (X.pow(2).mean(-1, keepdim=True) + eps).rsqrt()  # (R, 1)
    xhat = X * r
    e = (N / 2 + 4) * U32
    bound_y = 2 * (e + U32 + uX + uO) * (wp * xhat).abs() + 2 * (eX * wp.abs() + eO)
    within(y, ref, bound_y.reshape(y.shape), f"y {x.dtype} {w.dtype} {tuple(x.shape)}")
    gr = D * wp if plus_one else (dy * w.detach()).to(x.dtype).double().reshape(R, N)
    M = r * (gr.abs() + xhat.abs() * (gr * xhat).abs().mean(-1, keepdim=True))
    bound_dx = 2 * (2.5 * N + 20) * U32 * M + 2 * uX * M + 2 * eX
    within(dx, dx_ref, bound_dx.reshape(x.shape), f"dx {x.dtype} {w.dtype} {tuple(x.shape)}")
    bound_dw = (2 * e + 2 * (R + 1) * U32 + 2 * (uX + uO + uW)) * (D * xhat).abs().sum(0) + 4 * eW
    within(dw, dw_ref, bound_dw, f"dw {x.dtype} {w.dtype} {tuple(x.shape)}")


def rms_input(shape, dtype, g):
    """Rows of very different scales, one row all zeros (r = eps^-1/2, xhat = 0)."""
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(*shape[:-1], 1, generator=g))
    x.view(-1, shape[-1])[min(2, x.numel() // shape[-1] - 1)] = 0
    return x.to(dtype)


DTYPE_PAIRS = [(F32, F32), (BF16, BF16), (F16, F16), (BF16, F32), (F32, BF16)]  # (x, w): mixed as under autocast


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # the twin's F.rms_norm, fp32 x
@pytest.mark.parametrize("shape, block_m", [((37, 70), 4), ((1, 576), None), ((2, 9, 64), 8), ((5, 1), 2)])
@pytest.mark.parametrize("x_dtype, w_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("plus_one", [False, True])
def test_rms_norm_matches_twin(shape, block_m, x_dtype, w_dtype, plus_one):
    """37 rows in tiles of 4 (the backward's 4 programs walk 3, 3, 3 and 1 tiles, the last one partial),
    one row of 576 (SmolLM2's C; BLOCK_N 1024), per-head rows of 64 (q/k norm), rows of one element."""
    g = torch.Generator().manual_seed(shape[-1] + 7 * plus_one)
    w = (0.3 * torch.randn(shape[-1], generator=g) + (0 if plus_one else 1)).to(w_dtype)
    check_rms_norm(rms_input(shape, x_dtype, g), w, plus_one, g, block_m=block_m)


def test_rms_norm_strided_input_and_errors():
    """x a column slice (row stride 100), 3-D; the errors a caller gets."""
    g = torch.Generator().manual_seed(3)
    for dtype in (F32, BF16):
        x = rms_input((3, 5, 100), dtype, g)[..., 10:80]
        check_rms_norm(x, (1 + 0.3 * torch.randn(70, generator=g)).to(dtype), False, g, block_m=4)
    with pytest.raises(ValueError, match=r"expected \(70,\)"):
        rmsnorm.rms_norm(torch.randn(2, 70), torch.ones(71), 1e-6)
    with pytest.raises(ValueError, match="float32/bfloat16/float16"):
        rmsnorm.rms_norm(torch.randn(2, 70).double(), torch.ones(70), 1e-6)


# ---------------------------------------------------------------- RoPE


def check_rope(x, cos, sin, g, **launch):
    """Kernel vs twin: y and dx equal bit for bit (see the module docstring)."""
    x = x.requires_grad_()
    y = rope.rope(x, cos, sin, **launch)
    ref = fused.rope_reference(x, cos, sin)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    dy = strided_like(y.shape, y.dtype, g)
    torch.testing.assert_close(grads(y, x, dy)[0], grads(ref, x, dy)[0], rtol=0, atol=0)
    return y


ROPE_SHAPES = [  # (B, nh, T, hs, d, block_r): rows B*nh*T not a multiple of block_r
    (2, 3, 5, 64, 64, 4),  # full rotary
    (2, 3, 5, 64, 48, None),  # Phi-4-mini's partial rotary (3/4 of the head), 16 dims pass through
    (1, 2, 1, 64, 32, 2),  # T = 1 (decoding), half the head rotates
    (3, 2, 7, 10, 6, 8),  # d/2 = 3 and hs - d = 4: both tiles padded
]


@pytest.mark.parametrize("B, nh, T, hs, d, block_r", ROPE_SHAPES)
@pytest.mark.parametrize("x_dtype, table_dtype", [(F32, F32), (BF16, BF16), (F16, F16), (BF16, F32)])
def test_rope_matches_twin_exactly(B, nh, T, hs, d, block_r, x_dtype, table_dtype):
    """Random tables (their halves differ, so every term of the formula shows), x as q.transpose(1, 2) of a
    (B, T, nh, hs) projection (strided), tables for batch 1 broadcast over B; bf16 q with fp32 tables is the
    mixed-precision case (output fp32, dx bf16)."""
    g = torch.Generator().manual_seed(B * 100 + hs + d)
    x = torch.randn(B, T, nh, hs, generator=g).to(x_dtype).transpose(1, 2)  # (B, nh, T, hs), strided
    cos, sin = (torch.randn(B, T, d, generator=g).to(table_dtype) for _ in range(2))
    y = check_rope(x, cos, sin, g, block_r=block_r)
    assert y.dtype == torch.promote_types(x_dtype, table_dtype) and y.is_contiguous()
    check_rope(x.detach(), cos[:1], sin[:1], g, block_r=block_r)


def test_rope_backward_is_the_rotation_by_minus_angle():
    """With real tables (rotate_half layout: both halves of cos and sin equal), dx = rope(dy, cos, -sin) bit
    for bit, and a forward rotation by -angle undoes the rotation by angle, to rounding."""
    config = SimpleNamespace(rotary_dim=48, rope_theta=10000.0, rope_local_theta=None, rope_scaling=None)
    cos, sin = RoPE(config).tables(torch.arange(9)[None], "full_attention", F32)  # (1, 9, 48)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, 64, generator=g, requires_grad=True)
    dy = torch.randn(2, 3, 9, 64, generator=g)
    (dx,) = grads(rope.rope(x, cos, sin), x, dy)
    assert torch.equal(dx, rope.rope(dy, cos, -sin))
    # pass 1 rounds 3 times on terms |a cos| + |b sin| <= sqrt(2) max|x| (3 sqrt(2) u32 max|x|); pass 2 the
    # same on |y| <= sqrt(2) max|x| (6 u32), and carries pass 1's error times <= sqrt(2) (6 u32); the
    # tables' own rounding leaves cos^2 + sin^2 within 2 u32 of 1 (2 sqrt(2) u32): < 24 u32 max|x|
    torch.testing.assert_close(rope.rope(rope.rope(x.detach(), cos, sin), cos, -sin), x.detach(),
                               rtol=0, atol=24 * U32 * x.abs().max().item())


def test_rope_errors():
    x = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="d even and d <= 8"):
        rope.rope(x, torch.randn(1, 3, 5), torch.randn(1, 3, 5))
    with pytest.raises(ValueError, match="detach cos and sin"):
        rope.rope(x, torch.randn(1, 3, 4, requires_grad=True), torch.randn(1, 3, 4))


# ---------------------------------------------------------------- SwiGLU / GeGLU

BETA, KAPPA = swiglu.BETA, swiglu.KAPPA


def check_swiglu(gate, up, act, g):
    """Kernel vs twin, h, d gate and d up. A = bound on |act_kernel(g) - act_torch(g)| in fp32:

    kernel: s = 1 / (1 + exp(-t)), t = g (silu) or 2z (gelu, z = beta (g + kappa g^3), 5 roundings: t within
    10 |z| u32). exp within (2 + |t|) u32 (on a GPU ex2.approx(t log2e): 2 ulp, and t log2e rounded), the
    addition u32 and the division 4 u32 (div.full, 2 ulp) more, so s within e_s = (7 + |t| (+ 10|z|)) u32,
    act = g s one more.
    torch: silu = g / (1 + exp(-g)) within 4 u32; gelu = 0.5 g (1 + tanh(z)): z's 5 roundings move 1 + tanh
    by 10 |z| u32 relatively, and tanh's own error (1 ulp) and the addition are absolute: 3 u32 |0.5 g|.
        silu: A = (12 + 2|g|) u32 |act|          gelu: A = (16 + 24|z|) u32 |act| + 2 u32 |g|
    h = round_X(round_X(act) up): |h - h_ref| <= |up| (A + 2 u_X |act| + 2 eta_X) + 2 (u_X + u32) |act up|
    + 2 eta_X (both sides round act and the product). d up: the same with dy for up.
    d gate = round_X(da act'(g)), da = round_X(dy up) the same on both sides; act' from s as above:
        silu' = s (1 + g (1 - s)), |silu'| <= s (1 + |g|) =: F, the kernel within (2 e_s + 4 u32) F = (18 +
        2|g|) u32 F, torch (sigmoid within 4 u32) within 12 u32 F: A' = (32 + 2|g|) u32 F;
        gelu' = s + 2 g s (1 - s) beta (1 + 3 kappa g^2), |gelu'| <= 1 + |g| beta (1 + 3 kappa g^2) =: F; 1 - s
        and torch's 1 - tanh^2 lose up to (7 + 12|z|) u32 absolutely, times at most 2 F, s itself e_s more,
        torch's 0.5 (1 + tanh) and product roundings (10 + 15|z|) u32 F: A' = (40 + 60|z|) u32 F.
    |dg - dg_ref| <= |da| (A' + 2 (u_X + u32) F) + 2 eta_X.
    """
    gate, up = gate.requires_grad_(), up.requires_grad_()
    h, ref = swiglu.swiglu(gate, up, act), fused.swiglu_reference(gate, up, act)
    dy = strided_like(h.shape, h.dtype, g)
    (dg, du), (dg_ref, du_ref) = grads(h, (gate, up), dy), grads(ref, (gate, up), dy)
    uX, eX = U[gate.dtype], ETA[gate.dtype]
    G, Up, D = gate.detach().double(), up.detach().double(), dy.double()
    da = (dy * up.detach()).double().abs()  # round_X(dy up), as both sides compute it
    if act == "silu":
        s = torch.sigmoid(G)
        a = G * s
        A = (12 + 2 * G.abs()) * U32 * a.abs()
        F = s * (1 + G.abs())
        A1 = (32 + 2 * G.abs()) * U32 * F
    else:
        z = BETA * (G + KAPPA * G**3)
        a = 0.5 * G * (1 + torch.tanh(z))
        A = (16 + 24 * z.abs()) * U32 * a.abs() + 2 * U32 * G.abs()
        F = 1 + G.abs() * BETA * (1 + 3 * KAPPA * G**2)
        A1 = (40 + 60 * z.abs()) * U32 * F
    what = f"{act} {gate.dtype} {tuple(gate.shape)}"
    for out, want, other, name in ((h, ref, Up, "h"), (du, du_ref, D, "d up")):
        bound = other.abs() * (A + 2 * uX * a.abs() + 2 * eX) + 2 * (uX + U32) * (a * other).abs() + 2 * eX
        within(out, want, bound, f"{name} {what}")
    within(dg, dg_ref, da * (A1 + 2 * (uX + U32) * F) + 2 * eX, f"d gate {what}")


def glu_inputs(shape, dtype, g):
    """gate ~ 2 randn (sigmoid's tails), its first values far out (exp overflows to inf: act = -0 or g)."""
    gate = 2 * torch.randn(shape, generator=g)
    extremes = torch.tensor([-100.0, -20.0, 20.0, 100.0])[: gate.numel()]
    gate.view(-1)[: len(extremes)] = extremes
    return gate.to(dtype), torch.randn(shape, generator=g).to(dtype)


OVERFLOW = "ignore:overflow encountered in exp"  # numpy, exp(100) = inf on purpose (glu_inputs), as on a GPU


@pytest.mark.filterwarnings(OVERFLOW)
@pytest.mark.parametrize("shape", [(9, 70), (2, 3, 576), (3, 1)])
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
@pytest.mark.parametrize("act", fused.ACTIVATIONS)
def test_swiglu_matches_twin(shape, dtype, act):
    """Rows not a multiple of BLOCK_M = 4, 576 columns = one full and one partial BLOCK_N = 512 tile, one
    column; silu (SwiGLU) and tanh-GELU (GeGLU)."""
    g = torch.Generator().manual_seed(shape[-1])
    check_swiglu(*glu_inputs(shape, dtype, g), act, g)


@pytest.mark.filterwarnings(OVERFLOW)
def test_swiglu_on_a_fused_gate_up_and_errors():
    """gate and up as the two halves of Phi-3's gate_up_proj output: strided views of one tensor."""
    g = torch.Generator().manual_seed(5)
    for dtype in (F32, BF16):
        gate_up = torch.cat(glu_inputs((2, 5, 88), dtype, g), -1)  # (B, T, 2I)
        check_swiglu(*(t.detach() for t in gate_up.chunk(2, dim=-1)), "silu", g)
    with pytest.raises(ValueError, match="expected one of"):
        swiglu.swiglu(torch.randn(3), torch.randn(3), "relu")
    with pytest.raises(ValueError, match="of one dtype"):
        swiglu.swiglu(torch.randn(3), torch.randn(3).bfloat16())
