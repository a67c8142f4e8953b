"""Full fine-tuning: every weight of the model is trained (the SFT baseline of the ladder's top rungs).

Nothing is attached: the method only makes every parameter trainable, and a run's result is a whole
checkpoint folder rather than an adapter. A 4-bit model is refused: its linears are frozen NF4 codes.
"""

from __future__ import annotations

from torch import nn

from ..quant.linear4bit import Linear4bit
from .base import Method


def apply_full(model: nn.Module) -> nn.Module:
    if any(isinstance(m, Linear4bit) for m in model.modules()):
        raise ValueError("full fine-tuning updates every weight, but this model's linears are 4-bit and frozen; "
                         "train an adapter on them (--method qlora or lora), or load the model unquantized")
    for p in model.parameters():
        p.requires_grad_(True)
    return model


FULL = Method("full", apply_full, "full fine-tuning: every weight is trained", lr=3e-5, mergeable=False)
