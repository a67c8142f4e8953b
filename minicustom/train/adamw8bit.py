"""AdamW with 8-bit optimizer state: Dettmers, Lewis, Shleifer and Zettlemoyer 2022, "8-bit Optimizers
via Block-wise Quantization" (ICLR 2022, arXiv:2110.02861), the update of bitsandbytes' `AdamW8bit`.

AdamW (Loshchilov & Hutter 2019) at step t, with gradient g, learning rate lr, decay wd:

    m_t = beta1 * m_{t-1} + (1 - beta1) * g
    v_t = beta2 * v_{t-1} + (1 - beta2) * g^2
    c1 = 1 - beta1^t,   c2 = sqrt(1 - beta2^t)
    p  <- p * (1 - lr * wd)                                   decoupled weight decay, before the step
    p  <- p - (lr / c1) * m_t / (sqrt(v_t) / c2 + eps)

Between steps m and v are stored as 8-bit codes. Each state tensor is flattened and cut into blocks of
B = 256 values (the last block may be shorter); per block b (Dettmers 2022, §2.1):

    absmax_b = max_i |x_i|                                     kept in fp32
    q_i      = argmin_j | x_i * (1 / absmax_b) - Q[j] |        the nearest code; a tie takes the lower j
    x_i     ~= Q[q_i] * absmax_b                               dequantization, one fp32 multiply

so one outlier only coarsens its own block, and a step costs 2 bytes of state per parameter instead of 8
(plus 8 bytes of absmax per 256). An all-zero block has absmax 0 and stores the code of 0.

Q is the *dynamic* map (Dettmers 2016, "8-Bit Approximations for Parallelism in Deep Learning"): a sign, a
run of zero bits giving a decimal exponent, then a linear fraction, so that it reaches 7 decades below
1 with roughly constant relative precision. Written out as values (`dynamic_map`):

    signed (for m):   for e = 0..6, the midpoints of 2^e equal parts of [0.1, 1], times +-10^(e-6);
                      with 0 and 1: 2 * 127 + 2 = 256 values in [-0.993, 1]
    unsigned (for v): for e = 0..6, the midpoints of 2^(e+1) equal parts of [0.1, 1], times 10^(e-6);
                      with 0 and 1: 254 + 2 = 256 values in [0, 1]

each evaluated as bitsandbytes evaluates it (fp32 linspace, fp32 midpoint, fp32 product), so the tables
equal `bitsandbytes.functional.create_dynamic_map` bit for bit. The smallest non-zero codes are 5.5e-7
(signed) and 3.25e-7 (unsigned); a value below half of that, relative to its block's absmax, becomes 0.

A parameter of fewer than `min_8bit_size` = 4096 elements (biases, norms, small adapters) keeps fp32 m and v,
as in bitsandbytes, and is updated with torch.optim.AdamW's arithmetic (single-tensor path) bit for bit.

What "the same as bitsandbytes" means here, op for op: the 8-bit step is bitsandbytes' CPU and pure-PyTorch
update (backends/cpu/ops.py, backends/triton/kernels_optim.py): dequantize m and v to fp32, the fp32 moment
updates (`mul_`/`add_`/`addcmul_`), `denom = sqrt(v) / c2 + eps`, weight decay before the step,
`addcdiv_(m, denom, -lr / c1)`, re-quantize with fresh absmax. The rounding is the nearest code, as the
paper, bitsandbytes' CUDA kernel and its pure-PyTorch quantizers do (not stochastic: that is only the
optional 8-bit *parameter* rounding, absent from AdamW8bit). Two places where bitsandbytes itself differs
from that, deliberately not copied:
- its CPU C kernel (`cquantize_blockwise_cpu_fp32`) searches a 65536-point grid on [-1, 1] first, so about
  0.1% of m and 3% of v values get a neighbouring code instead of the nearest, and a v below 1.5e-5 of its
  block's absmax gets code 1.6e-5 (up to 7 codes off) -- same parameters, states within a code;
- its CUDA kernel applies the decay after the step, p <- (p - lr/c1 * m / (sqrt(v) + c2 * eps)) * (1 - lr*wd),
  a difference of lr^2 * wd * |update| per step, and skips elements whose gradient is NaN or inf.
Left out: paged state, percentile clipping, `max_unorm`, the fp32-state override per parameter
(GlobalOptimManager), 8-bit state for other optimizers. This reference dequantizes a whole tensor at a
time: a step holds two fp32 copies of its largest parameter (bitsandbytes' CUDA kernel streams blocks).
With FSDP2 (sharded parameters) it is refused by the trainer: a block's absmax needs the whole tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from functools import lru_cache

import torch
from torch import Tensor

BLOCK_SIZE = 256  # bitsandbytes' optimizer block size (optimizer.py, backends/cpu/ops.py)
MIN_8BIT_SIZE = 4096  # below this many elements a parameter keeps fp32 state (bitsandbytes' default)
STATE_8BIT = ("m_codes", "m_absmax", "v_codes", "v_absmax")
STATE_32BIT = ("m", "v")


# -- the dynamic maps ---------------------------------------------------------------------------------

@lru_cache(maxsize=2)
def dynamic_map(signed: bool) -> Tensor:
    """The 256 sorted fp32 values of the 8-bit dynamic map (signed for m, unsigned for v); see the module
    docstring. Cached: do not write into the tensor returned."""
    values = [0.0, 1.0]
    for e in range(7):
        parts = 2 ** e if signed else 2 ** (e + 1)  # the unsigned map spends the sign bit on the fraction
        bounds = torch.linspace(0.1, 1, parts + 1, dtype=torch.float32)
        midpoints = (bounds[:-1] + bounds[1:]) / 2.0  # (parts,)
        values += (10.0 ** (e - 6) * midpoints).tolist()
        if signed:
            values += (-(10.0 ** (e - 6)) * midpoints).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def _zero_code(code: Tensor) -> int:
    return int((code == 0).nonzero()[0])


# -- blockwise quantization ---------------------------------------------------------------------------

def quantize_blockwise(x: Tensor, code: Tensor, block_size: int = BLOCK_SIZE) -> tuple[Tensor, Tensor]:
    """(uint8 codes of x's shape, fp32 absmax per block): x flattened, cut into blocks of block_size, each
    scaled by 1 / its absmax and rounded to the nearest value of `code` (sorted; a tie takes the lower)."""
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, -n % block_size)).view(-1, block_size)  # (nb, block_size)
    absmax = blocks.abs().amax(dim=1)  # (nb,); the zero padding cannot raise it
    scale = torch.where(absmax > 0, 1 / absmax, 0.0)  # an all-zero block scales to 0, the code of 0
    xn = torch.clamp(blocks * scale[:, None], -1, 1).reshape(-1)[:n]  # (n,) in [-1, 1]
    # the code at or below xn, and the one above: the nearest is one of the two
    upper = torch.searchsorted(code, xn, right=True).clamp_(1, code.numel() - 1)
    lower = upper - 1
    nearer_up = (code[upper] - xn).abs() < (xn - code[lower]).abs()  # strict: a tie stays below
    q = torch.where(nearer_up, upper, lower)
    return q.to(torch.uint8).view(x.shape), absmax


def dequantize_blockwise(q: Tensor, absmax: Tensor, code: Tensor, block_size: int = BLOCK_SIZE) -> Tensor:
    """fp32 values of q's shape: code[q] * absmax of the element's block."""
    n = q.numel()
    values = code[q.reshape(-1).long()]  # (n,)
    return (values * absmax.repeat_interleave(block_size)[:n]).view(q.shape)


def spacing_bound(q: Tensor, absmax: Tensor, code: Tensor, block_size: int = BLOCK_SIZE) -> Tensor:
    """Per element, the largest |x - dequantized x| that nearest rounding to code q allows: half the gap
    to the farther neighbouring code, times the block's absmax (the round-trip bound the tests check)."""
    i = q.reshape(-1).long()
    below = code[i] - code[(i - 1).clamp(min=0)]
    above = code[(i + 1).clamp(max=code.numel() - 1)] - code[i]
    half_gap = torch.maximum(below, above) / 2
    return (half_gap * absmax.repeat_interleave(block_size)[:q.numel()]).view(q.shape)


# -- the optimizer ------------------------------------------------------------------------------------

def _check_hyperparameters(group: dict) -> None:
    lr, betas, eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    real = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)  # noqa: E731
    if not (real(lr) and lr >= 0):
        raise ValueError(f"AdamW8bit: lr must be a finite number >= 0, got {lr!r}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(real(b) and 0 <= b < 1 for b in betas)):
        raise ValueError(f"AdamW8bit: betas must be two numbers in [0, 1), got {betas!r}")
    if not (real(eps) and eps >= 0):
        raise ValueError(f"AdamW8bit: eps must be a finite number >= 0, got {eps!r}")
    if not (real(wd) and wd >= 0):
        raise ValueError(f"AdamW8bit: weight_decay must be a finite number >= 0, got {wd!r}")


class AdamW8bit(torch.optim.Optimizer):
    """AdamW whose m and v are stored as blockwise 8-bit dynamic codes (parameters of at least
    min_8bit_size elements) or in fp32 (smaller ones). State per parameter: `step` (int), and
    m_codes, v_codes (uint8, the parameter's shape), m_absmax, v_absmax (fp32, one per block); or m, v."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, min_8bit_size: int = MIN_8BIT_SIZE,
                 block_size: int = BLOCK_SIZE):
        for name, value, least in (("min_8bit_size", min_8bit_size, 0), ("block_size", block_size, 1)):
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= least):
                raise ValueError(f"AdamW8bit: {name} must be an integer >= {least}, got {value!r}")
        self.min_8bit_size, self.block_size = min_8bit_size, block_size
        super().__init__(params, dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                                      weight_decay=weight_decay))

    def add_param_group(self, param_group: dict) -> None:
        """Checks the group's hyperparameters and that every parameter is a real floating-point tensor."""
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        _check_hyperparameters({**self.defaults, **param_group})
        for i, p in enumerate(params):
            if isinstance(p, Tensor) and not p.is_floating_point():
                raise ValueError(f"AdamW8bit: parameter {i} of group {len(self.param_groups)} is {p.dtype}; "
                                 "only floating-point parameters can be optimized")
        super().add_param_group({**param_group, "params": params})

    def uses_8bit(self, p: Tensor) -> bool:
        return p.numel() >= self.min_8bit_size

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g_index, group in enumerate(self.param_groups):
            _check_hyperparameters(group)  # a group edited since (the trainer sets lr every step)
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError(f"AdamW8bit: parameter {i} of group {g_index} has a sparse gradient; "
                                     "AdamW8bit needs dense gradients (torch.optim.SparseAdam takes sparse ones)")
                state = self.state[p]
                if not state:
                    self._init_state(p, state)
                state["step"] += 1
                if "m_codes" in state:
                    self._step_8bit(p, state, group)
                else:
                    self._step_32bit(p, state, group)
        return loss

    def _init_state(self, p: Tensor, state: dict) -> None:
        state["step"] = 0
        if not self.uses_8bit(p):
            state["m"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            state["v"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            return
        blocks = -(-p.numel() // self.block_size)
        for name, signed in (("m", True), ("v", False)):  # the codes of 0: exactly zero moments
            state[f"{name}_codes"] = torch.full(p.shape, _zero_code(dynamic_map(signed)), dtype=torch.uint8,
                                                device=p.device)
            state[f"{name}_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)

    def _step_8bit(self, p: Tensor, state: dict, group: dict) -> None:
        """bitsandbytes' blockwise 8-bit Adam step (backends/cpu/ops.py), op for op."""
        beta1, beta2 = group["betas"]
        lr, eps, wd, step, bs = group["lr"], group["eps"], group["weight_decay"], state["step"], self.block_size
        signed, unsigned = dynamic_map(True).to(p.device), dynamic_map(False).to(p.device)
        m = dequantize_blockwise(state["m_codes"], state["m_absmax"], signed, bs)
        v = dequantize_blockwise(state["v_codes"], state["v_absmax"], unsigned, bs)
        g = p.grad.float()
        p32 = p.float()  # p itself when p is fp32
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        correction1 = 1.0 - beta1 ** step
        correction2 = math.sqrt(1.0 - beta2 ** step)
        denom = (v.sqrt() / correction2).add_(eps)
        if wd > 0.0:
            p32.mul_(1.0 - lr * wd)
        p32.addcdiv_(m, denom, value=-lr / correction1)
        if p32 is not p:
            p.copy_(p32)
        state["m_codes"], state["m_absmax"] = quantize_blockwise(m, signed, bs)
        state["v_codes"], state["v_absmax"] = quantize_blockwise(v, unsigned, bs)

    def _step_32bit(self, p: Tensor, state: dict, group: dict) -> None:
        """torch.optim.AdamW's single-tensor step (torch/optim/adam.py), op for op, in fp32."""
        beta1, beta2 = group["betas"]
        lr, eps, wd, step = group["lr"], group["eps"], group["weight_decay"], state["step"]
        m, v, g, p32 = state["m"], state["v"], p.grad.float(), p.float()
        if wd != 0:
            p32.mul_(1 - lr * wd)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        step_size = lr / bias_correction1
        denom = (v.sqrt() / bias_correction2 ** 0.5).add_(eps)
        p32.addcdiv_(m, denom, value=-step_size)
        if p32 is not p:
            p.copy_(p32)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader casts floating state to each parameter's dtype (a bf16 parameter would round the
        fp32 absmax and moments): after it, every saved tensor is put back as saved, on the parameter's
        device, after checking that it fits the parameter."""
        super().load_state_dict(state_dict)
        saved = state_dict["state"]
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for index, (i, p) in enumerate(zip(ids, params)):
            if i in saved:
                state = {k: v.to(p.device, copy=True) if isinstance(v, Tensor) else v for k, v in saved[i].items()}
                self._check_loaded(index, p, state)
                self.state[p] = state

    def _check_loaded(self, index: int, p: Tensor, state: dict) -> None:
        keys = STATE_8BIT if self.uses_8bit(p) else STATE_32BIT
        if set(state) != {"step", *keys}:
            raise ValueError(f"AdamW8bit: the saved state of parameter {index} ({p.numel()} elements) holds "
                             f"{sorted(state)}, expected step, {', '.join(keys)} (another optimizer's, or another "
                             "min_8bit_size?)")
        blocks = -(-p.numel() // self.block_size)
        shapes = {"m": p.shape, "v": p.shape, "m_codes": p.shape, "v_codes": p.shape,
                  "m_absmax": (blocks,), "v_absmax": (blocks,)}
        for k in keys:
            if tuple(state[k].shape) != tuple(shapes[k]):
                raise ValueError(f"AdamW8bit: saved {k} of parameter {index} has shape {tuple(state[k].shape)}, "
                                 f"expected {tuple(shapes[k])} (block_size {self.block_size})")
        state["step"] = int(state["step"])
