"""ModelConfig: the numbers that define a Llama-family decoder, read from a Hugging Face config.json.

One dataclass covers Llama 2/3, Mistral, Qwen2/2.5, Qwen3 and SmolLM/SmolLM2: they differ only in
q/k/v(/o) biases, per-head q/k RMSNorm (Qwen3), RoPE frequency scaling (Llama 3) and sliding-window
attention (Mistral v0.1, some Qwen2 configs). Any field that would change the math in a way the model
does not implement is refused here with an error naming the field, instead of giving wrong logits,
and so is every field read that has the wrong type or range: a quoted number, a NaN, a zero epsilon,
or the string "false" where a boolean belongs (bool("false") is True: it once silently tied lm_head).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .files import read_json

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
        """Check every field read (type, range, finiteness; booleans strictly), then build the config.
        A null is the field's default, as in transformers; a string where a number belongs is refused,
        not converted (a hand edit that quoted a number may have meant something else)."""
        def fail(msg):
            raise ConfigError(f"{source}: {msg}")

        if not isinstance(d, dict):
            fail(f"expected a JSON object, found {_json_type(d)}")
        field_ = _Fields(d, fail)
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            fail(f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        sizes = {k: field_.positive_int(k, most=_MAX_LAYERS if k == "num_hidden_layers" else _MAX_SIZE) for k in
                 ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")}
        act = d.get("hidden_act", "silu")
        if act != "silu":
            fail(f"hidden_act {act!r} is not supported; only 'silu' (SwiGLU MLP)")
        n_layers, n_heads = sizes["num_hidden_layers"], sizes["num_attention_heads"]
        n_kv = field_.positive_int("num_key_value_heads", n_heads)
        head_dim = field_.positive_int("head_dim", sizes["hidden_size"] // n_heads)
        if head_dim % 2:
            fail(f"field 'head_dim' (default hidden_size / num_attention_heads) must be even: RoPE rotates "
                 f"pairs of dimensions; found {head_dim}")

        # RoPE: transformers >= 5 writes `rope_parameters`, older files `rope_theta` + `rope_scaling`.
        params = field_.optional("rope_parameters", dict) or {}
        theta_from = _Fields(params, fail, "rope_parameters.") if "rope_theta" in params else field_
        rope_theta = theta_from.positive_float("rope_theta", 10000.0)
        rope = {k: v for k, v in params.items() if k != "rope_theta"}
        scaling_field = "rope_parameters" if rope else "rope_scaling"
        scaling = rope or field_.optional("rope_scaling", dict) or None
        if scaling is not None:
            scaling = _rope_scaling(dict(scaling), scaling_field, fail)

        sliding_window = field_.positive_int("sliding_window", None)
        use_sliding = field_.boolean("use_sliding_window", False)
        layer_types = field_.optional("layer_types", list) or []
        if not all(isinstance(t, str) for t in layer_types):
            fail(f"field 'layer_types' must be a list of strings, found {layer_types!r}")
        if model_type in ("qwen2", "qwen3") and not layer_types:
            # transformers' rule: layers from max_window_layers on slide, if use_sliding_window is set.
            first = field_.non_negative_int("max_window_layers", n_layers)
            use = use_sliding and sliding_window
            layer_types = ["sliding_attention" if use and i >= first else "full_attention" for i in range(n_layers)]
        if model_type in ("qwen2", "qwen3") and "sliding_attention" not in layer_types:
            sliding_window = None
        unknown = set(layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            fail(f"layer_types contains {sorted(unknown)}; supported: full_attention, sliding_attention")

        attention_bias = field_.boolean("attention_bias", False)
        values = dict(
            model_type=model_type,
            **sizes,
            num_key_value_heads=n_kv,
            head_dim=head_dim,
            max_position_embeddings=field_.positive_int("max_position_embeddings", 2048),
            rms_norm_eps=field_.positive_float("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            tie_word_embeddings=field_.boolean("tie_word_embeddings", False),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=attention_bias if model_type in ("llama", "qwen3") else False,
            mlp_bias=field_.boolean("mlp_bias", False) and model_type == "llama",
            qk_norm=model_type == "qwen3",
            sliding_window=sliding_window,
            layer_types=layer_types,
            bos_token_id=field_.token_ids("bos_token_id", sizes["vocab_size"]),
            eos_token_id=field_.token_ids("eos_token_id", sizes["vocab_size"]),
            pad_token_id=field_.token_ids("pad_token_id", sizes["vocab_size"], lists=False, lowest=-1),  # -1: none
        )
        try:
            return cls(**values)
        except ConfigError as e:  # __post_init__'s checks, which know no file
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face checkpoint folder)")
        return cls.from_dict(read_json(path, ConfigError), source=str(path))

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


def _json_type(value) -> str:
    """A value's type in JSON's words, for messages about a file the user wrote."""
    for kind, name in ((bool, "a boolean"), (int, "a number"), (float, "a number"), (str, "a string"),
                       (list, "an array"), (dict, "an object"), (type(None), "null")):
        if isinstance(value, kind):
            return f"{name} ({value!r})" if kind in (int, float, str, bool) else name
    return type(value).__name__


# Upper bounds that no real model reaches, so that a corrupted size fails here, naming its field, instead of
# overflowing or allocating a 10^9-entry layer list while the model is built.
_MAX_SIZE = 2**31 - 1
_MAX_LAYERS = 2**16
_REQUIRED = object()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is no number


def _is_number(v) -> bool:
    """A finite JSON number (json.loads accepts NaN and Infinity, and integers beyond any float)."""
    try:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    except OverflowError:
        return False


class _Fields:
    """Typed reads of a config dict's fields, named `prefix + key` in messages. A missing field or a null
    gives the default; without a default the field is required."""

    def __init__(self, d: dict, fail, prefix: str = ""):
        self.d, self.fail, self.prefix = d, fail, prefix

    def _get(self, key, default):
        """(absent, value): absent means the default stands."""
        value = self.d.get(key)
        if value is None and default is _REQUIRED:
            self.fail(f"field '{self.prefix}{key}' is missing")
        return (True, default) if value is None else (False, value)

    def _bad(self, key, expected, value):
        self.fail(f"field '{self.prefix}{key}' must be {expected}, found {_json_type(value)}")

    def positive_int(self, key, default=_REQUIRED, most: int = _MAX_SIZE):
        absent, v = self._get(key, default)
        if not absent and (not _is_int(v) or not 0 < v <= most):
            self._bad(key, f"a positive integer up to {most:,}", v)
        return v

    def non_negative_int(self, key, default=_REQUIRED):
        absent, v = self._get(key, default)
        if not absent and (not _is_int(v) or not 0 <= v <= _MAX_SIZE):
            self._bad(key, f"a non-negative integer up to {_MAX_SIZE:,}", v)
        return v

    def positive_float(self, key, default=_REQUIRED):
        absent, v = self._get(key, default)
        if not absent and (not _is_number(v) or v <= 0):
            self._bad(key, "a positive finite number", v)
        return float(v)

    def boolean(self, key, default: bool) -> bool:
        absent, v = self._get(key, default)
        if not isinstance(v, bool):  # "false" is a non-empty string: bool() would read it as True
            self._bad(key, "a boolean (true or false)", v)
        return v

    def optional(self, key, kind):
        absent, v = self._get(key, None)
        if not absent and not isinstance(v, kind):
            self._bad(key, {dict: "an object", list: "a list (JSON array)"}[kind] + " or null", v)
        return v

    def token_ids(self, key, vocab_size: int, lists: bool = True, lowest: int = 0):
        """A token id in [lowest, vocab_size), or a non-empty list of them when `lists`: an EOS id the
        model can never produce would make generation run to its limit every time."""
        absent, v = self._get(key, None)
        ids = v if lists and isinstance(v, list) and v else [v]
        if not absent and not all(_is_int(i) and lowest <= i < vocab_size for i in ids):
            self._bad(key, f"an integer token id in [{lowest}, {vocab_size})" + (" or a list of them" if lists else ""), v)
        return v


def _rope_scaling(scaling: dict, where: str, fail) -> dict | None:
    """The checked RoPE scaling (None for plain RoPE); `where` names the field in messages."""
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if not isinstance(rope_type, str):
        fail(f"field '{where}.rope_type' must be a string, found {_json_type(rope_type)}")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        fail(f"field '{where}.rope_type': rope type {rope_type!r} is not supported; supported: "
             f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        fail("partial_rotary_factor != 1 is not supported")
    scaling["rope_type"] = rope_type
    scaling.pop("type", None)
    if rope_type == "default":
        return None
    fields = _Fields(scaling, lambda msg: fail(f"{msg} ({rope_type} RoPE scaling)"), where + ".")
    scaling["factor"] = fields.positive_float("factor")
    if rope_type == "llama3":
        scaling.update(low_freq_factor=fields.positive_float("low_freq_factor"),
                       high_freq_factor=fields.positive_float("high_freq_factor"),
                       original_max_position_embeddings=fields.positive_int("original_max_position_embeddings"))
    if rope_type == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        # inv_freq interpolates over 1 / (high - low): equal factors divide by zero
        fail(f"field '{where}.high_freq_factor' ({scaling['high_freq_factor']}) must be greater than "
             f"low_freq_factor ({scaling['low_freq_factor']})")
    return scaling
