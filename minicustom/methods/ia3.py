"""IA3: Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning
(Liu et al., 2022, arXiv:2205.05638).

(IA)³, "infused adapter by inhibiting and amplifying inner activations", learns one vector per adapted
linear layer and rescales an activation by it, element-wise:

    k = l_k ⊙ (W_k x + b_k),    v = l_v ⊙ (W_v x + b_v),    y = W_down (l_ff ⊙ h) + b_down

with every l initialised to 1, so the model is unchanged at step 0 and only the vectors are learned
(3 vectors a layer: 0.01% of a 7B model). As in PEFT, a non-feedforward module scales its *output*,
bias included, with l of shape (out, 1); a feedforward module scales its *input* with l of shape
(1, in). Several named adapters active in one module multiply: l = l_a ⊙ l_b. Merging folds l into the
weight, W <- l ⊙ W row-wise (and b <- l ⊙ b) or W <- W ⊙ l column-wise; unmerging divides by l + 1e-8,
PEFT's formula (which guards l = 0 and is inexact then, as PEFT warns).

Which modules: PEFT's defaults per family (peft/utils/constants.py): k_proj, v_proj, down_proj on
Llama and Mistral; q_proj, v_proj, down_proj on Qwen2, Qwen3 and Gemma 2/3; down_proj is the feedforward
module (w2 in Mixtral's experts). PEFT has no default for Phi-3 or Qwen3-MoE; ours are Phi-3's fused
qkv_proj (q, k and v scaled) and down_proj, and Qwen3's targets for Qwen3-MoE (every expert's down_proj).
Targets are a list of names (equal to, or ending in '.' + name), one regex (full match) or "all-linear";
feedforward modules are a list matched by PEFT's plain suffix rule (`name.endswith(f)`) or one regex.
The file keys are PEFT's: "base_model.model." + module name + ".ia3_l". Left out: IA3 on nn.Embedding
and Conv layers, fan_in_fan_out (GPT-2's Conv1D), exclude_modules, modules_to_save, 8-bit bases, and
folding into a 4-bit base.

Dimensions: in/out features of the adapted linear.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..quant.linear4bit import Linear4bit
from .base import (
    AdapterLayer,
    LinearAdapterLayer,
    Method,
    Option,
    adapter_configs,
    find_targets,
    linear_like,
    register_config,
    report,
    set_adapter,
    targets_option,
)
from .peft_format import CONFIG_FILE, PREFIX, AdapterError, check_fields, match_keys

__all__ = ["IA3Config", "IA3Linear", "apply_ia3", "to_peft", "load_peft"]

# PEFT's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / _FEEDFORWARD_MODULES_MAPPING for our families.
DEFAULT_TARGETS = {"llama": ["k_proj", "v_proj", "down_proj"], "mistral": ["k_proj", "v_proj", "down_proj"],
                   "qwen2": ["q_proj", "v_proj", "down_proj"], "qwen3": ["q_proj", "v_proj", "down_proj"],
                   "gemma2": ["q_proj", "v_proj", "down_proj"], "gemma3_text": ["q_proj", "v_proj", "down_proj"],
                   "phi3": ["qkv_proj", "down_proj"], "qwen3_moe": ["q_proj", "v_proj", "down_proj"],
                   "mixtral": ["k_proj", "v_proj", "w2"]}
DEFAULT_FEEDFORWARD = {"mixtral": ["w2"]}  # Mixtral's experts' down projection; every other family's down_proj
EPS = 1e-8  # PEFT's guard in unmerge: W / (l + 1e-8)


@dataclass
class IA3Config:
    """Which modules carry IA3 vectors and which of them are feedforward (their input is scaled).

    None means PEFT's default for the model family, filled in by `resolve` when the adapter is attached."""

    peft_type: ClassVar[str] = "IA3"

    targets: list[str] | str | None = None  # names (suffix match), one regex (full match), "all-linear"
    feedforward: list[str] | str | None = None  # names (plain suffix match, as PEFT) or one regex
    layers: list[int] | None = None  # only these decoder layers

    def __post_init__(self):
        for f in ("targets", "feedforward"):
            if isinstance(getattr(self, f), (tuple, set)):
                setattr(self, f, sorted(getattr(self, f)))
        if isinstance(self.targets, list) and isinstance(self.feedforward, list):
            if extra := sorted(set(self.feedforward) - set(self.targets)):  # PEFT's rule, on the names as given
                raise ValueError(f"feedforward modules {extra} are not in targets {self.targets}: a feedforward "
                                 "module is a target whose input, not output, is scaled; add it to targets")

    def resolve(self, model_type: str) -> IA3Config:
        """This config with PEFT's family defaults in place of None. A default feedforward module that is
        not among explicit targets is dropped (PEFT keeps it, then refuses to load its own saved folder)."""
        targets = DEFAULT_TARGETS.get(model_type, DEFAULT_TARGETS["llama"]) if self.targets is None else self.targets
        feedforward = self.feedforward
        if feedforward is None:
            feedforward = [f for f in DEFAULT_FEEDFORWARD.get(model_type, ["down_proj"])
                           if not isinstance(targets, list) or f in targets]
        return dc_replace(self, targets=list(targets) if isinstance(targets, list) else targets,
                          feedforward=feedforward)

    def is_feedforward(self, name: str) -> bool:
        if isinstance(self.feedforward, str):
            return re.fullmatch(self.feedforward, name) is not None
        return any(name.endswith(f) for f in self.feedforward or [])


class IA3Linear(LinearAdapterLayer):
    """IA3 on an nn.Linear (W shared as `weight`, b as `bias`, so base keys do not move) or on a 4-bit
    `Linear4bit` (held as `base_layer`). `is_feedforward` is the module's, fixed by its first adapter."""

    def __init__(self, base: nn.Linear | Linear4bit, is_feedforward: bool):
        super().__init__()
        self.hold(base)
        self.is_feedforward = is_feedforward
        self.ia3_l = nn.ParameterDict()  # name -> l: (1, in) feedforward, (out, 1) otherwise
        self.active: list[str] = []
        self.merged: dict[str, None] = {}

    def add(self, name: str):
        self.ia3_l[name] = nn.Parameter(torch.ones(_shape(self, self.is_feedforward), **self.factory()))

    def forward(self, x):
        scaling = None  # l_a ⊙ l_b ⊙ ..., multiplied in PEFT's order
        for name in self.active:
            if name not in self.merged:
                l = self.ia3_l[name].flatten()  # (in,) or (out,)
                scaling = l if scaling is None else scaling * l
        if scaling is None:
            return self.base_forward(x)  # no multiply at all: exactly the base
        if self.is_feedforward:
            return self.base_forward((x * scaling).to(x.dtype))  # W (l ⊙ x) + b
        y = self.base_forward(x)
        return (y * scaling).to(y.dtype)  # l ⊙ (W x + b)

    @torch.no_grad()
    def merge(self, name: str):
        if name in self.merged:
            return
        if self.base_layer is not None:
            raise ValueError("the base is 4-bit and cannot take the IA3 vector in place (qlora.merge_4bit folds "
                             "LoRA only); keep the adapter unmerged, or load the base in full precision to merge")
        l = self.ia3_l[name]
        self.weight.mul_(l)  # (out, in) ⊙ (out, 1) scales rows; ⊙ (1, in) scales columns
        if not self.is_feedforward and self.bias is not None:
            self.bias.mul_(l.reshape(self.bias.shape))  # the output scaling covers the bias too
        self.merged[name] = None

    @torch.no_grad()
    def unmerge(self, name: str):
        if name not in self.merged:
            return
        del self.merged[name]
        l = self.ia3_l[name]
        self.weight.div_(l + EPS)
        if not self.is_feedforward and self.bias is not None:
            self.bias.div_(l.reshape(self.bias.shape) + EPS)

    def delete(self, name: str):
        if name in self.merged:
            raise ValueError(f"adapter {name!r} is merged into the weights; unmerge it before deleting it")
        if name in self.ia3_l:
            del self.ia3_l[name]
        self.active = [a for a in self.active if a != name]

    @property
    def adapters(self) -> list[str]:
        return list(self.ia3_l)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return {"ia3_l": self.ia3_l[name]}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"feedforward={self.is_feedforward}, adapters={self.adapters}")


def _shape(linear, is_feedforward: bool) -> tuple[int, int]:
    """l's shape on a linear: (1, in) scales the input, (out, 1) the output."""
    return (1, linear.in_features) if is_feedforward else (linear.out_features, 1)


# -- attaching adapters to a model -----------------------------------------------------------------

def _plan(model: nn.Module, config: IA3Config) -> tuple[list[tuple[str, bool]], list[str]]:
    """([(module name, is_feedforward)] for every targeted module, [problems]); changes nothing."""
    plan, problems = [], []
    for name in find_targets(model, config.targets, config.layers):
        module = model.get_submodule(name)
        ff = config.is_feedforward(name)
        kind = {True: "feedforward", False: "not feedforward"}
        if isinstance(module, IA3Linear) and module.is_feedforward != ff:
            problems.append(f"{name}: IA3 adapters {module.adapters} treat it as {kind[module.is_feedforward]}, "
                            f"this one as {kind[ff]} (one module, one kind)")
        elif isinstance(module, AdapterLayer) and not isinstance(module, IA3Linear):
            problems.append(f"{name} already carries a {type(module).__name__}; IA3 cannot be stacked on it")
        elif not linear_like(module):
            problems.append(f"{name} is a {type(module).__name__}; IA3 targets nn.Linear")
        else:
            plan.append((name, ff))
    return plan, problems


def _attach(model: nn.Module, plan, adapter_name: str) -> dict[str, IA3Linear]:
    layers = {}
    for name, ff in plan:
        module = model.get_submodule(name)
        if not isinstance(module, IA3Linear):
            module = IA3Linear(module, ff)
            model.set_submodule(name, module)
        module.add(adapter_name)
        layers[name] = module
    return layers


def apply_ia3(model: nn.Module, targets=None, feedforward=None, layers=None, adapter_name: str = "default",
              verbose: bool = True, config: IA3Config | None = None) -> nn.Module:
    """Attach an IA3 adapter named `adapter_name` (all vectors 1), make it the active one, and freeze
    everything else. targets / feedforward None: PEFT's defaults for the model's family.

    Returns the model (changed in place). Prints the trainable parameter count when verbose.
    """
    config = (config or IA3Config(targets=targets, feedforward=feedforward, layers=layers)).resolve(
        model.config.model_type)
    if adapter_name in adapter_configs(model):
        raise ValueError(f"an adapter named {adapter_name!r} already exists; delete it or pick another name")
    plan, problems = _plan(model, config)
    if problems:
        raise ValueError("cannot attach IA3:\n  " + "\n  ".join(problems))
    if not plan:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if linear_like(m)})
        raise ValueError(f"targets {config.targets!r} match no module; linear modules are named like "
                         f"{', '.join(names)}")
    _attach(model, plan, adapter_name)
    register_config(model, adapter_name, config)
    set_adapter(model, adapter_name)
    if verbose:
        report(model, f"IA3 '{adapter_name}': {len(plan)} modules ({sum(ff for _, ff in plan)} feedforward)")
    return model


# -- PEFT adapter folders (the registry dispatches here on peft_type "IA3") ----------------------------

# PEFT options minicustom does not implement: (field, the value that means "off").
_UNSUPPORTED = (("fan_in_fan_out", False), ("exclude_modules", None), ("modules_to_save", None))
# adapter_config.json fields an IA3 folder is read with, and their kinds (peft_format.check_fields).
_FIELDS = {"target_modules": "names", "feedforward_modules": "names", "fan_in_fan_out": "bool",
           "init_ia3_weights": "bool", "exclude_modules": "names", "modules_to_save": "name list"}


def to_peft(model: nn.Module, adapter_name: str):
    """(adapter_config.json as PEFT writes it for IA3, tensors, no extra files)."""
    config = adapter_configs(model)[adapter_name]
    state, names, ff_names = {}, [], []
    for name, layer in model.named_modules():
        if isinstance(layer, IA3Linear) and adapter_name in layer.adapters:
            state[f"{PREFIX}{name}.ia3_l"] = layer.ia3_l[adapter_name]
            names.append(name)
            if layer.is_feedforward:
                ff_names.append(name)
    targets, feedforward = config.targets, config.feedforward
    if config.layers is not None or targets == "all-linear":
        # IA3Config has no layers_to_transform: name the modules (and their feedforward subset) exactly.
        targets, feedforward = sorted(names), sorted(ff_names)
    return {
        "peft_type": "IA3", "task_type": "CAUSAL_LM", "target_modules": targets, "feedforward_modules": feedforward,
        "exclude_modules": None, "fan_in_fan_out": False, "modules_to_save": None, "init_ia3_weights": True,
        "inference_mode": True, "auto_mapping": None, "base_model_name_or_path": None, "revision": None,
    }, state, {}


def load_peft(model: nn.Module, path: Path, peft: dict, tensors: dict, adapter_name: str):
    """Attach PEFT's IA3 folder: every targeted module must have its vector, of the right shape, and every
    key must belong to a targeted module; all of it is checked before the model changes. (init_ia3_weights
    does not matter: every vector comes from the file.)"""
    where = path / CONFIG_FILE
    check_fields(peft, where, _FIELDS)
    for key, off in _UNSUPPORTED:
        if peft.get(key, off) not in (off, None, False, [], {}):
            raise AdapterError(f"{where}: {key}={peft[key]!r} is not supported")
    try:
        config = IA3Config(targets=peft.get("target_modules"), feedforward=peft.get("feedforward_modules"))
    except ValueError as e:
        raise AdapterError(f"{where}: {e}") from None
    config = config.resolve(model.config.model_type)
    plan, problems = _plan(model, config)
    if not plan and not problems:
        problems.append(f"target_modules {config.targets!r} select no module of this model")
    modules = dict(model.named_modules())
    expected = {name: _shape(modules[name], ff) for name, ff in plan}

    note = lambda shape: f" ({'feedforward: scales the input' if shape[0] == 1 else 'scales the output'})"  # noqa: E731
    found = match_keys(path, tensors, ".ia3_l", expected, modules, "IA3", "module", config.targets, problems, note)

    # Checked: now change the model.
    layers = _attach(model, plan, adapter_name)
    with torch.no_grad():
        for name, t in found.items():
            layers[name].ia3_l[adapter_name].copy_(t)
    register_config(model, adapter_name, config)


IA3 = Method("ia3", lambda model, targets=None: apply_ia3(model, targets=targets),
             "IA3: learned vectors that rescale keys, values and the feed-forward input", lr=1e-2, mergeable=True,
             peft_type="IA3", options=(Option("targets", None, "modules to adapt: all-linear, or names separated by commas "
                                              "(IA3 without it: PEFT's for the family, k_proj,v_proj,down_proj on "
                                              "Llama)", type=targets_option),),
             to_peft=to_peft, load_peft=load_peft)
