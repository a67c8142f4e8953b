"""minicustom: LLM customization methods written by hand in PyTorch, on a minimal Llama-family model."""

from . import nf4
from .adapters_io import AdapterError, load_adapter, save_adapter
from .checkpoint import CheckpointError, load_model, save_model
from .config import ConfigError, ModelConfig
from .generate import generate
from .lora import (
    LoraConfig,
    add_weighted_adapter,
    apply_lora,
    count_parameters,
    delete_adapter,
    disable_adapters,
    lora_plus_param_groups,
    merge_adapter,
    merge_lora,
    set_adapter,
    unload,
    unmerge_lora,
)
from .model import KVCache, Transformer
from .qlora import Linear4bit, apply_loftq, merge_4bit, quantize_model
from .tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "LoraConfig",
    "add_weighted_adapter",
    "apply_lora",
    "count_parameters",
    "delete_adapter",
    "disable_adapters",
    "load_adapter",
    "lora_plus_param_groups",
    "merge_adapter",
    "merge_lora",
    "save_adapter",
    "set_adapter",
    "unload",
    "unmerge_lora",
    "CheckpointError",
    "ConfigError",
    "KVCache",
    "ModelConfig",
    "Tokenizer",
    "Transformer",
    "generate",
    "load_model",
    "load_tokenizer",
    "save_model",
    "nf4",
    "Linear4bit",
    "apply_loftq",
    "merge_4bit",
    "quantize_model",
]
