"""minicustom: LLM customization methods written by hand in PyTorch, on a minimal Llama-family model."""

from .checkpoint import CheckpointError, load_model, save_model
from .config import ConfigError, ModelConfig
from .evaluate import EvalResult, evaluate_generation, evaluate_task
from .generate import generate
from .gguf_export import ExportError, export_gguf, export_lora_gguf
from .methods import (
    AdapterError,
    add_weighted_adapter,
    count_parameters,
    delete_adapter,
    disable_adapters,
    load_adapter,
    lora_plus_param_groups,
    merge_adapter,
    merge_adapters,
    qlora,  # mc.qlora, as the README has used it: LoftQ, merge_4bit, memory_report
    save_adapter,
    set_adapter,
    unload,
    unmerge_adapters,
)
from .methods.adalora import AdaLoraConfig, apply_adalora
from .methods.boft import BOFTConfig, apply_boft
from .methods.bottleneck import BottleneckConfig, apply_adapters
from .methods.hra import HRAConfig, apply_hra
from .methods.ia3 import IA3Config, apply_ia3
from .methods.llama_adapter import LlamaAdapterConfig, apply_llama_adapter
from .methods.ln_tuning import LNTuningConfig, apply_ln_tuning
from .methods.loha import LoHaConfig, apply_loha
from .methods.lokr import LoKrConfig, apply_lokr
from .methods.lora import apply_lora
from .methods.lora_layers import LoraConfig
from .methods.oft import OFTConfig, apply_oft
from .methods.prefix import PrefixConfig, apply_prefix
from .methods.prompt_tuning import PromptTuningConfig, PTuningConfig, apply_p_tuning, apply_prompt_tuning
from .methods.qlora import apply_loftq, merge_4bit
from .methods.trainable_tokens import TrainableTokensConfig, apply_trainable_tokens
from .methods.vera import VeraConfig, apply_vera
from .model import KVCache, Transformer
from .prompting import Shot, build_messages, select_shots
from .quant import nf4
from .quant.linear4bit import Linear4bit, memory_report, quantize_model
from .reward_model import RewardModel, RewardModelError, load_reward_model, save_reward_model
from .tokenizer import Tokenizer, load_tokenizer
from .vocab import add_tokens

# The LoRA-era names of merging and unmerging, which fold every mergeable method (IA3 too).
merge_lora, unmerge_lora = merge_adapters, unmerge_adapters

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "ExportError",
    "export_gguf",
    "export_lora_gguf",
    "RewardModel",
    "RewardModelError",
    "load_reward_model",
    "save_reward_model",
    "AdaLoraConfig",
    "BOFTConfig",
    "BottleneckConfig",
    "HRAConfig",
    "IA3Config",
    "LlamaAdapterConfig",
    "LNTuningConfig",
    "LoHaConfig",
    "LoKrConfig",
    "OFTConfig",
    "PrefixConfig",
    "PromptTuningConfig",
    "PTuningConfig",
    "TrainableTokensConfig",
    "VeraConfig",
    "apply_adalora",
    "apply_adapters",
    "apply_boft",
    "apply_hra",
    "apply_ia3",
    "apply_llama_adapter",
    "apply_ln_tuning",
    "apply_loha",
    "apply_lokr",
    "apply_oft",
    "apply_p_tuning",
    "apply_prefix",
    "apply_prompt_tuning",
    "apply_trainable_tokens",
    "apply_vera",
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
    "merge_adapters",
    "unmerge_adapters",
    "memory_report",
    "qlora",
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
    "add_tokens",
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
