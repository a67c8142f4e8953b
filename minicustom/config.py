"""ModelConfig: the numbers that define a Llama-family decoder, read from a Hugging Face config.json.

One dataclass covers Llama 2/3, Mistral, Qwen2/2.5, Qwen3 and SmolLM/SmolLM2: they differ only in
q/k/v(/o) biases, per-head q/k RMSNorm (Qwen3), RoPE frequency scaling (Llama 3) and sliding-window
attention (Mistral v0.1, some Qwen2 configs). Any field that would change the math in a way the model
does not implement is refused here with an error naming the field, instead of giving wrong logits.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(ValueError):
    """A config.json that minicustom cannot honour exactly."""


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    model_type: str = "llama"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", "factor": ..., ...}
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # bias on q_proj, k_proj, v_proj
    o_bias: bool = False  # bias on o_proj
    mlp_bias: bool = False  # bias on gate_proj, up_proj, down_proj
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)  # "full_attention" | "sliding_attention" per layer
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if not self.layer_types:
            kind = "sliding_attention" if self.sliding_window else "full_attention"
            self.layer_types = [kind] * self.num_hidden_layers
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    # -- reading and writing config.json -------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> ModelConfig:
        def fail(msg):
            raise ConfigError(f"{source}: {msg}")

        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            fail(f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if not isinstance(d.get(key), int) or d[key] <= 0:
                fail(f"field {key!r} must be a positive integer, found {d.get(key)!r}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            fail(f"hidden_act {act!r} is not supported; only 'silu' (SwiGLU MLP)")
        n_heads = d["num_attention_heads"]
        n_kv = d.get("num_key_value_heads") or n_heads
        head_dim = d.get("head_dim") or d["hidden_size"] // n_heads

        # RoPE: transformers >= 5 writes `rope_parameters`, older files `rope_theta` + `rope_scaling`.
        rope = dict(d.get("rope_parameters") or {})
        rope_theta = float(rope.pop("rope_theta", d.get("rope_theta", 10000.0)))
        scaling = rope or d.get("rope_scaling") or None
        if scaling is not None:
            scaling = dict(scaling)
            rope_type = scaling.get("rope_type", scaling.get("type", "default"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                fail(f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
            if scaling.get("partial_rotary_factor", 1.0) != 1.0:
                fail("partial_rotary_factor != 1 is not supported")
            scaling["rope_type"] = rope_type
            scaling.pop("type", None)
            scaling = None if rope_type == "default" else scaling

        sliding_window = d.get("sliding_window")
        layer_types = list(d.get("layer_types") or [])
        if model_type in ("qwen2", "qwen3") and not layer_types:
            # transformers' rule: layers from max_window_layers on slide, if use_sliding_window is set.
            first = d.get("max_window_layers", d["num_hidden_layers"])
            use = d.get("use_sliding_window", False) and sliding_window
            layer_types = [
                "sliding_attention" if use and i >= first else "full_attention"
                for i in range(d["num_hidden_layers"])
            ]
        if model_type in ("qwen2", "qwen3") and "sliding_attention" not in layer_types:
            sliding_window = None
        unknown = set(layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            fail(f"layer_types contains {sorted(unknown)}; supported: full_attention, sliding_attention")

        attention_bias = bool(d.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv,
            head_dim=head_dim,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=attention_bias if model_type in ("llama", "qwen3") else False,
            mlp_bias=bool(d.get("mlp_bias", False)) if model_type == "llama" else False,
            qk_norm=model_type == "qwen3",
            sliding_window=sliding_window,
            layer_types=layer_types,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face checkpoint folder)")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict:
        """The Hugging Face config.json for this model (what transformers writes, in the older schema)."""
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[self.model_type]
        d = {
            "architectures": [arch],
            "model_type": self.model_type,
            "hidden_act": "silu",
            **{k: v for k, v in asdict(self).items()
               if k not in ("model_type", "qkv_bias", "o_bias", "qk_norm")},
            "attention_bias": self.o_bias if self.model_type in ("llama", "qwen3") else self.qkv_bias,
            "use_sliding_window": "sliding_attention" in self.layer_types,
        }
        if self.model_type in ("qwen2", "qwen3"):
            d["max_window_layers"] = next(
                (i for i, t in enumerate(self.layer_types) if t == "sliding_attention"), self.num_hidden_layers
            )
        return d

    def fingerprint(self) -> str:
        """A short, stable identity of the architecture (shapes and math), for matching adapters to bases."""
        keys = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim")
        blob = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    # -- derived ------------------------------------------------------------------------------------
    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies theta_i = base^(-2i/hs), i < hs/2, with the configured scaling, fp32."""
        hs = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, hs, 2, dtype=torch.int64).float() / hs))
        s = self.rope_scaling
        if s is None:
            return inv
        if s["rope_type"] == "linear":  # position interpolation: positions / factor
            return inv / s["factor"]
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate in between.
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_ctx = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_ctx / hi) & ~(wavelen > old_ctx / lo)
        return torch.where(medium, smoothed, scaled)
