"""minicustom: LLM customization methods written by hand in PyTorch, on a minimal Llama-family model."""

from . import nf4
from .adapter import BottleneckConfig, apply_adapters
from .adapters_io import AdapterError, load_adapter, save_adapter
from .checkpoint import CheckpointError, load_model, save_model
from .config import ConfigError, ModelConfig
from .evaluate import EvalResult, evaluate_generation, evaluate_task
from .generate import generate
from .ia3 import IA3Config, apply_ia3
from .llama_adapter import LlamaAdapterConfig, apply_llama_adapter
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
from .prefix import PrefixConfig, apply_prefix
from .prompt import PromptTuningConfig, PTuningConfig, apply_p_tuning, apply_prompt_tuning
from .prompting import Shot, build_messages, select_shots
from .qlora import Linear4bit, apply_loftq, merge_4bit, quantize_model
from .tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "BottleneckConfig",
    "IA3Config",
    "LlamaAdapterConfig",
    "PrefixConfig",
    "PromptTuningConfig",
    "PTuningConfig",
    "apply_adapters",
    "apply_ia3",
    "apply_llama_adapter",
    "apply_p_tuning",
    "apply_prefix",
    "apply_prompt_tuning",
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
    "EvalResult",
    "evaluate_generation",
    "evaluate_task",
    "Shot",
    "build_messages",
    "select_shots",
]
