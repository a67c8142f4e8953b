"""A frozen 4-bit linear layer (QLoRA's base, Dettmers et al. 2023): y = x dq(W4)^T + b.

`Linear4bit` holds only the packed NF4/FP4 weight and its scales (bitsandbytes' layout and state_dict keys).
Its autograd function saves the packed tensors, not a full-precision copy, and dequantizes again in backward
to send the gradient to the input (the frozen base gets none): dL/dx = dL/dy · dq(W4). On CUDA,
dequantization and the small-batch matmul run as Triton kernels (minicustom.kernels); everywhere else the
PyTorch reference in quant/nf4.py runs, bit-identical.

Also here: `quantize_model` (swap nn.Linear for Linear4bit), the `quantization_config` that transformers
reads, and the memory report. This layer knows no adapter: QLoRA's recipes (LoRA on top, LoftQ, merging
into a 4-bit base) are in methods/qlora.py.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from ..precision import compute_dtype
from . import nf4

# The fused dequant+matmul kernel serves up to this many rows on CUDA; above, dequant + GEMM. 0: on the first GPU
# run (an H200, README's GPU section) the kernel was 1.3 to 6x slower than dequantize-then-F.linear at every
# shape benchmarks/bench_nf4.py measures, 1 and 16 rows, so every row takes that path until it is tuned.
FUSED_MAX_ROWS = 0


def _triton_ok(t: torch.Tensor) -> bool:
    if not t.is_cuda:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def dequantize(state: nf4.QuantState, dtype: torch.dtype) -> torch.Tensor:
    """The weight in `dtype`: Triton on CUDA, the PyTorch reference elsewhere (the two are bit-identical)."""
    if _triton_ok(state.packed):
        from ..kernels import nf4_dequant

        return nf4_dequant.dequantize(state, dtype)
    return nf4.dequantize(state, dtype)


class _Linear4bitFunction(torch.autograd.Function):
    """x -> x dq(W)^T, saving only the packed weight and its scales for backward."""

    @staticmethod
    def forward(ctx, x, state: nf4.QuantState, *tensors):
        ctx.state = state
        ctx.save_for_backward(*tensors)  # packed codes and scales: 4.13 bits per weight, never the weight
        rows = x.numel() // x.shape[-1]
        if rows <= FUSED_MAX_ROWS and _triton_ok(x):
            from ..kernels import nf4_matmul

            return nf4_matmul.linear(x, state)
        return F.linear(x, dequantize(state, x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None, *[None] * len(ctx.saved_tensors)
        W = dequantize(ctx.state, grad_out.dtype)  # dequantized again; freed when backward returns
        return grad_out @ W, None, *[None] * len(ctx.saved_tensors)


class Linear4bit(nn.Module):
    """A frozen linear layer stored as NF4/FP4 (bitsandbytes layout); computes in `compute_dtype`.

    Its state_dict has the keys transformers+bitsandbytes write: `weight` (packed uint8), `weight.absmax`,
    `weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map`,
    `weight.quant_state.bitsandbytes__nf4` (JSON), and `bias`.
    """

    def __init__(self, state: nf4.QuantState, bias: torch.Tensor | None = None, compute_dtype=None):
        super().__init__()
        if len(state.shape) != 2:
            raise nf4.QuantError(f"a linear weight is 2-D; got shape {tuple(state.shape)}")
        self.out_features, self.in_features = state.shape
        self.state = state
        self.compute_dtype = compute_dtype or state.dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(self.compute_dtype), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    quant_type: str = "nf4", compute_dtype=None) -> Linear4bit:
        state = nf4.quantize(linear.weight.detach(), blocksize, double_quant, quant_type)
        return cls(state, linear.bias, compute_dtype or linear.weight.dtype)

    def _apply(self, fn, recurse=True):  # .to(device) moves the packed weight; .to(dtype) sets compute_dtype
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self.state.packed.device))
        self.compute_dtype = probe.dtype
        if probe.device != self.state.packed.device:
            self.state = self.state.to(probe.device)
        return self

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.state, dtype or self.compute_dtype)

    def forward(self, x):
        dtype = compute_dtype(x, self.compute_dtype)  # autocast's dtype under mixed precision
        y = _Linear4bitFunction.apply(x.to(dtype), self.state, *self.state.tensors())
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        s = self.state
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{s.quant_type}, blocksize={s.blocksize}, double_quant={s.double_quant}")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination.update(nf4.to_state_dict(self.state, prefix + "weight"))
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        keys = [k for k in state_dict if k.startswith(prefix + "weight")]
        if not keys:
            missing_keys.append(prefix + "weight")
            return
        self.state = nf4.from_state_dict(state_dict, prefix + "weight", where="state_dict")
        if self.bias is not None and prefix + "bias" in state_dict:
            self.bias.data = state_dict[prefix + "bias"].to(self.compute_dtype)


def is_quant_key(name: str) -> bool:
    """Keys of the bitsandbytes serialization that must keep their dtype when a checkpoint is cast."""
    return name.endswith(tuple(f".{s}" for s in nf4.STATE_SUFFIXES)) or ".quant_state.bitsandbytes__" in name


def quantize_model(model: nn.Module, targets="all-linear", blocksize: int = 64, double_quant: bool = True,
                   quant_type: str = "nf4", compute_dtype=None, verbose: bool = False) -> nn.Module:
    """Replace the targeted nn.Linear modules by Linear4bit, in place: "all-linear" (every one but lm_head,
    which stays in full precision as in QLoRA), one regex (full match on the module name), or a list of
    names (equal to, or ending in '.' + name)."""
    def selected(name: str) -> bool:
        if targets == "all-linear":
            return name != "lm_head"
        if isinstance(targets, str):
            return re.fullmatch(targets, name) is not None
        return any(name == t or name.endswith("." + t) for t in targets)

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and selected(n)]
    if not names:
        raise ValueError(f"targets {targets!r} match no nn.Linear to quantize")
    for name in names:
        linear = model.get_submodule(name)
        model.set_submodule(name, Linear4bit.from_linear(linear, blocksize, double_quant, quant_type, compute_dtype))
    if verbose:
        print(memory_report(model))
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """quantize_model's inverse, in place: every Linear4bit becomes an nn.Linear holding its dequantized
    weight (and its bias) in `dtype`."""
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, Linear4bit)]:
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.state.packed.device,
                           dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(m.dequantize(dtype))
            if m.bias is not None:
                linear.bias.copy_(m.bias)
        model.set_submodule(name, linear.requires_grad_(False))
    return model


def quantization_config(model: nn.Module) -> dict | None:
    """The `quantization_config` entry of config.json that transformers reads, or None if nothing is 4-bit."""
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if not layers:
        return None
    s = layers[0].state
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": s.quant_type, "bnb_4bit_use_double_quant": s.double_quant,
            "bnb_4bit_compute_dtype": str(layers[0].compute_dtype).removeprefix("torch."),
            "bnb_4bit_quant_storage": "uint8"}  # the blocksize travels in each weight's quant_state


def memory_report(model: nn.Module) -> str:
    """Bits per quantized parameter and the model's weight bytes, quantized and not."""
    quant_bytes = quant_params = 0
    for m in model.modules():
        if isinstance(m, Linear4bit):
            quant_bytes += m.state.nbytes()
            quant_params += m.state.numel
    other = {id(p): p for p in model.parameters()}
    other_bytes = sum(p.numel() * p.element_size() for p in other.values())
    if not quant_params:
        return f"no 4-bit layers; weights {other_bytes / 2**20:.1f} MiB"
    return (f"4-bit layers: {quant_params:,} parameters at {8 * quant_bytes / quant_params:.3f} bits each "
            f"({quant_bytes / 2**20:.1f} MiB); other weights {other_bytes / 2**20:.1f} MiB")
