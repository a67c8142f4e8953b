"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021, arXiv:2106.09685).

A frozen linear layer W0 (out, in) gets a trainable low-rank update:

    y = W0 x + b + s · B A dropout(x),      A: (r, in),  B: (out, r),  s = alpha / r

A starts Kaiming-uniform (a = √5, as nn.Linear does) and B at zero, so the model is unchanged at step 0
and only B A, never W0, is learned. Variants, as options of the same module:

- rsLoRA (Kalajdzievski, 2023, arXiv:2312.03732): s = alpha / √r, which keeps the update's scale
  stable as r grows.
- DoRA (Liu et al., 2024, arXiv:2402.09353): W' = m · (W0 + s B A) / ||W0 + s B A||_row, with the
  magnitude m (out,) initialised to the row norms of W0 and the norm detached from the graph (§4.3), so
  y = (m / n) (W0 x + s B A x) + b. With dropout, PEFT's form is kept: the base term uses dropout(x)
  inside the correction, y = W0 x + b + (m/n - 1) W0 x' + (m/n) s B A x', x' = dropout(x).
- Init: "default" (above), "gaussian" (A ~ N(0, 1/r²)), "pissa" (Meng et al., 2024: A, B from the top-r
  singular vectors of W0, W0 replaced by the residual), "olora" (Büyükakyüz, 2024: A, B from a QR
  decomposition of W0, W0 replaced by the residual). LoftQ needs NF4 and comes with it.
- LoRA on nn.Embedding: y = E[x] + s · (A^T[x]) B^T with A (r, V) zero and B (C, r) normal, as PEFT.

Several named adapters can live in one module; `active` lists the ones applied. The module keeps the
base `weight`/`bias` as its own parameters, so base checkpoint keys do not move, and its adapter keys
are PEFT's (`lora_A.<name>.weight`, `lora_B.<name>.weight`, `lora_magnitude_vector.<name>`,
`lora_embedding_A.<name>`). The modules are in lora_layers.py; this file attaches them, reads and
writes PEFT's LORA folders, combines adapters, and declares the registry entries (lora, rslora, dora,
pissa, olora).

PiSSA and OLoRA change the base weights at init (W0 -> W0 - s B0 A0). Saving such an adapter writes
PEFT's conversion instead, a plain LoRA of rank 2r that applies to the original base:
A' = [A; A0], B' = [B, -B0], alpha doubled (× √2 with rsLoRA) so the scaling is unchanged.

Left out: LoRA on Conv layers, fan_in_fan_out (GPT-2's Conv1D), bias training, and PEFT's many other
init schemes (EVA, CorDA, ...).

Dimensions: r rank, in/out features, V vocabulary, C hidden.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from ..argtypes import COUNT, DROPOUT, POSITIVE
from ..quant.linear4bit import Linear4bit
from .base import (
    Method,
    Option,
    TrainableCopy,
    adapter_configs,
    adapter_layers,
    find_targets,
    register_config,
    report,
    set_adapter,
    targets_option,
)
from .lora_layers import LoraConfig, LoRAEmbedding, LoRAExperts, LoRALinear, parameter_targets
from .peft_format import CONFIG_FILE, PREFIX, WEIGHTS_FILE, AdapterError, check_fields


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, targets="all-linear", dropout: float = 0.0,
               use_rslora: bool = False, use_dora: bool = False, init: str = "default", layers=None,
               modules_to_save=None, adapter_name: str = "default", rank_pattern=None, alpha_pattern=None,
               target_parameters=None, verbose: bool = True, config: LoraConfig | None = None) -> nn.Module:
    """Attach a LoRA adapter named `adapter_name`, make it the active one, and freeze everything else.

    target_parameters names 3-D expert parameters ("mlp.experts.gate_up_proj", "mlp.experts.down_proj") of a
    MoE checkpoint that stores its experts fused, as PEFT's option of that name (targets may then be []).
    Returns the model (changed in place). Prints the trainable parameter count when verbose.
    """
    config = config or LoraConfig(r=r, alpha=alpha, dropout=dropout, targets=targets, use_rslora=use_rslora,
                                  use_dora=use_dora, init=init, layers=layers, modules_to_save=modules_to_save,
                                  rank_pattern=dict(rank_pattern or {}), alpha_pattern=dict(alpha_pattern or {}),
                                  target_parameters=([target_parameters] if isinstance(target_parameters, str)
                                                     else list(target_parameters)) if target_parameters else None)
    if adapter_name in adapter_configs(model):
        raise ValueError(f"an adapter named {adapter_name!r} already exists; delete it or pick another name")
    names = find_targets(model, config.targets, config.layers) if config.targets else []
    names = [n for n in names if not (config.modules_to_save and n in config.modules_to_save)]
    experts = parameter_targets(model, config.target_parameters, config.layers)
    if config.target_parameters and not experts:
        raise ValueError(f"target_parameters {config.target_parameters!r} name no parameter; fused experts are "
                         "named like model.layers.0.mlp.experts.gate_up_proj (a checkpoint with one module per "
                         "expert takes targets by name instead: experts.0.gate_proj)")
    if not names and not experts:
        raise ValueError(f"targets {config.targets!r} match no module; linear modules are named like "
                         f"{_example_names(model)}")
    for name, params in experts:
        module = model.get_submodule(name)
        module = module if isinstance(module, LoRAExperts) else LoRAExperts(module)
        module.add(adapter_name, params, *config.rank_alpha(name), config)
        model.set_submodule(name, module)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, (nn.Linear, Linear4bit)):
            module = LoRALinear(module)
        elif isinstance(module, nn.Embedding):
            module = LoRAEmbedding(module)
        elif not isinstance(module, (LoRALinear, LoRAEmbedding)):
            raise ValueError(f"module {name} is a {type(module).__name__}; LoRA targets nn.Linear or nn.Embedding")
        module.add(adapter_name, *config.rank_alpha(name), config)
        model.set_submodule(name, module)
    for name in config.modules_to_save or []:
        hits = [n for n, _ in model.named_modules() if n == name or n.endswith("." + name)]
        if not hits:
            raise ValueError(f"modules_to_save: no module named {name!r}")
        for hit in hits:
            module = model.get_submodule(hit)
            module = module if isinstance(module, TrainableCopy) else TrainableCopy(module)
            module.add(adapter_name)
            model.set_submodule(hit, module)
    register_config(model, adapter_name, config)
    set_adapter(model, adapter_name)
    if verbose:
        report(model, f"LoRA '{adapter_name}': {len(names)} modules")
    return model


def _example_names(model) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return ", ".join(sorted({n.rsplit(".", 1)[-1] for n in names}))


def add_weighted_adapter(model: nn.Module, adapters: list[str], weights: list[float], new_name: str,
                         combination: str = "cat"):
    """A new LoRA adapter combining existing ones, as PEFT's add_weighted_adapter.

    "cat": exact, ΔW = Σ w_i s_i B_i A_i, as one adapter of rank Σ r_i (w_i s_i A_i stacked, B_i
    stacked, s = 1). "linear": PEFT's approximation for equal ranks, with c_i = w_i s_i,
    A = Σ sign(c_i) √|c_i| A_i, B = Σ √|c_i| B_i, s = 1: it carries cross terms B_i A_j (i ≠ j), which
    is PEFT's definition, kept so that both give the same adapter.
    """
    configs = adapter_configs(model)
    if missing := [a for a in adapters if a not in configs]:
        raise ValueError(f"no adapter named {missing}")
    if len(adapters) != len(weights):
        raise ValueError("adapters and weights must have the same length")
    if any(configs[a].use_dora for a in adapters):
        raise ValueError("weighted combinations of DoRA adapters are not supported")
    if combination not in ("cat", "linear"):
        raise ValueError(f"combination {combination!r} is not supported; supported: cat, linear")
    built = {}  # module name -> rank of the new adapter there
    for name, layer in adapter_layers(model):
        if not isinstance(layer, (LoRALinear, LoRAEmbedding)):
            continue
        present = [(a, w) for a, w in zip(adapters, weights) if a in layer.adapters]
        if not present:
            continue
        As = [layer.factors(a)[0] for a, _ in present]
        Bs = [layer.factors(a)[1] for a, _ in present]
        c = [w * layer.scaling[a] for a, w in present]
        if combination == "cat":
            A = torch.cat([ci * Ai for ci, Ai in zip(c, As)], dim=0)  # (Σr, in)
            B = torch.cat(Bs, dim=1)  # (out, Σr)
        else:
            if len({a.shape[0] for a in As}) > 1:
                raise ValueError("combination 'linear' needs adapters of equal rank; use 'cat'")
            A = sum(math.copysign(math.sqrt(abs(ci)), ci) * Ai for ci, Ai in zip(c, As))
            B = sum(math.sqrt(abs(ci)) * Bi for ci, Bi in zip(c, Bs))
        r = built[name] = A.shape[0]
        layer.add(new_name, r, float(r), LoraConfig(r=r, alpha=float(r)))
        with torch.no_grad():
            for param, value in zip(layer.factors(new_name), (A, B)):
                param.copy_(value)
    # The new adapter lives on the union of its parts' modules: name them exactly in the file's config.
    r = max(built.values())
    configs[new_name] = LoraConfig(r=r, alpha=float(r), targets="|".join(re.escape(n) for n in built))
    for name, rk in built.items():
        if rk != r:  # per-module ranks differ: record them so the file says the truth
            configs[new_name].rank_pattern[re.escape(name)] = rk
            configs[new_name].alpha_pattern[re.escape(name)] = float(rk)


def lora_plus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0):
    """LoRA+ (Hayou et al., 2024, arXiv:2402.12354): B learns `ratio` times faster than A.

    Optimizer parameter groups for the trainable parameters: lora_B (and lora_embedding_B) at lr·ratio,
    everything else at lr; weight decay only on matrices (not on DoRA magnitudes or biases)."""
    groups = {"A": [], "B": [], "no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".lora_B." in name or ".lora_embedding_B." in name:
            groups["B"].append(p)
        elif p.ndim < 2:
            groups["no_decay"].append(p)
        else:
            groups["A"].append(p)
    return [g for g in (
        {"params": groups["A"], "lr": lr, "weight_decay": weight_decay},
        {"params": groups["B"], "lr": lr * ratio, "weight_decay": weight_decay},
        {"params": groups["no_decay"], "lr": lr, "weight_decay": 0.0},
    ) if g["params"]]


# -- PEFT's files ---------------------------------------------------------------------------------------

_INITS_TO_PEFT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}
# PEFT options that change the math in ways minicustom does not implement: (field, harmless value).
_UNSUPPORTED = (("fan_in_fan_out", False), ("bias", "none"), ("lora_bias", False), ("use_qalora", False),
                ("layer_replication", None), ("trainable_token_indices", None),
                ("alora_invocation_tokens", None), ("use_bdlora", None), ("exclude_modules", None))


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
        "target_parameters": sorted(set(config.target_parameters)) if config.target_parameters else None,
    }


def to_peft(model: nn.Module, adapter_name: str):
    """(adapter_config.json, tensors, no extra files) of adapter `adapter_name`, as PEFT writes LoRA."""
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
        if not isinstance(layer, (TrainableCopy, LoRAExperts)):
            lora_modules.append(name)
        state.update({f"{PREFIX}{name}.{k}": v.detach().contiguous().cpu() for k, v in tensors.items()})
    return _lora_peft_config(adapter_configs(model)[adapter_name], lora_modules, converted), state, {}


# adapter_config.json fields a LoRA folder is read with, and their kinds (check_fields).
_LORA_FIELDS = {"r": "positive int", "lora_alpha": "number", "lora_dropout": "dropout", "target_modules": "names",
                "use_rslora": "bool", "use_dora": "bool", "fan_in_fan_out": "bool", "lora_bias": "bool",
                "use_qalora": "bool", "layers_to_transform": "layers", "layers_pattern": "names",
                "modules_to_save": "name list", "rank_pattern": "ranks", "alpha_pattern": "numbers",
                "init_lora_weights": "bool or str", "bias": "str", "exclude_modules": "names",
                "target_parameters": "name list"}
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
        target_parameters=config.get("target_parameters") or None,
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


def _sort_keys(model: nn.Module, path: Path, config: LoraConfig, tensors: dict, others: bool = False):
    """The file's tensors by owner: {module: {LoRA key: tensor}}, {modules_to_save copy: {param: tensor}},
    and problems found on the way; keys that match no module are an error at once."""
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
    if not per_module and not others:
        raise AdapterError(f"{path / WEIGHTS_FILE}: no LoRA tensors found")
    return per_module, copies, problems


def _plan(model: nn.Module, config: LoraConfig, per_module: dict, problems: list) -> list:
    """(module name, r, alpha, tensors) for each LoRA module of the file, each checked against the module
    it attaches to (its kind, rank and every shape); what does not fit is added to `problems`."""
    modules = dict(model.named_modules())
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
    return plan


def _expert_parts(model: nn.Module, config: LoraConfig, tensors: dict, problems: list) -> list:
    """(module, its parameters, {parameter: (A, B)}) for each fused-experts module that target_parameters
    selects, each tensor checked; their keys (PEFT's nesting: "base_layer." per wrapper inside) are popped."""
    plan = []
    for name, params in parameter_targets(model, config.target_parameters, config.layers):
        module, parts = model.get_submodule(name), {}
        E, (r, _) = module.gate_up_proj.shape[0], config.rank_alpha(name)
        for i, p in enumerate(params):
            key = f"{PREFIX}{name}." + "base_layer." * (len(params) - 1 - i)
            out, in_ = getattr(module, p).shape[1:]
            A, B = tensors.pop(key + "lora_A.weight", None), tensors.pop(key + "lora_B.weight", None)
            for what, t, shape in (("lora_A", A, (E * r, in_)), ("lora_B", B, (out, r * E))):
                if t is None:
                    problems.append(f"{key}{what}.weight (target parameter {p}) is missing")
                elif tuple(t.shape) != shape:
                    problems.append(f"{key}{what}.weight: shape {tuple(t.shape)}, expected {shape} ({E} experts of "
                                    f"rank {r} on {p})")
            parts[p] = (A, B)
        plan.append((name, params, parts))
    if config.target_parameters and not plan:
        problems.append(f"target_parameters {config.target_parameters!r} name no parameter of this model")
    return plan


def load_peft(model: nn.Module, path: Path, peft: dict, tensors: dict, adapter_name: str):
    """Read a LORA folder's config and tensors into adapter `adapter_name`, everything checked first."""
    config = _lora_config_from_peft(peft, path)
    tensors, problems = dict(tensors), []
    experts = _expert_parts(model, config, tensors, problems)  # takes their keys out of `tensors`
    per_module, copies, found = _sort_keys(model, path, config, tensors, bool(experts))
    problems += found + _coverage(model, config, per_module, copies)
    plan = _plan(model, config, per_module, problems)
    if problems:
        raise AdapterError(f"{path}: the adapter does not fit this model:\n  " + "\n  ".join(problems))

    # Checked: now change the model.
    modules = dict(model.named_modules())
    for name, r, alpha, parts in plan:
        module = modules[name]
        if not isinstance(module, (LoRALinear, LoRAEmbedding)):
            module = LoRALinear(module) if isinstance(module, (nn.Linear, Linear4bit)) else LoRAEmbedding(module)
            model.set_submodule(name, module)
        module.add(adapter_name, r, alpha, config)
        with torch.no_grad():
            for k, t in parts.items():
                module.adapter_state(adapter_name)[k].copy_(t)
    for name, params, parts in experts:
        module = modules[name] if isinstance(modules[name], LoRAExperts) else LoRAExperts(modules[name])
        module.add(adapter_name, params, *config.rank_alpha(name), config)
        with torch.no_grad():
            for p, (A, B) in parts.items():
                module.lora_A[adapter_name][p].copy_(A)
                module.lora_B[adapter_name][p].copy_(B)
        model.set_submodule(name, module)
    for name, params in copies.items():
        module = modules[name] if isinstance(modules[name], TrainableCopy) else TrainableCopy(modules[name])
        module.add(adapter_name)
        with torch.no_grad():
            for k, t in params.items():
                module.adapter_state(adapter_name)[k].copy_(t)
        model.set_submodule(name, module)
    adapter_configs(model)[adapter_name] = config


# -- the registry entries ------------------------------------------------------------------------------

OPTIONS = (
    Option("r", 8, "LoRA rank", type=COUNT),
    Option("alpha", 16.0, "LoRA alpha: the update is scaled by alpha / r", type=POSITIVE),
    Option("dropout", 0.0, "dropout on the adapter's input", type=DROPOUT),
    Option("targets", "all-linear", "modules to adapt: all-linear, or names separated by commas", type=targets_option),
)


def _variant(**fixed):
    def attach(model: nn.Module, r=8, alpha=16.0, dropout=0.0, targets="all-linear") -> nn.Module:
        return apply_lora(model, r=r, alpha=alpha, dropout=dropout, targets=targets, **fixed)
    return attach


def _entry(name: str, help: str, variant_of=None, **fixed) -> Method:
    return Method(name, _variant(**fixed), help, lr=1e-3, mergeable=True, peft_type="LORA", options=OPTIONS,
                  variant_of=variant_of, to_peft=to_peft, load_peft=load_peft)


LORA = _entry("lora", "LoRA: a low-rank update B A beside each frozen linear")
RSLORA = _entry("rslora", "rsLoRA: LoRA scaled by alpha / sqrt(r)", "lora", use_rslora=True)
DORA = _entry("dora", "DoRA: LoRA with a learned magnitude per output row", use_dora=True)
PISSA = _entry("pissa", "PiSSA: LoRA started from the top singular vectors of W0", "lora", init="pissa")
OLORA = _entry("olora", "OLoRA: LoRA started from a QR decomposition of W0", "lora", init="olora")
