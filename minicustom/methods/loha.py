"""LoHa: FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated Learning
(Hyeon-Woo, Ye-Bin and Oh, 2022, arXiv:2108.06098), as LyCORIS and PEFT's LOHA apply it to fine-tuning.

A frozen linear W0 (out, in) gets an update that is the Hadamard (element-wise) product of two rank-r
products, so its rank can reach r² for the parameters of a rank-2r LoRA:

    y = W0 x + b + ΔW x,    ΔW = ((w1_a w1_b) ⊙ (w2_a w2_b)) · s,    w*_a: (out, r),  w*_b: (r, in),  s = alpha / r

PEFT's init (init_weights=True): w1_a, w1_b, w2_a Kaiming-uniform (a = √5, as nn.Linear), w2_b zero, so
ΔW = 0 exactly and the model is unchanged at step 0; init_weights=False draws w2_b too (a test setting in
PEFT). Several named adapters active in one module add their ΔW x. Merging folds it into the weight,
W0 <- W0 + ΔW, and unmerging subtracts it (PEFT's; equal to W0 within a rounding of |W0| + |ΔW|).

Which modules: PEFT takes LoRA's defaults per family (TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING
is a copy of LoRA's): q_proj, v_proj on every family here (Llama, Mistral, Mixtral, Qwen2/3, Gemma 2/3); PEFT
has none for Phi-3 (ours: qkv_proj) and Qwen3-MoE (ours: Qwen3's). Targets are a list of names (equal to, or
ending in '.' + name), one regex (full match) or "all-linear", and `layers` (layers_to_transform) keeps
those of some decoder layers. The file keys are PEFT's: "base_model.model." + module name + ".hada_w1_a",
".hada_w1_b", ".hada_w2_a", ".hada_w2_b".

Left out, which PEFT has: Conv1d/Conv2d targets and use_effective_conv2d (FedPara's Proposition 3 with the
hada_t1/hada_t2 cores), rank_dropout and module_dropout (only 0 is accepted), rank_pattern / alpha_pattern,
exclude_modules, modules_to_save, layers_pattern, and folding into a 4-bit base. PEFT's hand-written
backward (HadaWeight) is autograd here: the same gradients up to rounding.

Dimensions: in/out features of the adapted linear, r rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..argtypes import COUNT, POSITIVE
from ..quant.linear4bit import Linear4bit
from .base import (
    FactoredLinear,
    Method,
    Option,
    adapter_configs,
    plan_linears,
    plan_or_refuse,
    register_config,
    report,
    set_adapter,
    targets_option,
)
from .peft_format import CONFIG_FILE, PREFIX, AdapterError, check_fields, match_factors, refuse_unsupported

__all__ = ["LoHaConfig", "LoHaLinear", "apply_loha", "to_peft", "load_peft"]

# PEFT's TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING (LoRA's) for our families; phi3, qwen3_moe: ours.
DEFAULT_TARGETS = {"phi3": ["qkv_proj"]}
_QV = ["q_proj", "v_proj"]
FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


@dataclass
class LoHaConfig:
    """Rank, alpha and which linears carry the update. targets None means PEFT's default for the model
    family, filled in by `resolve` when the adapter is attached."""

    peft_type: ClassVar[str] = "LOHA"

    r: int = 8
    alpha: float = 8  # PEFT's default: s = alpha / r = 1
    targets: list[str] | str | None = None  # names (suffix match), one regex (full match), "all-linear"
    init_weights: bool = True  # False: w2_b random too, so ΔW != 0 at init (PEFT's testing switch)
    layers: list[int] | None = None  # only these decoder layers (PEFT's layers_to_transform)

    def __post_init__(self):
        if isinstance(self.targets, (tuple, set)):
            self.targets = sorted(self.targets)
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"LoHa rank r must be a positive integer, found {self.r!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def resolve(self, model_type: str) -> LoHaConfig:
        targets = DEFAULT_TARGETS.get(model_type, _QV) if self.targets is None else self.targets
        return dc_replace(self, targets=list(targets) if isinstance(targets, list) else targets)


class LoHaLinear(FactoredLinear):
    """LoHa on an nn.Linear (W0 shared as `weight`, b as `bias`, so base keys do not move) or on a 4-bit
    `Linear4bit` (held as `base_layer`; its adapter runs, merging into it is refused). Forward, merging and
    the adapter bookkeeping are FactoredLinear's (shared with LoKr)."""

    FACTORS = FACTORS
    method = "LoHa"

    def __init__(self, base: nn.Linear | Linear4bit):
        super().__init__(base)
        self.hada_w1_a = nn.ParameterDict()  # name -> (out, r)
        self.hada_w1_b = nn.ParameterDict()  # name -> (r, in)
        self.hada_w2_a = nn.ParameterDict()  # name -> (out, r)
        self.hada_w2_b = nn.ParameterDict()  # name -> (r, in)

    def add(self, name: str, r: int, scaling: float, init_weights: bool = True):
        shapes = {"hada_w1_a": (self.out_features, r), "hada_w1_b": (r, self.in_features),
                  "hada_w2_a": (self.out_features, r), "hada_w2_b": (r, self.in_features)}
        for f, shape in shapes.items():  # PEFT's order of draws: w1_a, w1_b, w2_a (, w2_b)
            p = torch.empty(shape, **self.factory())
            if f == "hada_w2_b" and init_weights:
                nn.init.zeros_(p)  # ΔW = (w1_a w1_b) ⊙ 0 = 0: the identity at init
            else:
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            getattr(self, f)[name] = nn.Parameter(p)
        self.scaling[name] = scaling

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = ((w1_a w1_b) ⊙ (w2_a w2_b)) · s: (out, r) @ (r, in) -> (out, in), twice."""
        w1 = self.hada_w1_a[name] @ self.hada_w1_b[name]  # (out, in)
        w2 = self.hada_w2_a[name] @ self.hada_w2_b[name]  # (out, in)
        return w1 * w2 * self.scaling[name]


# -- attaching adapters to a model -----------------------------------------------------------------

def _plan(model: nn.Module, config: LoHaConfig) -> tuple[list[str], list[str]]:
    """([names of the targeted linears], [problems]); changes nothing."""
    return plan_linears(model, config, LoHaLinear, "LoHa")


def _attach(model: nn.Module, plan: list[str], adapter_name: str, config: LoHaConfig) -> dict[str, LoHaLinear]:
    layers = {}
    for name in plan:
        module = model.get_submodule(name)
        if not isinstance(module, LoHaLinear):
            module = LoHaLinear(module)
            model.set_submodule(name, module)
        module.add(adapter_name, config.r, config.scaling, config.init_weights)
        layers[name] = module
    return layers


def apply_loha(model: nn.Module, r: int = 8, alpha: float = 8, targets=None, init_weights: bool = True,
               layers=None, adapter_name: str = "default", verbose: bool = True,
               config: LoHaConfig | None = None) -> nn.Module:
    """Attach a LoHa adapter named `adapter_name` (ΔW = 0 unless init_weights=False), make it the active
    one, and freeze everything else. targets None: PEFT's defaults for the family (q_proj, v_proj). Every
    name in a list of targets must select a linear, and everything they select must be one; checked before
    the model changes. Returns the model (changed in place); prints the trainable parameter count when verbose.
    """
    config = (config or LoHaConfig(r=r, alpha=alpha, targets=targets, init_weights=init_weights,
                                   layers=layers)).resolve(model.config.model_type)
    if adapter_name in adapter_configs(model):
        raise ValueError(f"an adapter named {adapter_name!r} already exists; delete it or pick another name")
    plan = plan_or_refuse(model, config, LoHaLinear, "LoHa")  # one line: the first problem, and how many more
    _attach(model, plan, adapter_name, config)
    register_config(model, adapter_name, config)
    set_adapter(model, adapter_name)
    if verbose:
        report(model, f"LoHa '{adapter_name}': {len(plan)} modules, r={config.r}, alpha={config.alpha}")
    return model


# -- PEFT adapter folders (the registry dispatches here on peft_type "LOHA") ------------------------------

# PEFT options minicustom does not implement: (field, the value that means "off").
_UNSUPPORTED = (("rank_dropout", 0), ("module_dropout", 0), ("use_effective_conv2d", False),
                ("rank_pattern", {}), ("alpha_pattern", {}), ("exclude_modules", None), ("modules_to_save", None),
                ("layers_pattern", None))
_FIELDS = {"r": "positive int", "alpha": "number", "target_modules": "names", "init_weights": "bool",
           "layers_to_transform": "layers", "rank_dropout": "dropout", "module_dropout": "dropout",
           "use_effective_conv2d": "bool", "rank_pattern": "ranks", "alpha_pattern": "numbers",
           "exclude_modules": "names", "modules_to_save": "name list"}


def to_peft(model: nn.Module, adapter_name: str):
    """(adapter_config.json as PEFT writes it for LOHA, tensors, no extra files). Merged or not, the
    factors are what is saved."""
    config = adapter_configs(model)[adapter_name]
    state = {f"{PREFIX}{name}.{k}": t for name, layer in model.named_modules()
             if isinstance(layer, LoHaLinear) and adapter_name in layer.adapters
             for k, t in layer.adapter_state(adapter_name).items()}
    return {
        "peft_type": "LOHA", "task_type": "CAUSAL_LM", "r": config.r, "alpha": config.alpha,
        "rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False, "target_modules": config.targets,
        "exclude_modules": None, "init_weights": config.init_weights, "layers_to_transform": config.layers,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
        "inference_mode": True, "auto_mapping": None, "base_model_name_or_path": None, "revision": None,
    }, state, {}


def load_peft(model: nn.Module, path: Path, peft: dict, tensors: dict, adapter_name: str):
    """Attach PEFT's LOHA folder: every targeted linear must have its four factors, of the right shapes, and
    every key must belong to a targeted linear; all of it is checked before the model changes."""
    where = path / CONFIG_FILE
    check_fields(peft, where, _FIELDS)
    refuse_unsupported(peft, where, _UNSUPPORTED, "LoHa")
    config = LoHaConfig(r=peft.get("r") or 8, alpha=8 if peft.get("alpha") is None else peft["alpha"],
                        targets=peft.get("target_modules"), init_weights=peft.get("init_weights") is not False,
                        layers=peft.get("layers_to_transform")).resolve(model.config.model_type)
    plan, problems = _plan(model, config)
    if problems or not plan:
        raise AdapterError(f"{where}: target_modules {config.targets!r}: " + (
            "; ".join(problems) or "select no module of this model"))
    modules = dict(model.named_modules())
    r = config.r
    expected = {f: {n: (modules[n].out_features, r) if f.endswith("_a") else (r, modules[n].in_features)
                    for n in plan} for f in FACTORS}
    found = match_factors(path, tensors, expected, modules, "LoHa", config.targets)

    # Checked: now change the model.
    layers = _attach(model, plan, adapter_name, config)
    with torch.no_grad():
        for f, by_name in found.items():
            for name, t in by_name.items():
                getattr(layers[name], f)[adapter_name].copy_(t)
    register_config(model, adapter_name, config)


LOHA = Method("loha", lambda model, r=8, alpha=8.0, targets=None: apply_loha(model, r=r, alpha=alpha, targets=targets),
              "LoHa: a Hadamard product of two low-rank updates beside each frozen linear", lr=1e-3, mergeable=True,
              peft_type="LOHA", options=(
                  Option("r", 8, "rank r of each low-rank factor", type=COUNT),
                  Option("alpha", 8.0, "LoHa alpha: the update is scaled by alpha / r (PEFT's default 8)",
                         type=POSITIVE),
                  Option("targets", None, "modules to adapt: all-linear, or names separated by commas (LoHa "
                                          "without it: PEFT's for the family, q_proj,v_proj)", type=targets_option)),
              to_peft=to_peft, load_peft=load_peft)
