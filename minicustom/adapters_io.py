"""Adapter folders in PEFT's format: adapter_config.json + adapter_model.safetensors.

File keys are "base_model.model." + module name + the layer's own key ("lora_A.weight",
"lora_B.weight", "lora_magnitude_vector", "lora_embedding_A", ...); the adapter's name never appears
in the file, as in PEFT. `load_adapter` dispatches on the config's `peft_type`, so later methods plug
in by adding a loader. Everything is checked before the model is touched: keys that match no module,
ranks that disagree with the config, shapes that do not fit, a corrupt file, NaN or Inf in a tensor, a
config field of the wrong type or range (`check_fields`), a targeted module with no tensors, or an adapter
recorded as trained on another base (the base's config fingerprint is kept in the safetensors metadata,
which PEFT ignores) are errors, never a silent partial load.

PiSSA and OLoRA change the base weights at init (W0 -> W0 - s B0 A0). Saving such an adapter writes
PEFT's conversion instead, a plain LoRA of rank 2r that applies to the original base:
A' = [A; A0], B' = [B, -B0], alpha doubled (× √2 with rsLoRA) so the scaling is unchanged.
"""

from __future__ import annotations

import importlib
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .files import atomic_write_all, read_json
from .lora import (
    LoraConfig,
    LoRAEmbedding,
    LoRALinear,
    TrainableCopy,
    _replace,
    adapter_layers,
    find_targets,
    set_adapter,
)
from .qlora import Linear4bit

PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_INITS_TO_PEFT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}
# PEFT options that change the math in ways minicustom does not implement: (field, harmless value).
_UNSUPPORTED = (("fan_in_fan_out", False), ("bias", "none"), ("lora_bias", False), ("use_qalora", False),
                ("layer_replication", None), ("target_parameters", None), ("trainable_token_indices", None),
                ("alora_invocation_tokens", None), ("use_bdlora", None), ("exclude_modules", None))


class AdapterError(ValueError):
    """An adapter folder that does not fit the model it is loaded into."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_regex(v) -> bool:
    try:
        re.compile(v)
    except (re.error, TypeError):
        return False
    return True


def _is_names(v) -> bool:
    return _is_regex(v) if isinstance(v, str) else isinstance(v, list) and all(isinstance(x, str) for x in v)


# A field kind -> (test of a present, non-null value, what the message says it must be).
KINDS = {
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "positive int": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "number": (_is_number, "a finite number"),
    "dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "names": (_is_names, "a module name regex (string) or a list of module names"),
    "name list": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of module names"),
    "layers": (lambda v: (_is_int(v) and v >= 0) or (isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v)),
               "a layer index or a list of layer indices"),
    "ranks": (lambda v: isinstance(v, dict) and all(_is_regex(k) and _is_int(x) and x > 0 for k, x in v.items()),
              "an object mapping module name regexes to positive integers"),
    "numbers": (lambda v: isinstance(v, dict) and all(_is_regex(k) and _is_number(x) for k, x in v.items()),
                "an object mapping module name regexes to finite numbers"),
    "bool or str": (lambda v: isinstance(v, (bool, str)), "true, false or a string"),
    "object": (lambda v: isinstance(v, dict), "a JSON object"),
}
# Fields every PEFT adapter_config.json may carry, whatever its peft_type.
COMMON_FIELDS = {"peft_type": "str", "task_type": "str", "inference_mode": "bool", "base_model_name_or_path": "str",
                 "revision": "str", "peft_version": "str", "auto_mapping": "object"}


def check_fields(config: dict, file: Path, spec: dict[str, str]):
    """Each field of `spec` that `config` holds (null counts as absent: PEFT's default) is of its kind;
    an AdapterError naming the file and the field otherwise."""
    for key, kind in spec.items():
        value = config.get(key)
        ok, expected = KINDS[kind]
        if value is not None and not ok(value):
            found = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
            raise AdapterError(f"{file}: field {key!r} must be {expected}, found {found}")


def check_finite(tensors: dict[str, torch.Tensor], file: Path):
    """An AdapterError naming the first tensor of `file` that is not floating point or holds NaN or Inf."""
    for key, t in sorted(tensors.items()):
        if not t.is_floating_point():
            raise AdapterError(f"{file}: tensor {key} has dtype {str(t.dtype).removeprefix('torch.')}; adapter "
                               "tensors are floating point")
        if not (finite := torch.isfinite(t.float())).all():
            raise AdapterError(f"{file}: tensor {key} holds {int((~finite).sum())} NaN or Inf values "
                               f"(of {t.numel()})")


def read_tensors(file: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a safetensors file, with an AdapterError for a corrupt file or a NaN/Inf."""
    try:
        with safe_open(file, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise AdapterError(f"{file}: cannot read safetensors file (truncated or corrupt?): {e}") from None
    check_finite(tensors, file)
    return tensors, meta


def _fingerprint_meta(model) -> dict[str, str]:
    c = model.config
    return {"minicustom_base_fingerprint": c.fingerprint(),
            "minicustom_base": f"{c.model_type} hidden={c.hidden_size} layers={c.num_hidden_layers} "
                               f"heads={c.num_attention_heads}/{c.num_key_value_heads} vocab={c.vocab_size}"}


# -- saving ---------------------------------------------------------------------------------------

def _lora_peft_config(config: LoraConfig, module_names: list[str], converted: bool) -> dict:
    targets = config.targets
    if targets == "all-linear" or not isinstance(targets, str):
        targets = sorted({n.rsplit(".", 1)[-1] for n in module_names})  # PEFT writes the leaf names
    r, alpha = config.r, config.alpha
    rank_pattern, alpha_pattern = dict(config.rank_pattern), dict(config.alpha_pattern)
    if converted:  # rank 2r; keep s = alpha / r (or alpha / √r)
        grow = math.sqrt(2) if config.use_rslora else 2
        r, alpha = 2 * r, alpha * grow
        rank_pattern = {k: 2 * v for k, v in rank_pattern.items()}
        alpha_pattern = {k: v * grow for k, v in alpha_pattern.items()}
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
        "lora_dropout": config.dropout, "target_modules": targets, "use_rslora": config.use_rslora,
        "use_dora": config.use_dora, "init_lora_weights": True if converted else _INITS_TO_PEFT[config.init],
        "layers_to_transform": config.layers, "layers_pattern": "layers" if config.layers is not None else None,
        "modules_to_save": config.modules_to_save, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": None,
    }


def _lora_to_peft(model: nn.Module, adapter_name: str):
    state, lora_modules, converted = {}, [], False
    for name, layer in adapter_layers(model):
        if adapter_name not in layer.adapters:
            continue
        tensors = layer.adapter_state(adapter_name)
        if isinstance(layer, LoRALinear) and adapter_name in layer.initial:
            A0, B0 = layer.initial[adapter_name]
            tensors = {"lora_A.weight": torch.cat([tensors["lora_A.weight"], A0], dim=0),  # (2r, in)
                       "lora_B.weight": torch.cat([tensors["lora_B.weight"], -B0], dim=1)}  # (out, 2r)
            converted = True
        if not isinstance(layer, TrainableCopy):
            lora_modules.append(name)
        state.update({f"{PREFIX}{name}.{k}": v.detach().contiguous().cpu() for k, v in tensors.items()})
    return _lora_peft_config(model.adapter_configs[adapter_name], lora_modules, converted), state, {}


# peft_type -> the minicustom module that reads and writes it
_MODULES = {"IA3": "ia3", "PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt", "P_TUNING": "prompt",
            "ADAPTION_PROMPT": "llama_adapter", "BOTTLENECK_ADAPTER": "adapter"}
SUPPORTED = ("LORA", *_MODULES)


def _method(peft_type: str):
    """What reads and writes adapters of `peft_type`: an object with to_peft(model, name) ->
    (adapter_config dict, tensors, extra files {file name: tensors}) and load_peft(model, path, config,
    tensors, name), which checks everything before it touches the model; None if unsupported."""
    if peft_type == "LORA":
        return _LORA
    return importlib.import_module(f".{_MODULES[peft_type]}", __package__) if peft_type in _MODULES else None


def save_adapter(model: nn.Module, path, adapter_name: str = "default", base_model_name_or_path: str | None = None):
    """Write one adapter as a PEFT folder, all or nothing: every file goes to a temp file first and they are
    renamed into place only when all are written, adapter_config.json last."""
    configs = getattr(model, "adapter_configs", {})
    if adapter_name not in configs:
        raise ValueError(f"no adapter named {adapter_name!r}; adapters: {sorted(configs)}")
    peft, state, extra = _method(configs[adapter_name].peft_type).to_peft(model, adapter_name)
    peft["base_model_name_or_path"] = base_model_name_or_path
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", **_fingerprint_meta(model)}
    writes = []
    for file, tensors in {**extra, WEIGHTS_FILE: state}.items():
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        writes.append((path / file, lambda tmp, t=tensors: save_file(t, tmp, metadata=meta)))
    text = json.dumps(peft, indent=2, ensure_ascii=False) + "\n"
    atomic_write_all([*writes, (path / CONFIG_FILE, lambda tmp: tmp.write_text(text))])
    return path


# -- loading --------------------------------------------------------------------------------------

def read_adapter(path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(adapter_config.json, tensors, safetensors metadata) of an adapter folder, with clear errors."""
    path = Path(path)
    cfg_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE} (expected a PEFT adapter folder)")
    config = read_json(cfg_file, AdapterError)  # UTF-8, JSON, nesting and repeated keys, naming the file
    if not isinstance(config, dict):
        raise AdapterError(f"{cfg_file}: expected a JSON object, found {type(config).__name__}")
    if not weights.exists():
        raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE}" + (
            " (adapter_model.bin is pickle and is not read)" if (path / "adapter_model.bin").exists() else ""))
    tensors, meta = read_tensors(weights)
    return config, tensors, meta


def load_adapter(model: nn.Module, path, adapter_name: str = "default", is_trainable: bool = False) -> nn.Module:
    """Attach the adapter saved at `path` (PEFT format) under `adapter_name` and activate it."""
    config, tensors, meta = read_adapter(path)
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or _method(peft_type) is None:
        raise NotImplementedError(f"{Path(path) / CONFIG_FILE}: peft_type {peft_type!r} is not supported; "
                                  f"supported: {', '.join(SUPPORTED)}")
    check_fields(config, Path(path) / CONFIG_FILE, COMMON_FIELDS)
    if getattr(model, "adapter_configs", {}).get(adapter_name) is not None:
        raise ValueError(f"an adapter named {adapter_name!r} already exists; load under another adapter_name")
    base = meta.get("minicustom_base_fingerprint")
    if base is not None and base != model.config.fingerprint():
        raise AdapterError(f"{path}: this adapter was trained on another base ({meta.get('minicustom_base')}); "
                           f"this model is {_fingerprint_meta(model)['minicustom_base']}")
    _method(peft_type).load_peft(model, Path(path), config, tensors, adapter_name)
    set_adapter(model, adapter_name)
    if not is_trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    return model


# adapter_config.json fields a LoRA folder is read with, and their kinds (check_fields).
_LORA_FIELDS = {"r": "positive int", "lora_alpha": "number", "lora_dropout": "dropout", "target_modules": "names",
                "use_rslora": "bool", "use_dora": "bool", "fan_in_fan_out": "bool", "lora_bias": "bool",
                "use_qalora": "bool", "layers_to_transform": "layers", "layers_pattern": "names",
                "modules_to_save": "name list", "rank_pattern": "ranks", "alpha_pattern": "numbers",
                "init_lora_weights": "bool or str", "bias": "str", "exclude_modules": "names"}
# init_lora_weights values whose adapter only fits a base rewritten at init (PEFT redoes the rewrite on
# load; minicustom does not): PEFT's conversion for the original base is a plain LoRA, saved with True.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")


def _lora_config_from_peft(config: dict, where: Path) -> LoraConfig:
    file = where / CONFIG_FILE
    check_fields(config, file, _LORA_FIELDS)
    for key, ok in _UNSUPPORTED:
        if config.get(key, ok) not in (ok, None, False, "none", [], {}):
            raise AdapterError(f"{file}: {key}={config[key]!r} is not supported")
    if not isinstance(config.get("r"), int) or config["r"] <= 0:
        raise AdapterError(f"{file}: field 'r' must be a positive integer, found {config.get('r')!r}")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise AdapterError(f"{file}: init_lora_weights={init!r} is not supported: such an adapter applies to a "
                           "base rewritten at init; save it with PEFT's path_initial_model_for_weight_conversion")
    layers, alpha = config.get("layers_to_transform"), config.get("lora_alpha")
    return LoraConfig(
        r=config["r"], alpha=float(8 if alpha is None else alpha), dropout=float(config.get("lora_dropout") or 0.0),
        targets=config.get("target_modules") or [], use_rslora=bool(config.get("use_rslora")),
        use_dora=bool(config.get("use_dora")), init="default",
        layers=[layers] if isinstance(layers, int) else layers, modules_to_save=config.get("modules_to_save"),
        rank_pattern=config.get("rank_pattern") or {}, alpha_pattern=config.get("alpha_pattern") or {},
    )


# Keys a LoRA layer owns, with the tensor shape each must have: (module kind, shape from (r, module)).
_LORA_KEYS = {
    "lora_A.weight": (nn.Linear, lambda r, m: (r, m.in_features)),
    "lora_B.weight": (nn.Linear, lambda r, m: (m.out_features, r)),
    "lora_magnitude_vector": (nn.Linear, lambda r, m: (m.out_features,)),
    "lora_embedding_A": (nn.Embedding, lambda r, m: (r, m.num_embeddings)),
    "lora_embedding_B": (nn.Embedding, lambda r, m: (m.embedding_dim, r)),
}


def _base_module(module):
    """The plain module under an adapter layer (LoRA layers expose in/out sizes themselves)."""
    return module.base() if isinstance(module, (LoRALinear, LoRAEmbedding, TrainableCopy)) else module


def _coverage(model: nn.Module, config: LoraConfig, per_module: dict, copies: dict) -> list[str]:
    """What the file lacks or holds beyond the config, as apply_lora would place this config: a LoRA for
    every linear or embedding that target_modules selects (modules_to_save excepted), none elsewhere, and
    every parameter of every modules_to_save copy. (No target_modules at all: the file's modules are taken.)"""
    problems, saved = [], config.modules_to_save or []
    if config.targets:
        selected = [n for n in find_targets(model, config.targets, config.layers)
                    if not any(n == s or n.endswith("." + s) for s in saved)]
        for name in selected:
            if name not in per_module and isinstance(_base_module(model.get_submodule(name)),
                                                     (nn.Linear, Linear4bit, nn.Embedding)):
                problems.append(f"{name}: selected by target_modules {config.targets!r} but {WEIGHTS_FILE} has no "
                                "LoRA tensors for it")
        problems += [f"{name}: {WEIGHTS_FILE} has LoRA tensors for it but target_modules {config.targets!r} does "
                     "not select it" for name in sorted(set(per_module) - set(selected))]
    for entry in saved:
        hits = [n for n, _ in model.named_modules() if n == entry or n.endswith("." + entry)]
        if not hits:
            problems.append(f"modules_to_save: no module named {entry!r}")
        for name in hits:
            want = {k: tuple(p.shape) for k, p in _base_module(model.get_submodule(name)).named_parameters()}
            found = {k: tuple(t.shape) for k, t in copies.get(name, {}).items()}
            if found != want:
                problems.append(f"{name} (modules_to_save): {WEIGHTS_FILE} holds {found or 'no tensors'}, "
                                f"expected {want}")
    return problems


def _load_lora(model: nn.Module, path: Path, peft: dict, tensors: dict, adapter_name: str):
    config = _lora_config_from_peft(peft, path)
    modules = dict(model.named_modules())
    per_module: dict[str, dict[str, torch.Tensor]] = {}
    copies: dict[str, dict[str, torch.Tensor]] = {}
    unmatched, problems = [], []
    saved = set(config.modules_to_save or [])
    for key, t in tensors.items():
        name = key.removeprefix(PREFIX)
        lora_key = next((k for k in _LORA_KEYS if name.endswith("." + k)), None)
        if lora_key is not None and name[: -len(lora_key) - 1] in modules:
            per_module.setdefault(name[: -len(lora_key) - 1], {})[lora_key] = t
            continue
        owner, _, param = name.rpartition(".")
        if owner.endswith(".base_layer") and owner[: -len(".base_layer")] in modules and isinstance(
                getattr(_base_module(modules[owner[: -len(".base_layer")]]), param, None), torch.Tensor):
            # PEFT stores the base embedding next to an embedding LoRA; it must be this model's.
            base = _base_module(modules[owner[: -len(".base_layer")]])
            if not torch.equal(getattr(base, param).detach().cpu().to(t.dtype), t):
                problems.append(f"{key}: the file's base matrix differs from this model's")
            continue
        if owner in modules and any(owner == s or owner.endswith("." + s) for s in saved):
            copies.setdefault(owner, {})[param] = t
            continue
        unmatched.append(key)
    if unmatched:
        raise AdapterError(f"{path / WEIGHTS_FILE}: {len(unmatched)} keys match no module of this model: "
                           + ", ".join(sorted(unmatched)[:20]))
    if not per_module:
        raise AdapterError(f"{path / WEIGHTS_FILE}: no LoRA tensors found")
    problems += _coverage(model, config, per_module, copies)
    plan = []
    for name, parts in sorted(per_module.items()):
        base = _base_module(modules[name])
        kind = _LORA_KEYS[next(iter(parts))][0]
        if not isinstance(base, (kind, Linear4bit) if kind is nn.Linear else kind):  # QLoRA bases are 4-bit
            problems.append(f"{name}: the file holds {kind.__name__} LoRA keys but the module is "
                            f"{type(base).__name__}")
            continue
        if kind is nn.Embedding and config.use_dora:
            problems.append(f"{name}: DoRA on an embedding is not supported")
            continue
        first = "lora_A.weight" if kind is nn.Linear else "lora_embedding_A"
        if first not in parts:
            problems.append(f"{name}: {first} is missing")
            continue
        if parts[first].dim() != 2:
            problems.append(f"{name}.{first}: shape {tuple(parts[first].shape)}, expected a matrix (r, ...)")
            continue
        r_file = parts[first].shape[0]
        r_cfg, alpha = config.rank_alpha(name)
        if r_file != r_cfg:
            problems.append(f"{name}: rank {r_file} in {WEIGHTS_FILE} but r={r_cfg} in {CONFIG_FILE}")
            continue
        wanted = ["lora_A.weight", "lora_B.weight"] if kind is nn.Linear else ["lora_embedding_A", "lora_embedding_B"]
        if config.use_dora and kind is nn.Linear:
            wanted.append("lora_magnitude_vector")
        for k in set(wanted) | set(parts):
            if k not in parts:
                problems.append(f"{name}.{k} is missing")
            elif k not in wanted:
                problems.append(f"{name}.{k} is not used by this config (use_dora={config.use_dora})")
            elif tuple(parts[k].shape) != _LORA_KEYS[k][1](r_file, base):
                problems.append(f"{name}.{k}: shape {tuple(parts[k].shape)}, expected "
                                f"{_LORA_KEYS[k][1](r_file, base)}")
        plan.append((name, r_file, alpha, parts))
    if problems:
        raise AdapterError(f"{path}: the adapter does not fit this model:\n  " + "\n  ".join(problems))

    # Checked: now change the model.
    for name, r, alpha, parts in plan:
        module = modules[name]
        if not isinstance(module, (LoRALinear, LoRAEmbedding)):
            module = LoRALinear(module) if isinstance(module, (nn.Linear, Linear4bit)) else LoRAEmbedding(module)
            _replace(model, name, module)
        module.add(adapter_name, r, alpha, config)
        with torch.no_grad():
            for k, t in parts.items():
                module.adapter_state(adapter_name)[k].copy_(t)
    for name, params in copies.items():
        module = modules[name] if isinstance(modules[name], TrainableCopy) else TrainableCopy(modules[name])
        module.add(adapter_name)
        with torch.no_grad():
            for k, t in params.items():
                module.adapter_state(adapter_name)[k].copy_(t)
        _replace(model, name, module)
    model.__dict__.setdefault("adapter_configs", {})[adapter_name] = config


_LORA = SimpleNamespace(to_peft=_lora_to_peft, load_peft=_load_lora)  # LoRA's file code is the rest of this file
