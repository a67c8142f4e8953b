"""QLoRA (Dettmers et al. 2023): a frozen 4-bit NF4 base with LoRA adapters trained on top.

    y = x dq(W4)^T + b + s · (x A^T) B^T

`Linear4bit` holds only the packed weight and its scales. Its autograd function saves the packed tensors,
not a full-precision copy, and dequantizes again in backward to send the gradient to the input (the frozen
base gets none): dL/dx = dL/dy · dq(W4). `apply_lora` on a model whose linears are `Linear4bit` gives QLoRA;
DoRA works on top too (its row norms read the dequantized weight).

Also here: `quantize_model` (swap nn.Linear for Linear4bit), LoftQ initialisation, merging adapters into a
4-bit base, and the memory report. On CUDA, dequantization and the small-batch matmul run as Triton kernels
(minicustom.kernels); everywhere else the PyTorch reference in minicustom.nf4 runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import nf4

FUSED_MAX_ROWS = 64  # the fused dequant+matmul kernel serves up to this many tokens; above, dequant + GEMM


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
        from .kernels import nf4_dequant

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
            from .kernels import nf4_matmul

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

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.state.dtype

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.state, dtype or self.compute_dtype)

    def forward(self, x):
        y = _Linear4bitFunction.apply(x.to(self.compute_dtype), self.state, *self.state.tensors())
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
    """Replace the targeted nn.Linear modules (default: all but lm_head) by Linear4bit, in place."""
    from .lora import _replace, find_targets

    names = [n for n in find_targets(model, targets) if isinstance(model.get_submodule(n), nn.Linear)]
    if not names:
        raise ValueError(f"targets {targets!r} match no nn.Linear to quantize")
    for name in names:
        linear = model.get_submodule(name)
        _replace(model, name, Linear4bit.from_linear(linear, blocksize, double_quant, quant_type, compute_dtype))
    if verbose:
        print(memory_report(model))
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


# --- LoftQ ---------------------------------------------------------------------------------------------------

def loftq(weight: torch.Tensor, r: int, scaling: float, iters: int = 1, blocksize: int = 64,
          double_quant: bool = True, quant_type: str = "nf4") -> tuple[nf4.QuantState, torch.Tensor, torch.Tensor]:
    """LoftQ (Li et al. 2023, Alg. 1): alternate Q_t = quantize(W - B_{t-1} A_{t-1}) and a rank-r SVD of the
    residual W - dq(Q_t), so that dq(Q) + s·B·A approximates W better than dq(quantize(W)) alone.

    The SVD gives W - dq(Q) ~ L R with L = U_r √S_r, R = √S_r V_r^T. The adapter computes s·B·A, so we set
    A = R / √s and B = L / √s: s·B·A = L R whatever alpha/r is. (PEFT assigns A = R, B = L, which is only right
    when s = 1.) Returns (the final 4-bit base, A (r, in), B (out, r)), all in fp32.
    """
    if iters < 1:
        raise ValueError(f"LoftQ needs at least one alternation, got iters={iters}")
    W = weight.detach().float()
    residual_target = W
    for _ in range(iters):
        state = nf4.quantize(residual_target, blocksize, double_quant, quant_type)
        U, S, Vh = torch.linalg.svd(W - nf4.dequantize(state, torch.float32), full_matrices=False)
        root = S[:r].sqrt()
        L, R = U[:, :r] * root, root[:, None] * Vh[:r]
        residual_target = W - L @ R
    state.dtype = weight.dtype  # the base is stored like the weight it replaces
    return state, R / scaling ** 0.5, L / scaling ** 0.5


def apply_loftq(model: nn.Module, r: int = 8, alpha: float = 16.0, targets="all-linear", iters: int = 1,
                blocksize: int = 64, double_quant: bool = True, quant_type: str = "nf4", **lora_kwargs):
    """QLoRA with LoftQ initialisation on a full-precision model: each targeted nn.Linear becomes a Linear4bit
    holding LoftQ's base, with a LoRA adapter holding LoftQ's factors."""
    from .lora import LoraConfig, LoRALinear, apply_lora

    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    quantize_model(model, targets, blocksize, double_quant, quant_type)
    apply_lora(model, r=r, alpha=alpha, targets=targets, **lora_kwargs)
    name = lora_kwargs.get("adapter_name", "default")
    config: LoraConfig = model.adapter_configs[name]
    for module_name, module in model.named_modules():
        if not isinstance(module, LoRALinear) or module.base_layer is None:
            continue
        rank, a = config.rank_alpha(module_name)
        s = config.scaling(rank, a)
        state, A, B = loftq(originals[module_name], rank, s, iters, blocksize, double_quant, quant_type)
        module.base_layer.state = state
        with torch.no_grad():
            module.lora_A[name].weight.copy_(A)
            module.lora_B[name].weight.copy_(B)
    return model


# --- merging into a 4-bit base -------------------------------------------------------------------------------

@torch.no_grad()
def merge_4bit(model: nn.Module, requantize: bool = False) -> dict:
    """Fold every active LoRA/DoRA adapter on a Linear4bit base into W' = dq(W4) + s·B·A (DoRA: row-rescaled),
    the weights the adapter was trained against. With requantize, W' is quantized again with the base's
    settings and the error that adds is measured. Replaces each LoRALinear by an nn.Linear (or a Linear4bit)
    and returns {"layers": n, "max_abs_error": ..., "rel_error": ||dq(q(W')) - W'|| / ||W'||} (errors 0 when
    not re-quantized)."""
    from .lora import LoRALinear, _replace

    err_sq = ref_sq = max_abs = 0.0
    count = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoRALinear) or module.base_layer is None:
            continue
        base = module.base_layer
        W = base.dequantize(torch.float32)
        for adapter in module.active:
            delta = module.delta(adapter).float()
            if adapter in module.lora_magnitude_vector:
                norm = torch.linalg.norm(W + delta, dim=1)
                W = (module.lora_magnitude_vector[adapter].float() / norm)[:, None] * (W + delta)
            else:
                W = W + delta
        if requantize:
            s = base.state
            new = Linear4bit(nf4.quantize(W.to(s.dtype), s.blocksize, s.double_quant, s.quant_type), base.bias,
                             base.compute_dtype)
            diff = new.dequantize(torch.float32) - W
            err_sq += diff.square().sum().item()
            ref_sq += W.square().sum().item()
            max_abs = max(max_abs, diff.abs().max().item())
        else:
            new = nn.Linear(module.in_features, module.out_features, bias=base.bias is not None,
                            device=W.device, dtype=base.compute_dtype)
            new.weight.copy_(W)
            if base.bias is not None:
                new.bias.copy_(base.bias)
            new.requires_grad_(False)
        _replace(model, name, new)
        count += 1
    if not count:
        raise ValueError("no LoRA adapter on a 4-bit base to merge")
    model.__dict__.pop("adapter_configs", None)
    return {"layers": count, "max_abs_error": max_abs, "rel_error": (err_sq / ref_sq) ** 0.5 if ref_sq else 0.0}
