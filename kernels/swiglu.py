"""SwiGLU / GeGLU, ``h = act(gate) * up``, forward and backward in Triton; twin of
``minicustom.fused.swiglu_reference`` (model.MLP without its three linears).

SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer") with act = silu; GeGLU (Gemma) with tanh-GELU.
In fp32, whatever the inputs' dtype X:

    silu(g)  = g * sigmoid(g)                        = g / (1 + exp(-g))
    gelu(g)  = 0.5 g (1 + tanh(z)),  z = beta (g + kappa g^3),  beta = sqrt(2 / pi),  kappa = 0.044715
             = g * sigmoid(2 z)                      (1 + tanh(z) = 2 sigmoid(2z): no cancellation for z << 0)
    h        = round_X(round_X(act(g)) * up)         (F.silu / F.gelu return X, then the product in X)

Backward, with s = sigmoid(g) for silu and s = sigmoid(2z) for gelu:

    d up     = round_X(dy * round_X(act(g)))
    d gate   = round_X(round_X(dy * up) * act'(g))  (autograd rounds dy * up to X before act's backward)
    silu'(g) = s + g s (1 - s)                       = s (1 + g (1 - s))
    gelu'(g) = s + g * 2 s (1 - s) * dz/dg           (d sigmoid(2z)/dg = 2 s (1 - s) dz/dg)
             = s + 2 g s (1 - s) beta (1 + 3 kappa g^2)

The kernel rounds where the model's unfused ops round, so the two differ only by how exp (kernel) and
exp or tanh (torch) are evaluated in fp32 (on a GPU the kernel's exp is ex2.approx and its division
div.full, 2 ulp each; FMA contraction is off, so every other operation rounds once): a few units in the
last fp32 place, which after rounding to bf16 or fp16 moves an occasional result by one ulp; the test
derives the bound. The forward saves gate
and up (not h), as Liger and unsloth do; the backward recomputes act(g).

Each program handles a (BLOCK_M, BLOCK_N) tile of rows of the intermediate size; gate and up may be
strided row views, e.g. the two halves of Phi-3's fused gate_up_proj output. Memory bound: forward reads
gate and up and writes h (3 values per element), backward reads dy, gate and up and writes both grads (5).

Left out: the exact (erf) GELU and other activations, writing the gradients in place into gate and up
(Liger's memory trick, which breaks a second use of those tensors), and fusing the surrounding matmuls.
"""

import torch
import triton
import triton.language as tl

from .nf4_dequant import round_to

ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
BETA = 0.7978845608028654  # sqrt(2 / pi), torch's M_SQRT2 * M_2_SQRTPI * 0.5
KAPPA = 0.044715
BLOCK_M, BLOCK_N = 4, 512


@triton.jit
def _act(g, GELU: tl.constexpr):
    """(act(g), s) in fp32: s = sigmoid(g) for silu, sigmoid(2z) for tanh-GELU."""
    if GELU:
        # z = beta * (g + kappa * g^3)
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        # 0.5 * (1 + tanh(z)) = sigmoid(2z)
        s = 1.0 / (1.0 + tl.exp(-2.0 * z))
    else:
        # sigmoid(g)
        s = 1.0 / (1.0 + tl.exp(-g))
    # act(g) = g * s
    return g * s, s


@triton.jit
def _swiglu_fwd(gate_ptr, up_ptr, h_ptr, M, N, stride_g, stride_u,
                GELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    mask = (rows[:, None] < M) & (cols[None, :] < N)  # (BLOCK_M, BLOCK_N)
    g = tl.load(gate_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    X: tl.constexpr = h_ptr.dtype.element_ty
    # a = act(gate): computed in fp32, returned in gate's dtype
    a = round_to(_act(g, GELU)[0], X)
    # h = a * up, in X
    h = round_to(a * u, X)
    tl.store(h_ptr + rows[:, None] * N + cols[None, :], h.to(X), mask=mask)


@triton.jit
def _swiglu_bwd(dy_ptr, gate_ptr, up_ptr, dg_ptr, du_ptr, M, N, stride_dy, stride_g, stride_u,
                GELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    mask = (rows[:, None] < M) & (cols[None, :] < N)  # (BLOCK_M, BLOCK_N)
    dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    X: tl.constexpr = dg_ptr.dtype.element_ty
    a, s = _act(g, GELU)
    # d up = dy * act(gate), act(gate) in X as the forward rounded it
    du = round_to(dy * round_to(a, X), X)
    # d act = dy * up, in X
    da = round_to(dy * u, X)
    if GELU:
        # gelu'(g) = s + 2 g s (1 - s) beta (1 + 3 kappa g^2)
        d = s + 2.0 * g * s * (1.0 - s) * (0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g))
    else:
        # silu'(g) = s (1 + g (1 - s))
        d = s * (1.0 + g * (1.0 - s))
    # d gate = d act * act'(gate)
    dg = round_to(da * d, X)
    tl.store(dg_ptr + rows[:, None] * N + cols[None, :], dg.to(X), mask=mask)
    tl.store(du_ptr + rows[:, None] * N + cols[None, :], du.to(X), mask=mask)


def _check(gate: torch.Tensor, up: torch.Tensor, act: str) -> None:
    """Errors a caller can act on: wrong device, dtype, shape or activation."""
    if gate.device.type == "cpu" and type(_swiglu_fwd).__name__ != "InterpretedFunction":
        raise RuntimeError("minicustom.kernels needs CUDA tensors (or TRITON_INTERPRET=1 set before importing "
                           "them); on CPU use minicustom.fused.swiglu_reference")
    if act not in ACTIVATIONS:
        raise ValueError(f"act is {act!r}; expected one of {ACTIVATIONS}")
    if gate.dtype not in (torch.float32, torch.bfloat16, torch.float16) or up.dtype != gate.dtype:
        raise ValueError(f"swiglu takes float32/bfloat16/float16 gate and up of one dtype, not {gate.dtype} "
                         f"and {up.dtype}")
    if gate.shape != up.shape or gate.device != up.device:
        raise ValueError(f"gate is {tuple(gate.shape)} on {gate.device}, up {tuple(up.shape)} on {up.device}; "
                         "expected one shape on one device")
    span = max(sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) for t in (gate, up))
    if gate.numel() >= 2**31 or span >= 2**31:
        raise ValueError(f"gate of shape {tuple(gate.shape)} spans 2^31 elements or more (int32 indexing)")


def _rows(t: torch.Tensor, N: int) -> torch.Tensor:
    """t as (M, N) rows with unit column stride: a view where one exists."""
    t = t.reshape(-1, N)
    return t if t.stride(-1) == 1 or t.shape[0] == 0 else t.contiguous()


def _grid(M: int, N: int) -> tuple[int, int]:
    return triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, act):
        N = gate.shape[-1]
        g2, u2 = _rows(gate, N), _rows(up, N)  # (M, N)
        M = g2.shape[0]
        h = torch.empty((M, N), dtype=gate.dtype, device=gate.device)
        if h.numel():
            _swiglu_fwd[_grid(M, N)](g2, u2, h, M, N, g2.stride(0), u2.stride(0), GELU=act != "silu",
                                     BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=4, enable_fp_fusion=False)
        ctx.save_for_backward(g2, u2)
        ctx.gelu, ctx.shape = act != "silu", gate.shape
        return h.view(gate.shape)

    @staticmethod
    def backward(ctx, dy):
        g2, u2 = ctx.saved_tensors
        M, N = g2.shape
        dy2 = _rows(dy, N)  # (M, N)
        dg = torch.empty((M, N), dtype=g2.dtype, device=g2.device)
        du = torch.empty((M, N), dtype=g2.dtype, device=g2.device)
        if dg.numel():
            _swiglu_bwd[_grid(M, N)](dy2, g2, u2, dg, du, M, N, dy2.stride(0), g2.stride(0), u2.stride(0),
                                     GELU=ctx.gelu, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=4,
                                     enable_fp_fusion=False)
        return dg.view(ctx.shape), du.view(ctx.shape), None


def swiglu(gate: torch.Tensor, up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """act(gate) * up for gate, up (..., N) of one shape and dtype, differentiable in both; act is
    config.hidden_act: "silu" (SwiGLU) or "gelu_pytorch_tanh" (GeGLU)."""
    _check(gate, up, act)
    return SwiGLUFunction.apply(gate, up, act)
