"""The ladder's trained rungs, one file a method, each opening with its paper and equation:

    prompt_tuning.py  prompt tuning and p-tuning (learned virtual tokens)
    prefix.py         prefix tuning (learned keys and values in every layer)
    ia3.py            IA3 (learned rescaling vectors)
    ln_tuning.py      LN tuning (a trainable copy of each norm's weight)
    trainable_tokens.py  trainable tokens (chosen rows of the embedding; new tokens)
    bottleneck.py     bottleneck adapters (Houlsby, Pfeiffer, parallel)
    llama_adapter.py  LLaMA-Adapter (gated adaption prompts)
    vera.py           VeRA (learned vectors scaling a shared frozen random low-rank pair)
    lora.py           LoRA and its variants (rsLoRA, DoRA, PiSSA, OLoRA); its modules in lora_layers.py
    loha.py           LoHa (a Hadamard product of two low-rank updates)
    lokr.py           LoKr (a Kronecker product of two, possibly low-rank, factors)
    adalora.py        AdaLoRA (an SVD-shaped low-rank update whose ranks are pruned to a budget)
    hra.py            HRA (the weight times a chain of learned Householder reflections)
    oft.py            OFT (a learned block-diagonal rotation of each linear's input)
    boft.py           BOFT (butterfly-factored orthogonal rotations of each linear's input, an output scale)
    qlora.py          QLoRA's recipes: LoftQ, merging into a 4-bit base
    full.py           full fine-tuning

base.py holds what they share (the adapter-layer protocol, targets, named adapters, merge and unload, the
`Method` entry), peft_format.py the PEFT folder format, registry.py the registry and the file dispatch.
"""

from .base import (
    Method,
    Option,
    adapter_configs,
    adapter_layers,
    count_parameters,
    delete_adapter,
    disable_adapters,
    find_targets,
    merge_adapter,
    merge_adapters,
    set_adapter,
    unload,
    unmerge_adapters,
)
from .lora import add_weighted_adapter, lora_plus_param_groups
from .peft_format import AdapterError
from .registry import REGISTRY, apply_method, get_method, load_adapter, register, save_adapter

__all__ = ["Method", "Option", "adapter_configs", "adapter_layers", "count_parameters", "delete_adapter", "disable_adapters",
           "find_targets", "merge_adapter", "merge_adapters", "set_adapter", "unload", "unmerge_adapters",
           "add_weighted_adapter", "lora_plus_param_groups", "AdapterError", "REGISTRY", "apply_method", "get_method",
           "load_adapter", "register", "save_adapter"]
