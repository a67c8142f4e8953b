"""minicustom: LLM customization methods written by hand in PyTorch, on a minimal Llama-family model."""

from .checkpoint import CheckpointError, load_model, save_model
from .config import ConfigError, ModelConfig
from .generate import generate
from .model import KVCache, Transformer
from .tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"

__all__ = [
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
]
