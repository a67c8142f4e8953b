"""HRA: Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder Reflection Adaptation
(Yuan, Liu, Gao, Chen and Xu, NeurIPS 2024, arXiv:2405.17484), as PEFT's HRA applies it.

A frozen linear W0 (out, in) is multiplied on the right by a chain of r learned Householder reflections, an
orthogonal matrix R, so the adapted layer rotates (or reflects) its input space:

    y = W0 R x + b,    R = H_1 H_2 ... H_r,    H_i = I - 2 u_i u_iᵀ / ||u_i||²,    U = [u_1 ... u_r]: (in, r)

Each H_i is orthogonal and its own inverse, so R⁻¹ = Rᵀ = H_r ... H_1, and ||W0 R||_F = ||W0||_F: the
singular values of W0 are kept. W0 R = W0 - W0 (I - R) is also W0 plus an update of rank ≤ r (the paper's
"adaptive LoRA"). apply_GS (PEFT's Gram-Schmidt variant) first orthonormalizes U into Q, in column order,
and takes R = I - 2 Q Qᵀ, which is the same product H_1 ... H_r of reflections through orthonormal vectors
(they commute) and is its own inverse.

PEFT's init (init_weights=True): for even r, r/2 columns drawn Kaiming-uniform (a = √5 on an (in, r/2)
tensor) and each repeated (torch.repeat_interleave): u_1 = u_2, u_3 = u_4, ..., so each pair H H = I and R
is the identity up to rounding (a few ulps; not bit-exact, as PEFT's). Odd r cannot pair, and PEFT warns and
draws all r columns (a = √5 on (in, r)), as does init_weights=False: R != I at init. With apply_GS the
symmetric init is no identity either: the second column of each pair orthogonalizes to rounding noise,
which normalization blows up to a unit vector (PEFT's behaviour, kept). Several named adapters active in
one module chain: W0 R_a R_b, in the order of `active`. Merging folds R in, W <- W R (PEFT's torch.mm), and
unmerging multiplies by the reflections in reverse order, W <- W H_r ... H_1 (PEFT's get_delta_weight
with reverse=True): W0 again within a few roundings of |W0|, since R is orthogonal.

Orthogonality regularizer: neither PEFT's HRA nor its HRA example (examples/hra_dreambooth) adds one; the
paper's authors (github.com/DaShenZi721/HRA, llama/finetune_32.py, lamda=1e-4) add, for every module's
U, λ ||I_r - Ûᵀ Û||_F (Frobenius norm, not squared) to the loss, with Û = U / (column norms).
`orthogonality_loss(model, weight)` returns exactly that sum over the active adapters.

Which modules: PEFT's TRANSFORMERS_MODELS_TO_HRA_TARGET_MODULES_MAPPING is a copy of LoRA's: q_proj, v_proj
on every family here (Llama, Mistral, Mixtral, Qwen2/3, Gemma 2/3); PEFT has none for Phi-3 (ours: qkv_proj)
and Qwen3-MoE (ours: Qwen3's). Targets are a list of names (equal to, or ending in '.' + name), one regex
(full match) or "all-linear", and `layers` (layers_to_transform) keeps those of some decoder layers. The
file key is PEFT's: "base_model.model." + module name + ".hra_u", shape (in, r).

Left out, which PEFT has: Conv2d targets, bias="all" / "hra_only" (only "none" is accepted), exclude_modules,
modules_to_save, layers_pattern, and folding into a 4-bit base (the adapter runs on one: W0 R x is the 4-bit
layer applied to R x). PEFT's forward on a module with some adapters merged ignores the unmerged ones;
here they are applied on top of the merged weight.

Dimensions: in/out features of the adapted linear, r number of reflections.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..argtypes import COUNT
from ..quant.linear4bit import Linear4bit
from .base import (
    LinearAdapterLayer,
    Method,
    Option,
    adapter_configs,
    adapter_layers,
    plan_linears,
    plan_or_refuse,
    register_config,
    report,
    set_adapter,
    targets_option,
)
from .peft_format import CONFIG_FILE, PREFIX, AdapterError, check_fields, match_keys, refuse_unsupported

__all__ = ["HRAConfig", "HRALinear", "apply_hra", "orthogonality_loss", "to_peft", "load_peft"]

# PEFT's TRANSFORMERS_MODELS_TO_HRA_TARGET_MODULES_MAPPING (LoRA's) for our families; phi3, qwen3_moe: ours.
DEFAULT_TARGETS = {"phi3": ["qkv_proj"]}
_QV = ["q_proj", "v_proj"]


@dataclass
class HRAConfig:
    """Number of reflections, the Gram-Schmidt switch and which linears are rotated. targets None means
    PEFT's default for the model family, filled in by `resolve` when the adapter is attached."""

    peft_type: ClassVar[str] = "HRA"

    r: int = 8  # even: the symmetric init makes R the identity
    apply_gs: bool = False  # PEFT's apply_GS: R = I - 2 Q Qᵀ with Q = Gram-Schmidt(U)
    targets: list[str] | str | None = None  # names (suffix match), one regex (full match), "all-linear"
    init_weights: bool = True  # False: every column random, R != I at init (PEFT's testing switch)
    layers: list[int] | None = None  # only these decoder layers (PEFT's layers_to_transform)

    def __post_init__(self):
        if isinstance(self.targets, (tuple, set)):
            self.targets = sorted(self.targets)
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"HRA's number of reflections r must be a positive integer, found {self.r!r}")
        if not isinstance(self.apply_gs, bool):
            raise ValueError(f"HRA's apply_gs must be True or False, found {self.apply_gs!r}")

    def resolve(self, model_type: str) -> HRAConfig:
        targets = DEFAULT_TARGETS.get(model_type, _QV) if self.targets is None else self.targets
        return dc_replace(self, targets=list(targets) if isinstance(targets, list) else targets)


class HRALinear(LinearAdapterLayer):
    """HRA on an nn.Linear (W0 shared as `weight`, b as `bias`, so base keys do not move) or on a 4-bit
    `Linear4bit` (held as `base_layer`; the reflections rotate its input, merging into it is refused)."""

    def __init__(self, base: nn.Linear | Linear4bit):
        super().__init__()
        self.hold(base)
        self.hra_u = nn.ParameterDict()  # name -> U (in, r)
        self.apply_gs: dict[str, bool] = {}
        self.active: list[str] = []
        self.merged: dict[str, None] = {}

    def add(self, name: str, r: int, apply_gs: bool = False, init_weights: bool = True):
        if init_weights and r % 2 == 0:  # PEFT's symmetric init: r/2 columns, each twice
            half = torch.empty(self.in_features, r // 2, **self.factory())
            nn.init.kaiming_uniform_(half, a=math.sqrt(5))
            u = torch.repeat_interleave(half, 2, dim=1)  # (in, r): u_1 = u_2, u_3 = u_4, ...
        else:
            if init_weights:
                warnings.warn(f"HRA: r={r} is odd, so the symmetric init cannot pair the reflections and R is not "
                              "the identity at init (PEFT warns the same)", stacklevel=4)
            u = torch.empty(self.in_features, r, **self.factory())
            nn.init.kaiming_uniform_(u, a=math.sqrt(5))
        self.hra_u[name] = nn.Parameter(u)
        self.apply_gs[name] = apply_gs

    def rotation(self, name: str, reverse: bool = False) -> torch.Tensor:
        """R = H_1 ... H_r (in, in); reverse: H_r ... H_1 = R⁻¹. PEFT's get_delta_weight, op for op."""
        u = self.hra_u[name]  # (in, r)
        eye = torch.eye(u.shape[0], device=u.device, dtype=u.dtype)
        if self.apply_gs[name]:  # Q = Gram-Schmidt(U) in column order; R = I - 2 Q Qᵀ is its own inverse
            q = [u[:, :1] / u[:, 0].norm()]
            for i in range(1, u.shape[1]):
                ui = u[:, i:i + 1]  # (in, 1)
                for qj in q:
                    ui = ui - (qj.T @ ui) * qj  # (1, in) @ (in, 1) -> (1, 1)
                q.append(ui / ui.norm())
            q = torch.cat(q, dim=1)  # (in, r)
            return eye - 2 * q @ q.T  # (in, r) @ (r, in) -> (in, in)
        u = u / u.norm(dim=0)  # unit columns, so H_i = I - 2 u_i u_iᵀ
        rot = eye
        for i in (reversed(range(u.shape[1])) if reverse else range(u.shape[1])):
            ui = u[:, i:i + 1]  # (in, 1)
            rot = rot - 2 * rot @ ui @ ui.T  # R H_i: (in, in) @ (in, 1) @ (1, in)
        return rot

    def forward(self, x):
        names = [n for n in self.active if n not in self.merged]
        if not names:
            return self.base_forward(x)
        rot = self.rotation(names[0])
        for name in names[1:]:
            rot = rot @ self.rotation(name)  # R_a R_b: (in, in) @ (in, in)
        if self.base_layer is not None:  # W0 R x + b = the 4-bit layer applied to R x
            return self.base_layer(F.linear(x.to(rot.dtype), rot).to(x.dtype))  # (B, T, in) @ (in, in)ᵀ
        w = self.weight.to(rot.dtype) @ rot  # W0 R: (out, in) @ (in, in), as PEFT's forward
        bias = None if self.bias is None else self.bias.to(rot.dtype)
        return F.linear(x.to(rot.dtype), w, bias).to(x.dtype)  # (B, T, in) @ (in, out) -> (B, T, out)

    @torch.no_grad()
    def merge(self, name: str):
        if name in self.merged:
            return
        if self.base_layer is not None:
            raise ValueError("the base is 4-bit and cannot take HRA's rotation in place (qlora.merge_4bit folds "
                             "LoRA only); keep the adapter unmerged, or load the base in full precision to merge")
        rot = self.rotation(name)
        self.weight.copy_((self.weight.to(rot.dtype) @ rot).to(self.weight.dtype))  # W <- W R
        self.merged[name] = None

    @torch.no_grad()
    def unmerge(self, name: str):
        if name in self.merged:
            del self.merged[name]
            rot_inv = self.rotation(name, reverse=True)
            self.weight.copy_((self.weight.to(rot_inv.dtype) @ rot_inv).to(self.weight.dtype))  # W <- W H_r ... H_1

    def delete(self, name: str):
        if name in self.merged:
            raise ValueError(f"adapter {name!r} is merged into the weights; unmerge it before deleting it")
        if name in self.hra_u:
            del self.hra_u[name]
        self.apply_gs.pop(name, None)
        self.active = [a for a in self.active if a != name]

    @property
    def adapters(self) -> list[str]:
        return list(self.hra_u)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return {"hra_u": self.hra_u[name]}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={self.adapters}"


def orthogonality_loss(model: nn.Module, weight: float = 1e-4, adapter_names: list[str] | None = None):
    """λ Σ_modules ||I_r - Ûᵀ Û||_F with Û = U / (column norms): the HRA authors' regularizer (lamda 1e-4 in
    their LLaMA fine-tuning), over each HRA layer's active adapters (or `adapter_names`). Add it to the loss;
    a 0-dim tensor (0. when the model has no HRA layer)."""
    total = None
    for _, layer in adapter_layers(model):
        if not isinstance(layer, HRALinear):
            continue
        for name in adapter_names if adapter_names is not None else layer.active:
            if name not in layer.hra_u:
                continue
            u = layer.hra_u[name]
            u_hat = u / u.norm(dim=0)  # (in, r), unit columns
            eye = torch.eye(u.shape[1], device=u.device, dtype=u.dtype)
            term = weight * (eye - u_hat.T @ u_hat).norm()  # (r, in) @ (in, r) -> (r, r)
            total = term if total is None else total + term
    return torch.zeros(()) if total is None else total


# -- attaching adapters to a model -----------------------------------------------------------------

def _attach(model: nn.Module, plan: list[str], adapter_name: str, config: HRAConfig) -> dict[str, HRALinear]:
    layers = {}
    for name in plan:
        module = model.get_submodule(name)
        if not isinstance(module, HRALinear):
            module = HRALinear(module)
            model.set_submodule(name, module)
        module.add(adapter_name, config.r, config.apply_gs, config.init_weights)
        layers[name] = module
    return layers


def apply_hra(model: nn.Module, r: int = 8, apply_gs: bool = False, targets=None, init_weights: bool = True,
              layers=None, adapter_name: str = "default", verbose: bool = True,
              config: HRAConfig | None = None) -> nn.Module:
    """Attach an HRA adapter named `adapter_name` (R = I up to rounding for even r unless init_weights=False),
    make it the active one, and freeze everything else. targets None: PEFT's defaults for the family (q_proj,
    v_proj). Every name in a list of targets must select a linear, and everything they select must be one;
    checked before the model changes. Returns the model (changed in place); prints the trainable parameter
    count when verbose.
    """
    config = (config or HRAConfig(r=r, apply_gs=apply_gs, targets=targets, init_weights=init_weights,
                                  layers=layers)).resolve(model.config.model_type)
    if adapter_name in adapter_configs(model):
        raise ValueError(f"an adapter named {adapter_name!r} already exists; delete it or pick another name")
    plan = plan_or_refuse(model, config, HRALinear, "HRA")  # one line: the first problem, and how many more
    _attach(model, plan, adapter_name, config)
    register_config(model, adapter_name, config)
    set_adapter(model, adapter_name)
    if verbose:
        report(model, f"HRA '{adapter_name}': {len(plan)} modules, r={config.r}, apply_gs={config.apply_gs}")
    return model


# -- PEFT adapter folders (the registry dispatches here on peft_type "HRA") ------------------------------

# PEFT options minicustom does not implement: (field, the value that means "off").
_UNSUPPORTED = (("bias", "none"), ("exclude_modules", None), ("modules_to_save", None), ("layers_pattern", None))
_FIELDS = {"r": "positive int", "apply_GS": "bool", "target_modules": "names", "init_weights": "bool",
           "layers_to_transform": "layers", "bias": "str", "exclude_modules": "names", "modules_to_save": "name list",
           "layers_pattern": "names"}


def to_peft(model: nn.Module, adapter_name: str):
    """(adapter_config.json as PEFT writes it for HRA, tensors, no extra files). Merged or not, U is saved."""
    config = adapter_configs(model)[adapter_name]
    state = {f"{PREFIX}{name}.hra_u": layer.hra_u[adapter_name] for name, layer in model.named_modules()
             if isinstance(layer, HRALinear) and adapter_name in layer.adapters}
    return {
        "peft_type": "HRA", "task_type": "CAUSAL_LM", "r": config.r, "apply_GS": config.apply_gs,
        "target_modules": config.targets, "exclude_modules": None, "init_weights": config.init_weights,
        "layers_to_transform": config.layers, "layers_pattern": None, "bias": "none", "modules_to_save": None,
        "inference_mode": True, "auto_mapping": None, "base_model_name_or_path": None, "revision": None,
    }, state, {}


def load_peft(model: nn.Module, path: Path, peft: dict, tensors: dict, adapter_name: str):
    """Attach PEFT's HRA folder: every targeted linear must have its U, of shape (in, r), and every key must
    belong to a targeted linear; all of it is checked before the model changes."""
    where = path / CONFIG_FILE
    check_fields(peft, where, _FIELDS)
    refuse_unsupported(peft, where, _UNSUPPORTED, "HRA")
    config = HRAConfig(r=peft.get("r") or 8, apply_gs=peft.get("apply_GS") is True,
                       targets=peft.get("target_modules"), init_weights=peft.get("init_weights") is not False,
                       layers=peft.get("layers_to_transform")).resolve(model.config.model_type)
    plan, problems = plan_linears(model, config, HRALinear, "HRA")
    if problems or not plan:
        raise AdapterError(f"{where}: target_modules {config.targets!r}: " + (
            "; ".join(problems) or "select no module of this model"))
    modules = dict(model.named_modules())
    expected = {n: (modules[n].in_features, config.r) for n in plan}
    found = match_keys(path, tensors, ".hra_u", expected, modules, "HRA", "linear", config.targets,
                       shape_note=lambda shape: " (in_features, r)")

    # Checked: now change the model.
    layers = _attach(model, plan, adapter_name, config)
    with torch.no_grad():
        for name, t in found.items():
            layers[name].hra_u[adapter_name].copy_(t)
    register_config(model, adapter_name, config)


def _apply(model: nn.Module, r: int = 8, apply_gs: bool = False, targets=None) -> nn.Module:
    return apply_hra(model, r=r, apply_gs=apply_gs, targets=targets)


HRA = Method("hra", _apply, "HRA: each frozen linear times a chain of r learned Householder reflections", lr=1e-3,
             mergeable=True, peft_type="HRA", options=(
                 Option("r", 8, "rank r: HRA's number of Householder reflections (even: the identity at init)",
                        type=COUNT),
                 Option("apply_gs", False, "HRA: Gram-Schmidt-orthogonalize the reflection vectors (PEFT's apply_GS)",
                        flag=True),
                 Option("targets", None, "modules to adapt: all-linear, or names separated by commas (HRA "
                                         "without it: PEFT's for the family, q_proj,v_proj)", type=targets_option)),
             to_peft=to_peft, load_peft=load_peft)
