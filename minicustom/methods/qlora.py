"""QLoRA (Dettmers et al. 2023): a frozen 4-bit NF4 base with LoRA adapters trained on top.

    y = x dq(W4)^T + b + s · (x A^T) B^T

The 4-bit layer is quant/linear4bit.py and knows no adapter; `apply_lora` on a model whose linears are
`Linear4bit` gives QLoRA (DoRA works on top too: its row norms read the dequantized weight). This file
holds QLoRA's recipes on top of LoRA: LoftQ initialisation (Li et al. 2023), merging adapters into a
4-bit base (full precision, or re-quantized with the error measured), and the registry entries `qlora`
and `qlora-loftq`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant import nf4
from ..quant.linear4bit import Linear4bit, memory_report, quantize_model  # noqa: F401 (mc.qlora.memory_report)
from .base import Method, adapter_configs
from .lora import OPTIONS, apply_lora, load_peft, to_peft
from .lora_layers import LoraConfig, LoRALinear

# -- LoftQ ---------------------------------------------------------------------------------------------

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
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    quantize_model(model, targets, blocksize, double_quant, quant_type)
    apply_lora(model, r=r, alpha=alpha, targets=targets, **lora_kwargs)
    name = lora_kwargs.get("adapter_name", "default")
    config: LoraConfig = adapter_configs(model)[name]
    for module_name, module in model.named_modules():
        if not isinstance(module, LoRALinear) or module.base_layer is None:
            continue
        rank, a = config.rank_alpha(module_name)
        s = config.scaling(rank, a)
        state, A, B = loftq(originals[module_name], rank, s, iters, blocksize, double_quant, quant_type)
        module.base_layer.state = state
        module.set_factors(name, A, B)
    return model


# --- merging into a 4-bit base -------------------------------------------------------------------------------

@torch.no_grad()
def merge_4bit(model: nn.Module, requantize: bool = False) -> dict:
    """Fold every active LoRA/DoRA adapter on a Linear4bit base into W' = dq(W4) + s·B·A (DoRA: row-rescaled),
    the weights the adapter was trained against. With requantize, W' is quantized again with the base's
    settings and the error that adds is measured. Replaces each LoRALinear by an nn.Linear (or a Linear4bit)
    and returns {"layers": n, "max_abs_error": ..., "rel_error": ||dq(q(W')) - W'|| / ||W'||} (errors 0 when
    not re-quantized)."""
    err_sq = ref_sq = max_abs = 0.0
    count = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoRALinear) or module.base_layer is None:
            continue
        base = module.base_layer
        W = base.dequantize(torch.float32)
        for adapter in module.active:
            W, _ = module.fold(W, adapter)
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
        model.set_submodule(name, new)
        count += 1
    if not count:
        raise ValueError("no LoRA adapter on a 4-bit base to merge")
    adapter_configs(model).clear()
    return {"layers": count, "max_abs_error": max_abs, "rel_error": (err_sq / ref_sq) ** 0.5 if ref_sq else 0.0}


# -- the registry entries ------------------------------------------------------------------------------

def apply_qlora(model: nn.Module, r=8, alpha=16.0, dropout=0.0, targets="all-linear") -> nn.Module:
    """QLoRA: every linear but lm_head to NF4 (unless the model was loaded 4-bit), then LoRA on the targets."""
    if not any(isinstance(m, Linear4bit) for m in model.modules()):
        quantize_model(model)
    return apply_lora(model, r=r, alpha=alpha, dropout=dropout, targets=targets)


def _apply_loftq(model: nn.Module, r=8, alpha=16.0, dropout=0.0, targets="all-linear") -> nn.Module:
    return apply_loftq(model, r=r, alpha=alpha, targets=targets, dropout=dropout)


QLORA = Method("qlora", apply_qlora, "QLoRA: LoRA on an NF4 4-bit base", lr=1e-3, mergeable=True, peft_type="LORA",
               options=OPTIONS, to_peft=to_peft, load_peft=load_peft)
QLORA_LOFTQ = Method("qlora-loftq", _apply_loftq, "QLoRA started by LoftQ: the 4-bit base and the adapter fit W "
                     "together", lr=1e-3, mergeable=True, peft_type="LORA", options=OPTIONS, variant_of="qlora",
                     to_peft=to_peft, load_peft=load_peft)
