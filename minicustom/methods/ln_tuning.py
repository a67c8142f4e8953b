"""LN tuning: Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning
(Zhao, Tu, Wei, Mei and Xie, 2023, arXiv:2312.11420).

Only the normalization layers learn. Each adapted norm keeps its frozen gain γ and gets, per adapter, a
trainable copy γ' initialised to γ (so the model is unchanged at step 0), which the forward uses instead:

    y = γ' ⊙ x / sqrt(mean(x²) + eps)            (Gemma: (1 + γ') ⊙ ..., γ' stored around 0)

The paper tunes LayerNorm's gain and bias; our families' RMSNorm has the gain alone. This is PEFT's
LN_TUNING: a deep copy of the norm per adapter (`ln_tuning_layers.<name>`); the base norm when adapters are
disabled; one adapter at a time: two active on a norm are refused in the forward and in merging, as in PEFT
(merging checks norm by norm, so norms holding only one of them may be merged by then; unmerge_adapters
undoes it). Merging is PEFT's swap, exact both ways: γ' takes γ's place (the base key, e.g.
`input_layernorm.weight`, then holds γ') and γ waits in the adapter's slot until unmerging swaps them back.

Which modules: PEFT's defaults per family (peft/utils/constants.py): input_layernorm,
post_attention_layernorm and the final norm on Llama and Mistral; post_attention_layernorm alone on Qwen2
and Qwen3; Gemma 2/3 add their sandwich norms (pre_/post_feedforward_layernorm). PEFT has no default for
Phi-3, Mixtral or Qwen3-MoE; ours are Llama's, Mistral's and Qwen3's. The per-head q_norm/k_norm (Qwen3,
Gemma 3) are adapted only when named. Targets are a list of names (equal to, or ending in '.' + name) or
one regex (full match); each name must select something, and all they select must be RMSNorms.
The file keys are PEFT's: "base_model.model." + module name + ".ln_tuning_layers.weight" (γ').

Left out, which PEFT has: targets that are not norms (PEFT deep-copies any module, llava's lm_head say;
that is modules_to_save's job here), exclude_modules and modules_to_save. Unlike PEFT: disabling adapters
while one is merged refuses, as for every method here (PEFT unmerges it); a second merge refuses (PEFT warns,
unmerges the first and swaps); merging one named adapter while two are active refuses (PEFT merges it); and
saving while merged writes γ' (PEFT writes γ, which its swap moved into the adapter's slot).

Dimensions: C, the normed width (hidden size, or head size for q_norm/k_norm).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..model import RMSNorm
from .base import (
    AdapterLayer,
    Method,
    Option,
    adapter_configs,
    find_targets,
    register_config,
    report,
    set_adapter,
    targets_option,
)
from .peft_format import CONFIG_FILE, PREFIX, AdapterError, check_fields, match_keys

__all__ = ["LNTuningConfig", "LNTuningNorm", "apply_ln_tuning", "to_peft", "load_peft"]

# PEFT's TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING for our families (phi3, mixtral, qwen3_moe: ours).
_LLAMA = ["input_layernorm", "post_attention_layernorm", "norm"]
_GEMMA = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
          "norm"]
DEFAULT_TARGETS = {"llama": _LLAMA, "mistral": _LLAMA, "phi3": _LLAMA, "mixtral": _LLAMA,
                   "qwen2": ["post_attention_layernorm"], "qwen3": ["post_attention_layernorm"],
                   "qwen3_moe": ["post_attention_layernorm"], "gemma2": _GEMMA, "gemma3_text": _GEMMA}
KEY = ".ln_tuning_layers.weight"  # after PREFIX + module name; PEFT drops the adapter's name from the key


@dataclass
class LNTuningConfig:
    """Which norms carry a trainable copy. None means PEFT's default for the model family, filled in by
    `resolve` when the adapter is attached."""

    peft_type: ClassVar[str] = "LN_TUNING"

    targets: list[str] | str | None = None  # names (suffix match) or one regex (full match)

    def __post_init__(self):
        if isinstance(self.targets, (tuple, set)):
            self.targets = sorted(self.targets)

    def resolve(self, model_type: str) -> LNTuningConfig:
        targets = DEFAULT_TARGETS.get(model_type, _LLAMA) if self.targets is None else self.targets
        return dc_replace(self, targets=list(targets) if isinstance(targets, list) else targets)


class LNTuningNorm(AdapterLayer):
    """An RMSNorm with a trainable copy per adapter. The base γ is this module's own `weight` (with the
    norm's eps and plus_one), so base keys do not move; the copies are whole RMSNorm modules, as PEFT's."""

    def __init__(self, base: RMSNorm):
        super().__init__()
        self.weight = base.weight  # γ (C,): frozen
        self.eps, self.plus_one = base.eps, base.plus_one
        self.ln_tuning_layers = nn.ModuleDict()  # name -> RMSNorm holding γ'
        self.active: list[str] = []
        self.merged: dict[str, None] = {}

    def add(self, name: str):
        self.ln_tuning_layers[name] = copy.deepcopy(self.base())  # γ' = γ: the identity at init

    def forward(self, x):
        if self.merged or not self.active:
            return RMSNorm.forward(self, x)  # the model's own norm on γ (γ' once merged): exactly the base
        if len(self.active) > 1:
            raise ValueError(f"LN tuning applies one adapter at a time (as PEFT); active: {self.active}")
        return self.ln_tuning_layers[self.active[0]](x)

    def merge(self, name: str):
        if name in self.merged:
            return
        if len(self.active) > 1:
            raise ValueError(f"LN tuning merges one adapter at a time (as PEFT); active: {self.active}")
        if self.merged:
            raise ValueError(f"LN tuning merges one adapter at a time: {list(self.merged)} is merged; "
                             f"unmerge it before merging {name!r}")
        self._swap(name)
        self.merged[name] = None

    def unmerge(self, name: str):
        if name in self.merged:
            del self.merged[name]
            self._swap(name)

    def _swap(self, name: str):
        """PEFT's merge and unmerge: γ and the adapter's γ' change places (parameters, not values: exact)."""
        tuned = self.ln_tuning_layers[name]
        self.weight, tuned.weight = tuned.weight, self.weight

    def tuned(self, name: str) -> nn.Parameter:
        """The adapter's γ', wherever merging has put it."""
        return self.weight if name in self.merged else self.ln_tuning_layers[name].weight

    def delete(self, name: str):
        if name in self.merged:
            raise ValueError(f"adapter {name!r} is merged into the weights; unmerge it before deleting it")
        if name in self.ln_tuning_layers:
            del self.ln_tuning_layers[name]
        self.active = [a for a in self.active if a != name]

    @property
    def adapters(self) -> list[str]:
        return list(self.ln_tuning_layers)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return {KEY[1:]: self.tuned(name)}

    def base(self) -> RMSNorm:
        """A plain RMSNorm sharing this module's (possibly merged) weight."""
        with torch.device("meta"):
            norm = RMSNorm(self.weight.shape[0], self.eps, self.plus_one)
        norm.weight = self.weight
        return norm

    def extra_repr(self) -> str:
        return f"C={self.weight.shape[0]}, eps={self.eps}, plus_one={self.plus_one}, adapters={self.adapters}"


# -- attaching adapters to a model -----------------------------------------------------------------

def _plan(model: nn.Module, targets) -> tuple[list[str], list[str]]:
    """([names of the targeted norms], [problems]); changes nothing."""
    plan, problems = [], []
    for name in find_targets(model, targets):
        module = model.get_submodule(name)
        if isinstance(module, LNTuningNorm) and module.merged:
            problems.append(f"{name} has adapter {list(module.merged)} merged; unmerge it before adding another")
        elif isinstance(module, AdapterLayer) and not isinstance(module, LNTuningNorm):
            problems.append(f"{name} already carries a {type(module).__name__}; LN tuning cannot be stacked on it")
        elif not isinstance(module, (RMSNorm, LNTuningNorm)):
            problems.append(f"{name} ({type(module).__name__}) is not a norm (LN tuning adapts RMSNorm modules)")
        else:
            plan.append(name)
    return plan, problems


def _norm_names(model: nn.Module) -> str:
    return ", ".join(sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                             if isinstance(m, (RMSNorm, LNTuningNorm))}))


def _attach(model: nn.Module, plan: list[str], adapter_name: str) -> dict[str, LNTuningNorm]:
    layers = {}
    for name in plan:
        module = model.get_submodule(name)
        if not isinstance(module, LNTuningNorm):
            module = LNTuningNorm(module)
            model.set_submodule(name, module)
        module.add(adapter_name)
        layers[name] = module
    return layers


def apply_ln_tuning(model: nn.Module, targets=None, adapter_name: str = "default", verbose: bool = True,
                    config: LNTuningConfig | None = None) -> nn.Module:
    """Attach an LN tuning adapter named `adapter_name` (every γ' = γ), make it the active one, and freeze
    everything else. targets None: PEFT's defaults for the model's family. Every name in a list of targets
    must select a norm, and everything they select must be one; checked before the model changes.

    Returns the model (changed in place). Prints the trainable parameter count when verbose.
    """
    config = (config or LNTuningConfig(targets=targets)).resolve(model.config.model_type)
    if adapter_name in adapter_configs(model):
        raise ValueError(f"an adapter named {adapter_name!r} already exists; delete it or pick another name")
    plan, problems = _plan(model, config.targets)
    if isinstance(config.targets, list):
        problems += [f"target {t!r} matches no module" for t in config.targets if not find_targets(model, [t])]
    if not plan and not problems:
        problems.append(f"targets {config.targets!r} match no module")
    if problems:  # one line: the first problem, and how many more
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"cannot attach LN tuning: {problems[0]}{more}; norms here are named {_norm_names(model)}")
    _attach(model, plan, adapter_name)
    register_config(model, adapter_name, config)
    set_adapter(model, adapter_name)
    if verbose:
        report(model, f"LN tuning '{adapter_name}': {len(plan)} norms")
    return model


# -- PEFT adapter folders (the registry dispatches here on peft_type "LN_TUNING") -----------------------

# PEFT options minicustom does not implement: (field, the value that means "off").
_UNSUPPORTED = (("exclude_modules", None), ("modules_to_save", None))
_FIELDS = {"target_modules": "names", "exclude_modules": "names", "modules_to_save": "name list"}


def to_peft(model: nn.Module, adapter_name: str):
    """(adapter_config.json as PEFT writes it for LN_TUNING, tensors, no extra files)."""
    state = {f"{PREFIX}{name}{KEY}": layer.tuned(adapter_name) for name, layer in model.named_modules()
             if isinstance(layer, LNTuningNorm) and adapter_name in layer.adapters}
    targets = adapter_configs(model)[adapter_name].targets
    return {
        "peft_type": "LN_TUNING", "task_type": "CAUSAL_LM", "target_modules": targets, "exclude_modules": None,
        "modules_to_save": None, "inference_mode": True, "auto_mapping": None, "base_model_name_or_path": None,
        "revision": None,
    }, state, {}


def load_peft(model: nn.Module, path: Path, peft: dict, tensors: dict, adapter_name: str):
    """Attach PEFT's LN_TUNING folder: every targeted norm must have its γ', of the right shape, and every
    key must belong to a targeted norm; all of it is checked before the model changes."""
    where = path / CONFIG_FILE
    check_fields(peft, where, _FIELDS)
    for key, off in _UNSUPPORTED:
        if peft.get(key, off) not in (off, None, False, [], {}):
            raise AdapterError(f"{where}: {key}={peft[key]!r} is not supported")
    config = LNTuningConfig(targets=peft.get("target_modules")).resolve(model.config.model_type)
    plan, problems = _plan(model, config.targets)
    if problems or not plan:
        raise AdapterError(f"{where}: target_modules {config.targets!r}: " + (
            "; ".join(problems) or "select no module of this model"))
    modules = dict(model.named_modules())
    expected = {name: tuple(modules[name].weight.shape) for name in plan}

    found = match_keys(path, tensors, KEY, expected, modules, "LN tuning", "norm", config.targets)

    # Checked: now change the model.
    layers = _attach(model, plan, adapter_name)
    with torch.no_grad():
        for name, t in found.items():
            layers[name].ln_tuning_layers[adapter_name].weight.copy_(t)
    register_config(model, adapter_name, config)


LN_TUNING = Method("ln_tuning", lambda model, targets=None: apply_ln_tuning(model, targets=targets),
                   "LN tuning: a trainable copy of each norm's weight", lr=1e-3, mergeable=True,
                   peft_type="LN_TUNING", options=(Option("targets", None, "norms to adapt: names separated by commas "
                                                          "(LN tuning without it: PEFT's for the family, input_layernorm,"
                                                          "post_attention_layernorm,norm on Llama)",
                                                          type=targets_option),),
                   to_peft=to_peft, load_peft=load_peft, targetable=lambda module: isinstance(module, RMSNorm))
