"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko, Blankevoort and Asano, ICLR 2024, arXiv:2310.11454),
as PEFT's VERA applies it.

One pair of frozen random matrices A (r, in) and B (out, r) is shared by every adapted linear; each linear
learns only two vectors, λ_d (r) and λ_b (out), that scale B A's rows and columns:

    y = W0 x + b + ΔW x,    ΔW = Λ_b B Λ_d A,    Λ_d = diag(λ_d),  Λ_b = diag(λ_b)

so a layer trains r + out numbers where LoRA trains r (in + out), and r can be far larger (PEFT's default
256). As PEFT does, A and B are drawn once at the largest shapes over the targeted linears, A (r, max in) and
B (max out, r), and a linear of (out, in) uses A[:, :in] and B[:out, :].

PEFT's init: a CPU torch.Generator seeded with projection_prng_key draws A, then B, each Kaiming-uniform with
gain √2 on its fan-in (A: max in, B: r), U(-√(6 / fan_in), √(6 / fan_in)); the same seed gives bit-identical
projections here and in PEFT. λ_b = 0 and λ_d = d_initial (0.1), so ΔW = 0 exactly and the model is unchanged
at step 0 (λ_d is first drawn from torch.randn(r) per layer, on the global RNG, as PEFT does; with
init_weights=False that draw stays and λ_b = 1, PEFT's test setting). Dropout (vera_dropout) acts on the
adapter's input in training. Several named adapters active in one module add their ΔW x; each adapter has its
own pair (PEFT requires one projection_prng_key and one save_projection for all of a model's VeRA adapters,
and so does minicustom). Merging folds ΔW into W0 and unmerging subtracts it (equal to W0 within a rounding
of |W0| + |ΔW|).

Which modules: PEFT's TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING (LoRA's): q_proj, v_proj on every
family here; PEFT has none for Phi-3 (ours: qkv_proj) and Qwen3-MoE (ours: Qwen3's). Targets are a list of
names (equal to, or ending in '.' + name), one regex (full match) or "all-linear", and `layers`
(layers_to_transform) keeps those of some decoder layers. PEFT 0.21 takes any mix of linear shapes (the
slicing above), and so does minicustom. The file keys are PEFT's: "base_model.model." + module name +
".vera_lambda_b" / ".vera_lambda_d", and, with save_projection=True (the default), the shared pair as
"base_model.vera_A" and "base_model.vera_B"; with save_projection=False the seed regenerates them on load.

Left out, which PEFT has: Conv1D targets and fan_in_fan_out (GPT-2), bias="all"/"vera_only",
modules_to_save, layers_pattern other than the decoder's "layers", and folding into a 4-bit base (the adapter
runs on one; merging is refused).

Dimensions: in/out features of the adapted linear, r the projections' rank.
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

from ..argtypes import COUNT, DROPOUT, FINITE, SEED
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
from .peft_format import (
    CONFIG_FILE,
    PREFIX,
    WEIGHTS_FILE,
    AdapterError,
    check_fields,
    match_factors,
    refuse_unsupported,
)

__all__ = ["VeraConfig", "VeraLinear", "VeraProjections", "apply_vera", "projections", "to_peft", "load_peft"]

# PEFT's TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING (LoRA's) for our families; phi3, qwen3_moe: ours.
DEFAULT_TARGETS = {"phi3": ["qkv_proj"]}
_QV = ["q_proj", "v_proj"]
VECTORS = ("vera_lambda_b", "vera_lambda_d")
PROJECTION_KEYS = ("base_model.vera_A", "base_model.vera_B")  # the shared pair in PEFT's file
SEED_RANGE = (-2**63, 2**64)  # what torch.Generator.manual_seed takes


@dataclass
class VeraConfig:
    """Rank, seed and which linears carry the update. targets None means PEFT's default for the model family,
    filled in by `resolve` when the adapter is attached."""

    peft_type: ClassVar[str] = "VERA"

    r: int = 256  # PEFT's default: the projections' rank (only λ_d has r entries per layer)
    targets: list[str] | str | None = None  # names (suffix match), one regex (full match), "all-linear"
    projection_prng_key: int = 0  # the seed of A and B
    save_projection: bool = True  # write A and B into the file (False: the seed regenerates them)
    dropout: float = 0.0  # on the adapter's input (PEFT's vera_dropout)
    d_initial: float = 0.1  # λ_d's start
    init_weights: bool = True  # False: λ_d ~ N(0, 1), λ_b = 1, so ΔW != 0 at init (PEFT's testing switch)
    layers: list[int] | None = None  # only these decoder layers (PEFT's layers_to_transform)

    def __post_init__(self):
        if isinstance(self.targets, (tuple, set)):
            self.targets = sorted(self.targets)
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        if not _is_int(self.r) or self.r <= 0:
            raise ValueError(f"VeRA rank r must be a positive integer, found {self.r!r}")
        if not _is_int(self.projection_prng_key) or not SEED_RANGE[0] <= self.projection_prng_key < SEED_RANGE[1]:
            raise ValueError(f"VeRA projection_prng_key must be an integer in [-2**63, 2**64), found "
                             f"{self.projection_prng_key!r}")
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool) or not 0 <= self.dropout < 1:
            raise ValueError(f"VeRA dropout must be a number in [0, 1), found {self.dropout!r}")
        if not isinstance(self.d_initial, (int, float)) or not math.isfinite(self.d_initial):
            raise ValueError(f"VeRA d_initial must be a finite number, found {self.d_initial!r}")

    def resolve(self, model_type: str) -> VeraConfig:
        targets = DEFAULT_TARGETS.get(model_type, _QV) if self.targets is None else self.targets
        return dc_replace(self, targets=list(targets) if isinstance(targets, list) else targets)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's vera._kaiming_init: U(-bound, bound), bound = √3 · √2 / √fan_in, fan_in = shape[1]; the bound is
    computed in the same order of float operations, so the draws are bit-identical."""
    std = math.sqrt(2) / math.sqrt(shape[1])
    bound = math.sqrt(3.0) * std
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def projections(r: int, max_in: int, max_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, max_in), B (max_out, r)) in fp32 on the CPU, drawn as PEFT's _init_vera_A_vera_B draws them."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    a = _kaiming_uniform((r, max_in), generator)
    return a, _kaiming_uniform((max_out, r), generator)


class VeraProjections(nn.Module):
    """One adapter's frozen pair, shared by every VeraLinear it adapts (one module, referenced by each, so
    `model.to(...)` moves it once). Non-persistent buffers: not in the model's state dict (the adapter file
    holds them once, or the seed does)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.register_buffer("vera_A", a, persistent=False)  # (r, max in)
        self.register_buffer("vera_B", b, persistent=False)  # (max out, r)


class VeraLinear(FactoredLinear):
    """VeRA on an nn.Linear (W0 shared as `weight`, b as `bias`, so base keys do not move) or on a 4-bit
    `Linear4bit` (held as `base_layer`; its adapter runs, merging into it is refused). Merging and the
    adapter bookkeeping are FactoredLinear's; the forward is PEFT's, through r without forming ΔW."""

    FACTORS = VECTORS  # the trainable tensors, under their file keys
    method = "VeRA"

    def __init__(self, base: nn.Linear | Linear4bit):
        super().__init__(base)
        self.vera_lambda_b = nn.ParameterDict()  # name -> (out,)
        self.vera_lambda_d = nn.ParameterDict()  # name -> (r,)
        self.vera_projections = nn.ModuleDict()  # name -> the adapter's shared VeraProjections
        self.dropout: dict[str, float] = {}

    def add(self, name: str, shared: VeraProjections, config: VeraConfig):
        r, (max_out, max_in) = config.r, (shared.vera_B.shape[0], shared.vera_A.shape[1])
        if shared.vera_A.shape[0] != r or shared.vera_B.shape[1] != r or max_in < self.in_features \
                or max_out < self.out_features:
            raise ValueError(f"VeRA projections A {tuple(shared.vera_A.shape)}, B {tuple(shared.vera_B.shape)} do "
                             f"not cover a ({self.out_features}, {self.in_features}) linear at r={r}")
        # PEFT's order: λ_b = 1, λ_d ~ N(0, 1) on the global RNG; then both reset unless init_weights=False.
        lambda_b, lambda_d = torch.ones(self.out_features), torch.randn(r)
        if config.init_weights:
            lambda_b.zero_()  # ΔW = Λ_b B Λ_d A = 0: the identity at init
            lambda_d.fill_(config.d_initial)
        self.vera_lambda_b[name] = nn.Parameter(lambda_b.to(**self.factory()))
        self.vera_lambda_d[name] = nn.Parameter(lambda_d.to(**self.factory()))
        self.vera_projections[name] = shared
        self.dropout[name] = config.dropout

    def sliced(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """This linear's A[:, :in] (r, in) and B[:out, :] (out, r)."""
        shared = self.vera_projections[name]
        return shared.vera_A[:, :self.in_features], shared.vera_B[:self.out_features, :]

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = (λ_b ⊙ B) (λ_d ⊙ A): (out, r) @ (r, in) -> (out, in). As PEFT, half precision on the CPU is
        computed in fp32 and cast back."""
        a, b = self.sliced(name)
        lambda_b, lambda_d = self.vera_lambda_b[name], self.vera_lambda_d[name]
        dtype = b.dtype
        if b.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            a, b, lambda_b, lambda_d = a.float(), b.float(), lambda_b.float(), lambda_d.float()
        return ((lambda_b[:, None] * b) @ (lambda_d[:, None] * a)).to(dtype)

    def forward(self, x):
        y = self.base_forward(x)
        for name in self.active:
            if name not in self.merged:
                a, b = self.sliced(name)
                lambda_b, lambda_d = self.vera_lambda_b[name], self.vera_lambda_d[name]
                p = self.dropout[name]  # PEFT's nn.Identity at p = 0: no draw from the RNG
                x_ = (F.dropout(x, p, self.training) if p else x).to(lambda_d.dtype)
                h = lambda_d * F.linear(x_, a)  # (B, T, in) @ (in, r) -> (B, T, r), scaled by λ_d
                y = y + lambda_b * F.linear(h, b)  # (B, T, r) @ (r, out) -> (B, T, out), scaled by λ_b
        return y.to(x.dtype)

    def delete(self, name: str):
        super().delete(name)  # the vectors (refused while merged)
        if name in self.vera_projections:
            del self.vera_projections[name]
        self.dropout.pop(name, None)


# -- attaching adapters to a model -----------------------------------------------------------------

def _conflict(model: nn.Module, config: VeraConfig) -> str | None:
    """PEFT's rule for a model's VeRA adapters: one projection_prng_key and one save_projection for all."""
    for name, other in adapter_configs(model).items():
        if isinstance(other, VeraConfig):
            for key in ("projection_prng_key", "save_projection"):
                if getattr(other, key) != getattr(config, key):
                    return (f"{key}={getattr(config, key)!r}, but VeRA adapter {name!r} of this model has "
                            f"{getattr(other, key)!r} (PEFT requires one value for all VeRA adapters)")
    return None


def _shapes(model: nn.Module, plan: list[str], r: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The shared pair's shapes: A (r, largest in), B (largest out, r) over the targeted linears."""
    modules = [model.get_submodule(n) for n in plan]
    return (r, max(m.in_features for m in modules)), (max(m.out_features for m in modules), r)


def _attach(model: nn.Module, plan: list[str], adapter_name: str, config: VeraConfig,
            a: torch.Tensor, b: torch.Tensor) -> dict[str, VeraLinear]:
    layers, shared = {}, None
    for name in plan:
        module = model.get_submodule(name)
        if not isinstance(module, VeraLinear):
            module = VeraLinear(module)
            model.set_submodule(name, module)
        if shared is None:  # on the first layer's device, in its dtype
            shared = VeraProjections(a.to(**module.factory()), b.to(**module.factory()))
        module.add(adapter_name, shared, config)
        layers[name] = module
    return layers


def apply_vera(model: nn.Module, r: int = 256, targets=None, projection_prng_key: int = 0,
               save_projection: bool = True, dropout: float = 0.0, d_initial: float = 0.1, init_weights: bool = True,
               layers=None, adapter_name: str = "default", verbose: bool = True,
               config: VeraConfig | None = None) -> nn.Module:
    """Attach a VeRA adapter named `adapter_name` (ΔW = 0 unless init_weights=False), make it the active one,
    and freeze everything else. targets None: PEFT's defaults for the family (q_proj, v_proj). Every name in a
    list of targets must select a linear, and everything they select must be one; checked before the model
    changes. Returns the model (changed in place); prints the trainable parameter count when verbose."""
    config = (config or VeraConfig(r=r, targets=targets, projection_prng_key=projection_prng_key,
                                   save_projection=save_projection, dropout=dropout, d_initial=d_initial,
                                   init_weights=init_weights, layers=layers)).resolve(model.config.model_type)
    if adapter_name in adapter_configs(model):
        raise ValueError(f"an adapter named {adapter_name!r} already exists; delete it or pick another name")
    plan = plan_or_refuse(model, config, VeraLinear, "VeRA")  # one line: the first problem, and how many more
    if conflict := _conflict(model, config):
        raise ValueError(f"cannot attach VeRA: {conflict}")
    (_, max_in), (max_out, _) = _shapes(model, plan, config.r)
    _attach(model, plan, adapter_name, config, *projections(config.r, max_in, max_out, config.projection_prng_key))
    register_config(model, adapter_name, config)
    set_adapter(model, adapter_name)
    if verbose:
        report(model, f"VeRA '{adapter_name}': {len(plan)} modules, r={config.r}, d_initial={config.d_initial}")
    return model


# -- PEFT adapter folders (the registry dispatches here on peft_type "VERA") ------------------------------

# PEFT options minicustom does not implement: (field, the value that means "off").
_UNSUPPORTED = (("fan_in_fan_out", False), ("bias", "none"), ("modules_to_save", None))
_FIELDS = {"r": "positive int", "target_modules": "names", "save_projection": "bool", "vera_dropout": "dropout",
           "d_initial": "number", "fan_in_fan_out": "bool", "bias": "str", "modules_to_save": "name list",
           "init_weights": "bool", "layers_to_transform": "layers", "layers_pattern": "names"}


def to_peft(model: nn.Module, adapter_name: str):
    """(adapter_config.json as PEFT writes it for VERA, tensors, no extra files). Merged or not, the vectors
    (and, with save_projection, the shared pair) are what is saved."""
    config = adapter_configs(model)[adapter_name]
    layers = [(name, layer) for name, layer in model.named_modules()
              if isinstance(layer, VeraLinear) and adapter_name in layer.adapters]
    state = {f"{PREFIX}{name}.{k}": t for name, layer in layers for k, t in layer.adapter_state(adapter_name).items()}
    if config.save_projection:
        shared = layers[0][1].vera_projections[adapter_name]
        state.update(zip(PROJECTION_KEYS, (shared.vera_A, shared.vera_B)))
    return {
        "peft_type": "VERA", "task_type": "CAUSAL_LM", "r": config.r, "target_modules": config.targets,
        "projection_prng_key": config.projection_prng_key, "save_projection": config.save_projection,
        "vera_dropout": config.dropout, "d_initial": config.d_initial, "fan_in_fan_out": False, "bias": "none",
        "modules_to_save": None, "init_weights": config.init_weights, "layers_to_transform": config.layers,
        "layers_pattern": None, "inference_mode": True, "auto_mapping": None, "base_model_name_or_path": None,
        "revision": None,
    }, state, {}


def load_peft(model: nn.Module, path: Path, peft: dict, tensors: dict, adapter_name: str):
    """Attach PEFT's VERA folder: every targeted linear must have its two vectors, of the right shapes, every
    key must belong to a targeted linear, and the shared pair must be in the file (save_projection true) with
    the shapes the targets give, or be regenerated from projection_prng_key; all of it is checked before the
    model changes."""
    where, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    check_fields(peft, where, _FIELDS)
    refuse_unsupported(peft, where, _UNSUPPORTED, "VeRA")
    if peft.get("layers_pattern") not in (None, "layers", ["layers"]):
        raise AdapterError(f"{where}: layers_pattern={peft['layers_pattern']!r} is not supported (the decoder "
                           "layers here are 'layers')")
    seed = peft.get("projection_prng_key", 0)
    if not _is_int(seed) or not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        raise AdapterError(f"{where}: field 'projection_prng_key' must be an integer in [-2**63, 2**64) (a "
                           f"torch.Generator seed), found {seed!r}")
    config = VeraConfig(r=peft.get("r") or 256, targets=peft.get("target_modules"), projection_prng_key=seed,
                        save_projection=peft.get("save_projection") is not False,
                        dropout=float(peft.get("vera_dropout") or 0.0),
                        d_initial=0.1 if peft.get("d_initial") is None else peft["d_initial"],
                        init_weights=peft.get("init_weights") is not False,
                        layers=peft.get("layers_to_transform")).resolve(model.config.model_type)
    plan, problems = plan_linears(model, config, VeraLinear, "VeRA")
    if problems or not plan:
        raise AdapterError(f"{where}: target_modules {config.targets!r}: " + (
            "; ".join(problems) or "select no module of this model"))
    if conflict := _conflict(model, config):
        raise AdapterError(f"{where}: {conflict}")

    shapes = _shapes(model, plan, config.r)
    tensors = dict(tensors)
    pair = [tensors.pop(k, None) for k in PROJECTION_KEYS]
    if not config.save_projection:
        if any(t is not None for t in pair):  # PEFT warns and regenerates them; so does minicustom
            warnings.warn(f"{where}: save_projection is false, but {weights} holds {PROJECTION_KEYS[0]} and "
                          f"{PROJECTION_KEYS[1]}; they are ignored and projection_prng_key={seed} regenerates "
                          "them, as PEFT does", stacklevel=2)
        pair = list(projections(config.r, shapes[0][1], shapes[1][0], seed))
    for key, t, shape in zip(PROJECTION_KEYS, pair, shapes):
        if t is None:
            raise AdapterError(f"{weights}: {key} is missing, but save_projection is true in {CONFIG_FILE} (the "
                               "shared random pair must be in the file; a folder without it says save_projection "
                               "false, and projection_prng_key regenerates it)")
        if tuple(t.shape) != shape:
            raise AdapterError(f"{weights}: {key} has shape {tuple(t.shape)}, expected {shape} (r={config.r}; "
                               f"the largest {'in' if key.endswith('A') else 'out'} features of the targeted "
                               f"linears, target_modules {config.targets!r})")
    modules = dict(model.named_modules())
    expected = {v: {n: (modules[n].out_features,) if v.endswith("_b") else (config.r,) for n in plan}
                for v in VECTORS}
    found = match_factors(path, tensors, expected, modules, "VeRA", config.targets)

    # Checked: now change the model.
    layers = _attach(model, plan, adapter_name, config, *pair)
    with torch.no_grad():
        for v, by_name in found.items():
            for name, t in by_name.items():
                getattr(layers[name], v)[adapter_name].copy_(t)
    register_config(model, adapter_name, config)


VERA = Method("vera", lambda model, r=256, d_initial=0.1, dropout=0.0, targets=None, projection_prng_key=0: apply_vera(
                  model, r=r, d_initial=d_initial, dropout=dropout, targets=targets,
                  projection_prng_key=projection_prng_key),
              "VeRA: shared frozen random A, B; trained scaling vectors beside each frozen linear", lr=1e-2,
              mergeable=True, peft_type="VERA", options=(
                  Option("r", 256, "rank r of the shared random projections (VeRA: PEFT's default 256)", type=COUNT),
                  Option("d_initial", 0.1, "VeRA's start of the λ_d vectors", type=FINITE),
                  Option("dropout", 0.0, "dropout on the adapter's input", type=DROPOUT),
                  Option("targets", None, "modules to adapt: all-linear, or names separated by commas (VeRA "
                                          "without it: PEFT's for the family, q_proj,v_proj)", type=targets_option),
                  Option("projection_prng_key", 0, "seed of VeRA's shared random projections", type=SEED)),
              to_peft=to_peft, load_peft=load_peft)
