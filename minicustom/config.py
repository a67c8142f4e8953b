"""ModelConfig: the numbers that define a decoder of one of the supported families, read from a Hugging Face
config.json.

One dataclass covers Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM/SmolLM2, Gemma 2/3, Phi-3/Phi-4-mini,
Qwen3-MoE and Mixtral:
they differ in fields read in a few marked places of the model (biases, q/k norm, norm style, MLP
activation, fused projections, attention pattern, soft-capping, RoPE), listed in `model.py`'s docstring.
Any field that would change the math in a way the model
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

from .files import read_json

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "qwen3_moe", "mixtral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # SwiGLU; GeGLU with tanh-approximated GELU (Gemma)
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                 "phi3": "Phi3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}
GEMMA = ("gemma2", "gemma3_text")


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
    rope_scaling: dict | None = None  # {"rope_type": "linear" | "llama3" | "yarn" | "longrope", "factor": ..., ...}
    rope_local_theta: float | None = None  # Gemma 3: the RoPE base of the sliding-window layers
    partial_rotary_factor: float = 1.0  # Phi-4-mini: only the first head_dim * factor dims of a head rotate
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # bias on q_proj, k_proj, v_proj
    o_bias: bool = False  # bias on o_proj
    mlp_bias: bool = False  # bias on gate_proj, up_proj, down_proj
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    hidden_act: str = "silu"  # the MLP's gate activation: silu (SwiGLU) or gelu_pytorch_tanh (GeGLU)
    fused_projections: bool = False  # Phi-3: qkv_proj = [q; k; v] and gate_up_proj = [gate; up], as stored
    norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + w), multiplied in fp32 before the cast back
    embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden_size)
    sandwich_norms: bool = False  # Gemma 2/3: a norm after attention and after the MLP too
    query_pre_attn_scalar: float | None = None  # Gemma: scores scaled by this ** -0.5, not head_dim ** -0.5
    attn_logit_softcapping: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # Gemma 2: logits -> cap * tanh(logits / cap)
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)  # "full_attention" | "sliding_attention" per layer
    num_experts: int = 0  # Qwen3-MoE, Mixtral: experts per sparse layer (0: every layer is a dense MLP)
    num_experts_per_tok: int = 0  # k, the experts each token is routed to
    moe_intermediate_size: int = 0  # an expert's hidden width
    norm_topk_prob: bool = True  # renormalize the k routing weights to sum to 1 (Mixtral always)
    sparse_layers: list[bool] = field(default_factory=list)  # per layer: a MoE block (True) or a dense MLP
    router_aux_loss_coef: float = 0.0  # the load-balancing loss's weight in training...
    output_router_logits: bool = False  # ...which transformers adds only when this is set
    fused_experts: bool = False  # experts stored as 3-D parameters; set by the loader from the checkpoint's keys
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
        if not self.sparse_layers:
            self.sparse_layers = [self.num_experts > 0] * self.num_hidden_layers
        if self.rotary_dim % 2 or not self.rotary_dim:
            raise ConfigError(f"partial_rotary_factor {self.partial_rotary_factor} rotates {self.rotary_dim} of "
                              f"head_dim {self.head_dim} dims; RoPE rotates pairs, so that must be even and > 0")

    @property
    def rotary_dim(self) -> int:
        """The dims of each head that RoPE rotates (int(), as transformers truncates)."""
        return int(self.head_dim * self.partial_rotary_factor)

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
        gemma, phi3 = model_type in GEMMA, model_type == "phi3"
        act_field = "hidden_activation" if gemma else "hidden_act"
        act = d.get(act_field, "gelu_pytorch_tanh" if gemma else "silu")
        if act not in ACTIVATIONS:
            fail(f"{act_field} {act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
        n_layers, n_heads = sizes["num_hidden_layers"], sizes["num_attention_heads"]
        n_kv = field_.positive_int("num_key_value_heads", n_heads)
        head_dim = field_.positive_int("head_dim", sizes["hidden_size"] // n_heads)
        if head_dim % 2:
            fail(f"field 'head_dim' (default hidden_size / num_attention_heads) must be even: RoPE rotates "
                 f"pairs of dimensions; found {head_dim}")
        rope = _rope(d, field_, fail, model_type, head_dim)

        layer_types, sliding_window = _attention_pattern(field_, fail, model_type, n_layers)

        attention_bias = field_.boolean("attention_bias", False)
        moe = _experts(field_, fail, model_type, n_layers, sizes["intermediate_size"])
        scalar = field_.positive_float("query_pre_attn_scalar", 256.0) if gemma else None
        values = dict(
            model_type=model_type,
            **sizes,
            num_key_value_heads=n_kv,
            head_dim=head_dim,
            max_position_embeddings=field_.positive_int("max_position_embeddings", 2048),
            rms_norm_eps=field_.positive_float("rms_norm_eps", 1e-6),
            **rope,
            tie_word_embeddings=field_.boolean("tie_word_embeddings", gemma),
            qkv_bias=True if model_type == "qwen2" else attention_bias and model_type not in ("phi3", "mixtral"),
            o_bias=attention_bias if model_type in ("llama", "qwen3", "qwen3_moe", *GEMMA) else False,
            mlp_bias=field_.boolean("mlp_bias", False) and model_type == "llama",
            qk_norm=model_type in ("qwen3", "gemma3_text", "qwen3_moe"),
            hidden_act=act,
            fused_projections=phi3,
            norm_plus_one=gemma,
            embed_scale=gemma,
            sandwich_norms=gemma,
            query_pre_attn_scalar=scalar,
            # Gemma 2's caps default on (50, 30) when absent; an explicit null turns one off, as in transformers
            attn_logit_softcapping=field_.positive_float("attn_logit_softcapping", None) if "attn_logit_softcapping"
            in d else (50.0 if model_type == "gemma2" else None),
            final_logit_softcapping=field_.positive_float("final_logit_softcapping", None) if "final_logit_softcapping"
            in d else (30.0 if model_type == "gemma2" else None),
            sliding_window=sliding_window,
            layer_types=layer_types,
            **moe,
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
        gemma = self.model_type in GEMMA
        derived = ("model_type", "qkv_bias", "o_bias", "qk_norm", "hidden_act", "fused_projections", "norm_plus_one",
                   "embed_scale", "sandwich_norms", "rope_local_theta", "partial_rotary_factor",
                   "sparse_layers", "fused_experts",
                   "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping")
        d = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "hidden_activation" if gemma else "hidden_act": self.hidden_act,
            **{k: v for k, v in asdict(self).items() if k not in derived},
            "attention_bias": self.o_bias if self.model_type in ("llama", "qwen3") else self.qkv_bias,
            "use_sliding_window": "sliding_attention" in self.layer_types,
        }
        if self.model_type in ("qwen2", "qwen3"):
            d["max_window_layers"] = next(
                (i for i, t in enumerate(self.layer_types) if t == "sliding_attention"), self.num_hidden_layers
            )
        if gemma:  # transformers' dataclass wants an int where the value is one
            d.update({k: int(v) if isinstance(v, float) and v.is_integer() and k == "query_pre_attn_scalar" else v
                      for k, v in ((k, getattr(self, k)) for k in derived[-3:])})
        if self.model_type == "qwen3_moe":
            d.update(decoder_sparse_step=1, mlp_only_layers=[i for i, s in enumerate(self.sparse_layers) if not s])
        if self.model_type == "mixtral":  # its experts are intermediate_size wide; no dense layers
            d.update(num_local_experts=d.pop("num_experts"), intermediate_size=d.pop("moe_intermediate_size"))
        if not self.num_experts:
            for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                      "router_aux_loss_coef", "output_router_logits"):
                d.pop(k)
        if self.model_type == "gemma3_text":
            d["rope_local_base_freq"] = self.rope_local_theta
        if self.model_type == "phi3":  # transformers takes this top-level value over the scaling's own
            d["partial_rotary_factor"] = self.partial_rotary_factor
            d["original_max_position_embeddings"] = (self.rope_scaling or {}).get(
                "original_max_position_embeddings", self.max_position_embeddings)
        return d

    def fingerprint(self) -> str:
        """A short, stable identity of the architecture (shapes and math), for matching adapters to bases."""
        keys = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim")
        blob = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


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

    def non_negative_float(self, key, default=_REQUIRED):
        absent, v = self._get(key, default)
        if not absent and (not _is_number(v) or v < 0):
            self._bad(key, "a non-negative finite number", v)
        return None if v is None else float(v)

    def positive_float(self, key, default=_REQUIRED):
        absent, v = self._get(key, default)
        if not absent and (not _is_number(v) or v <= 0):
            self._bad(key, "a positive finite number", v)
        return None if v is None else float(v)

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


def _attention_pattern(field_: _Fields, fail, model_type: str, n_layers: int) -> tuple[list[str], int | None]:
    """layer_types (full or sliding attention per layer) and the window, by each family's rule when the file
    lists no layer_types."""
    gemma = model_type in GEMMA
    sliding_window = field_.positive_int("sliding_window", 4096 if gemma else None)  # transformers' defaults
    use_sliding = field_.boolean("use_sliding_window", False)
    layer_types = field_.optional("layer_types", list) or []
    if not all(isinstance(t, str) for t in layer_types):
        fail(f"field 'layer_types' must be a list of strings, found {layer_types!r}")
    if model_type in ("qwen2", "qwen3") and not layer_types:
        # transformers' rule: layers from max_window_layers on slide, if use_sliding_window is set.
        first = field_.non_negative_int("max_window_layers", n_layers)
        use = use_sliding and sliding_window
        layer_types = ["sliding_attention" if use and i >= first else "full_attention" for i in range(n_layers)]
    if model_type == "qwen3_moe" and not layer_types:  # transformers: every layer slides, or none
        kind = "sliding_attention" if use_sliding and sliding_window else "full_attention"
        layer_types = [kind] * n_layers
    if gemma and not layer_types:  # every `pattern`-th layer is global, the others slide
        pattern = 2 if model_type == "gemma2" else field_.positive_int("sliding_window_pattern", 6)
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
    if gemma and field_.boolean("use_bidirectional_attention", False):
        fail("field 'use_bidirectional_attention': bidirectional attention (an embedding model) is not "
             "supported; only causal decoders")
    if model_type in ("qwen2", "qwen3", "qwen3_moe", *GEMMA) and "sliding_attention" not in layer_types:
        sliding_window = None
    if "sliding_attention" in layer_types and sliding_window is None:
        fail("layer_types has sliding_attention layers but field 'sliding_window' is missing")
    unknown = set(layer_types) - {"full_attention", "sliding_attention"}
    if unknown:
        fail(f"field 'layer_types' contains {sorted(unknown)}; supported: full_attention, sliding_attention")
    return layer_types, sliding_window


def _experts(field_: _Fields, fail, model_type: str, n_layers: int, intermediate_size: int) -> dict:
    """The Mixture-of-Experts fields of Qwen3-MoE and Mixtral (none for dense families), checked."""
    if model_type not in ("qwen3_moe", "mixtral"):
        return {}
    mixtral = model_type == "mixtral"
    # transformers maps num_experts to num_local_experts in both families and writes the latter
    count = "num_local_experts" if "num_local_experts" in field_.d else "num_experts"
    E = field_.positive_int(count, 8 if mixtral else 128)
    k = field_.positive_int("num_experts_per_tok", 2 if mixtral else 8)
    if k > E:
        fail(f"field 'num_experts_per_tok' ({k}) must be at most the number of experts, '{count}' ({E})")
    if mixtral and field_.non_negative_float("router_jitter_noise", 0.0):
        fail("field 'router_jitter_noise': router jitter (noise on the router's input while training) is not "
             "supported; only 0")
    step = 1 if mixtral else field_.positive_int("decoder_sparse_step", 1)
    dense = [] if mixtral else field_.optional("mlp_only_layers", list) or []
    if not all(_is_int(i) and 0 <= i < n_layers for i in dense):
        fail(f"field 'mlp_only_layers' must list layer indices in [0, {n_layers}), found {dense!r}")
    coef = field_.non_negative_float("router_aux_loss_coef", 0.001)
    return dict(
        num_experts=E, num_experts_per_tok=k,
        moe_intermediate_size=intermediate_size if mixtral else field_.positive_int("moe_intermediate_size", 768),
        norm_topk_prob=True if mixtral else field_.boolean("norm_topk_prob", False),
        sparse_layers=[i not in dense and (i + 1) % step == 0 for i in range(n_layers)],
        router_aux_loss_coef=coef, output_router_logits=field_.boolean("output_router_logits", False),
    )


def _rope(d: dict, field_: _Fields, fail, model_type: str, head_dim: int) -> dict:
    """rope_theta, rope_scaling (of the full-attention layers), rope_local_theta (Gemma 3's sliding layers) and
    partial_rotary_factor, from either schema: transformers >= 5 writes `rope_parameters` (one per layer kind
    for Gemma 3), older files `rope_theta` + `rope_scaling` (+ `rope_local_base_freq`, `partial_rotary_factor`)."""
    params, where, local_theta = field_.optional("rope_parameters", dict) or {}, "rope_parameters", None
    if model_type == "gemma3_text" and {"full_attention", "sliding_attention"} & set(params):
        local = params.get("sliding_attention") or {}
        params, where = params.get("full_attention") or {}, "rope_parameters.full_attention"
        for kind, value in (("sliding_attention", local), ("full_attention", params)):
            if not isinstance(value, dict):
                fail(f"field 'rope_parameters.{kind}' must be an object, found {_json_type(value)}")
        if local.get("rope_type", local.get("type", "default")) != "default":
            fail("field 'rope_parameters.sliding_attention.rope_type': only plain RoPE is supported on the "
                 f"sliding layers, found {local.get('rope_type', local.get('type'))!r}")
        local_theta = _Fields(local, fail, "rope_parameters.sliding_attention.").positive_float("rope_theta", 1e4)
    elif model_type == "gemma3_text":
        local_theta = field_.positive_float("rope_local_base_freq", 1e4)
    theta_from = _Fields(params, fail, where + ".") if "rope_theta" in params else field_
    theta = theta_from.positive_float("rope_theta", 1e6 if model_type == "gemma3_text" else 1e4)
    factor_from = _Fields(params, fail, where + ".") if "partial_rotary_factor" in params else field_
    partial = factor_from.positive_float("partial_rotary_factor", 1.0)
    if partial > 1 or (partial != 1 and model_type != "phi3"):
        fail(f"field 'partial_rotary_factor' must be at most 1, and below 1 only for phi3 (the family whose "
             f"attention rotates part of each head); found {partial} for {model_type}")
    if int(head_dim * partial) % 2 or not int(head_dim * partial):
        fail(f"field 'partial_rotary_factor' ({partial}) rotates int({head_dim} * {partial}) = "
             f"{int(head_dim * partial)} dims of each head; RoPE rotates pairs, so that must be even and > 0")
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    scaling_field = where if scaling else "rope_scaling"
    scaling = scaling or field_.optional("rope_scaling", dict)
    if scaling:
        scaling = _rope_scaling(dict(scaling), scaling_field, fail, field_, model_type, int(head_dim * partial) // 2)
    return dict(rope_theta=theta, rope_scaling=scaling or None, rope_local_theta=local_theta,
                partial_rotary_factor=partial)


def _rope_scaling(scaling: dict, where: str, fail, top: _Fields, model_type: str, bands: int) -> dict | None:
    """The checked RoPE scaling (None for plain RoPE); `where` names the field in messages, `top` reads the
    config's top level, `bands` is the number of rotated pairs (longrope has a factor for each)."""
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if not isinstance(rope_type, str):
        fail(f"field '{where}.rope_type' must be a string, found {_json_type(rope_type)}")
    if model_type == "phi3" and rope_type in ("su", "yarn"):
        rope_type = "longrope"  # transformers' Phi3Config reads both as longrope
    if rope_type not in SUPPORTED_ROPE_TYPES:
        fail(f"field '{where}.rope_type': rope type {rope_type!r} is not supported; supported: "
             f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    scaling["rope_type"] = rope_type
    scaling.pop("type", None)
    if rope_type == "default":
        return None
    fields = _Fields(scaling, lambda msg: fail(f"{msg} ({rope_type} RoPE scaling)"), where + ".")
    max_pos = top.positive_int("max_position_embeddings", 2048)
    if rope_type != "linear":  # as transformers: a top-level value wins (Phi-3 keeps it there, default 4096)
        old = top.positive_int("original_max_position_embeddings", 4096 if model_type == "phi3" else None)
        old = old or fields.positive_int("original_max_position_embeddings",
                                         _REQUIRED if rope_type == "llama3" else max_pos)
        scaling["original_max_position_embeddings"] = old
    implied = max_pos / scaling.get("original_max_position_embeddings", max_pos)
    scaling["factor"] = fields.positive_float("factor", implied if rope_type == "longrope" else _REQUIRED)
    if rope_type == "llama3":
        scaling.update(low_freq_factor=fields.positive_float("low_freq_factor"),
                       high_freq_factor=fields.positive_float("high_freq_factor"))
        if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
            # inv_freq interpolates over 1 / (high - low): equal factors divide by zero
            fail(f"field '{where}.high_freq_factor' ({scaling['high_freq_factor']}) must be greater than "
                 f"low_freq_factor ({scaling['low_freq_factor']})")
    optional = ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")
    for name in optional[:1 if rope_type != "yarn" else None]:
        if scaling.get(name) is not None:
            scaling[name] = fields.positive_float(name)
    if rope_type == "yarn":
        scaling["truncate"] = fields.boolean("truncate", True)
    for name in ("short_factor", "long_factor") if rope_type == "longrope" else ():
        value = scaling.get(name)
        if not (isinstance(value, list) and len(value) == bands and all(_is_number(v) and v > 0 for v in value)):
            found = f"{len(value)} entries" if isinstance(value, list) else _json_type(value)
            fail(f"field '{where}.{name}' must be a list of {bands} positive numbers (one per rotated pair of "
                 f"head dims), found {found} (longrope RoPE scaling)")
    return scaling
