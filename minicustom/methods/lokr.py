"""LoKr: Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation (Yeh, Hsieh,
Gao, Yang, Oh and Gong, 2023, arXiv:2309.14859), LyCORIS's low-rank Kronecker product (after KronA, Edalati et
al. 2022, arXiv:2212.10650), as PEFT's LOKR applies it.

A frozen linear W0 (out, in) gets an update that is the Kronecker product of two matrices w1 (by default the
smaller) and w2, each either a full matrix or a rank-r product:

    y = W0 x + b + ΔW x,    ΔW = (w1 ⊗ w2) · s,    s = alpha / r,
    w1: (out_l, in_m) = lokr_w1, or lokr_w1_a (out_l, r) @ lokr_w1_b (r, in_m)
    w2: (out_k, in_n) = lokr_w2, or lokr_w2_a (out_k, r) @ lokr_w2_b (r, in_n)

with out = out_l·out_k and in = in_m·in_n split by PEFT's (LyCORIS's) `factorization(dim, decompose_factor)`:
decompose_factor f > 0 dividing dim gives (f, dim / f); otherwise the divisor pair (m <= n) of dim nearest
its square root, with m at most f when f > 0. Which factor is low-rank is PEFT's rule: w2 is a product when
r < max(out_k, in_n) / 2, w1 only with decompose_both and r < max(out_l, in_m) / 2; a full factor ignores r
(but s = alpha / r still scales ΔW).

PEFT's init (init_weights=True): w1 (or w1_a) zero, w1_b, w2 (or w2_a, w2_b) Kaiming-uniform (a = √5), so
ΔW = 0 ⊗ w2 = 0 exactly; "lycoris": w1's factors Kaiming and w2 (or w2_b) zero, w2_a Kaiming, also ΔW = 0;
False: every factor Kaiming (PEFT's testing switch). Kaiming draws come in PEFT's order (w1 / w1_a, w1_b,
then w2 / w2_a, w2_b), so the same seed gives PEFT's factors. Several named adapters active in one module add
their ΔW x. Merging folds it into the weight, W0 <- W0 + ΔW, and unmerging subtracts it (FactoredLinear's,
shared with LoHa).

Which modules: PEFT takes LoRA's defaults per family (TRANSFORMERS_MODELS_TO_LOKR_TARGET_MODULES_MAPPING
is a copy of LoRA's, as LoHa's is): q_proj, v_proj on every family here; PEFT has none for Phi-3 (ours:
qkv_proj) and Qwen3-MoE (ours: Qwen3's); loha.DEFAULT_TARGETS holds these. Targets are a list of names, one
regex (full match) or "all-linear"; `layers` is layers_to_transform. The file keys are PEFT's:
"base_model.model." + module name + ".lokr_w1" (or ".lokr_w1_a", ".lokr_w1_b") and ".lokr_w2" (or
".lokr_w2_a", ".lokr_w2_b"); which of them a module holds follows from r and the options above.

Left out, which PEFT has: Conv1d/Conv2d targets and use_effective_conv2d (the lokr_t2 core), rank_dropout and
module_dropout (only 0 is accepted; rank_dropout_scale, which only scales a rank dropout, is kept in the config
and written back but changes nothing), rank_pattern / alpha_pattern, exclude_modules, modules_to_save,
layers_pattern, and folding into a 4-bit base. PEFT forms ΔW and runs one extra matmul, as here; the factored
product ΔW x = vec(w1 X w2ᵀ) · s with X = x reshaped (in_m, in_n), cheaper for large layers, is left out too.

Dimensions: in/out features of the adapted linear, r rank, (out_l, out_k) and (in_m, in_n) their factor pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..argtypes import COUNT, POSITIVE, checked
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
from .loha import DEFAULT_TARGETS
from .peft_format import CONFIG_FILE, PREFIX, AdapterError, check_fields, match_factors, refuse_unsupported

__all__ = ["LoKrConfig", "LoKrLinear", "apply_lokr", "factorization", "factor_shapes", "to_peft", "load_peft"]

FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
INITS = (True, False, "lycoris")
# The factors each init_weights sets to zero (the rest are Kaiming-uniform): w1 for True, w2 for "lycoris".
_ZERO = {True: ("lokr_w1", "lokr_w1_a"), False: (), "lycoris": ("lokr_w2", "lokr_w2_b")}
DECOMPOSE_FACTOR = checked(int, lambda v: v == -1 or v >= 1, "-1 or >= 1")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m·n = dimension: LyCORIS's (and PEFT's) rule, step for step. factor > 0 dividing dimension:
    (factor, dimension / factor), in that order; otherwise walk m up the divisors while m < n (and, for
    factor > 0, while m <= factor), then order the pair m <= n: the pair nearest the square root, or nearest
    factor from below. factorization(72) = (8, 9), (72, 5) = (4, 18), (128, 4) = (4, 32), (127) = (1, 127)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n  # LyCORIS's bound, the first pair's sum: no later pair exceeds it (m's bounds end the walk)
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def factor_shapes(out_features: int, in_features: int, r: int, decompose_both: bool = False,
                  decompose_factor: int = -1) -> dict[str, tuple[int, int]]:
    """The factors a linear (out, in) holds, factor -> shape, in PEFT's order of creation and of draws."""
    out_l, out_k = factorization(out_features, decompose_factor)
    in_m, in_n = factorization(in_features, decompose_factor)
    shapes = {}
    if decompose_both and r < max(out_l, in_m) / 2:
        shapes.update(lokr_w1_a=(out_l, r), lokr_w1_b=(r, in_m))
    else:
        shapes["lokr_w1"] = (out_l, in_m)
    if r < max(out_k, in_n) / 2:
        shapes.update(lokr_w2_a=(out_k, r), lokr_w2_b=(r, in_n))
    else:
        shapes["lokr_w2"] = (out_k, in_n)
    return shapes


@dataclass
class LoKrConfig:
    """Rank, alpha, the Kronecker split and which linears carry the update. targets None means PEFT's
    default for the model family, filled in by `resolve` when the adapter is attached."""

    peft_type: ClassVar[str] = "LOKR"

    r: int = 8
    alpha: float = 8  # PEFT's default: s = alpha / r = 1
    targets: list[str] | str | None = None  # names (suffix match), one regex (full match), "all-linear"
    init_weights: bool | str = True  # True: w1 = 0; "lycoris": w2 = 0; False: all random (PEFT's testing switch)
    decompose_both: bool = False  # w1 a rank-r product too, where r is small enough
    decompose_factor: int = -1  # -1: factor pairs near the square root; f > 0: (f, dim / f) where f divides dim
    rank_dropout_scale: bool = False  # PEFT's; only scales rank_dropout, which is 0 here: recorded, inert
    layers: list[int] | None = None  # only these decoder layers (PEFT's layers_to_transform)

    def __post_init__(self):
        if isinstance(self.targets, (tuple, set)):
            self.targets = sorted(self.targets)
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"LoKr rank r must be a positive integer, found {self.r!r}")
        if not any(self.init_weights is v or (isinstance(v, str) and self.init_weights == v) for v in INITS):
            raise ValueError(f"LoKr init_weights must be True, False or 'lycoris', found {self.init_weights!r}")
        f = self.decompose_factor
        if not isinstance(f, int) or isinstance(f, bool) or not (f == -1 or f >= 1):
            raise ValueError(f"LoKr decompose_factor must be -1 or a positive integer, found {f!r}")
        if not isinstance(self.decompose_both, bool):
            raise ValueError(f"LoKr decompose_both must be True or False, found {self.decompose_both!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def resolve(self, model_type: str) -> LoKrConfig:
        targets = DEFAULT_TARGETS.get(model_type, ["q_proj", "v_proj"]) if self.targets is None else self.targets
        return dc_replace(self, targets=list(targets) if isinstance(targets, list) else targets)

    def shapes(self, module: nn.Module) -> dict[str, tuple[int, int]]:
        return factor_shapes(module.out_features, module.in_features, self.r, self.decompose_both,
                             self.decompose_factor)


class LoKrLinear(FactoredLinear):
    """LoKr on an nn.Linear (W0 shared as `weight`, b as `bias`, so base keys do not move) or on a 4-bit
    `Linear4bit` (held as `base_layer`; its adapter runs, merging into it is refused). Forward, merging and
    the adapter bookkeeping are FactoredLinear's (shared with LoHa); each adapter holds w1 or w1_a, w1_b and
    w2 or w2_a, w2_b."""

    FACTORS = FACTORS
    method = "LoKr"

    def __init__(self, base: nn.Linear | Linear4bit):
        super().__init__(base)
        self.lokr_w1 = nn.ParameterDict()  # name -> (out_l, in_m)
        self.lokr_w1_a = nn.ParameterDict()  # name -> (out_l, r)
        self.lokr_w1_b = nn.ParameterDict()  # name -> (r, in_m)
        self.lokr_w2 = nn.ParameterDict()  # name -> (out_k, in_n)
        self.lokr_w2_a = nn.ParameterDict()  # name -> (out_k, r)
        self.lokr_w2_b = nn.ParameterDict()  # name -> (r, in_n)

    def add(self, name: str, shapes: dict[str, tuple[int, int]], scaling: float, init_weights: bool | str = True):
        """Create the factors of `shapes` (factor_shapes'), zero or Kaiming-uniform as init_weights says, in
        PEFT's order of draws."""
        zero = _ZERO[init_weights if isinstance(init_weights, str) else bool(init_weights)]
        for f, shape in shapes.items():
            p = torch.empty(shape, **self.factory())
            if f in zero:
                nn.init.zeros_(p)  # w1 = 0 (True) or w2 = 0 ("lycoris"): ΔW = 0, the identity at init
            else:
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            getattr(self, f)[name] = nn.Parameter(p)
        self.scaling[name] = scaling

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = (w1 ⊗ w2) · s: (out_l, in_m) ⊗ (out_k, in_n) -> (out_l·out_k, in_m·in_n) = (out, in)."""
        w1 = self.lokr_w1[name] if name in self.lokr_w1 else self.lokr_w1_a[name] @ self.lokr_w1_b[name]
        w2 = self.lokr_w2[name] if name in self.lokr_w2 else self.lokr_w2_a[name] @ self.lokr_w2_b[name]
        return torch.kron(w1, w2.contiguous()) * self.scaling[name]


# -- attaching adapters to a model -----------------------------------------------------------------

def _attach(model: nn.Module, plan: list[str], adapter_name: str, config: LoKrConfig) -> dict[str, LoKrLinear]:
    layers = {}
    for name in plan:
        module = model.get_submodule(name)
        if not isinstance(module, LoKrLinear):
            module = LoKrLinear(module)
            model.set_submodule(name, module)
        module.add(adapter_name, config.shapes(module), config.scaling, config.init_weights)
        layers[name] = module
    return layers


def apply_lokr(model: nn.Module, r: int = 8, alpha: float = 8, targets=None, init_weights: bool | str = True,
               decompose_both: bool = False, decompose_factor: int = -1, rank_dropout_scale: bool = False,
               layers=None, adapter_name: str = "default", verbose: bool = True,
               config: LoKrConfig | None = None) -> nn.Module:
    """Attach a LoKr adapter named `adapter_name` (ΔW = 0 unless init_weights=False), make it the active
    one, and freeze everything else. targets None: PEFT's defaults for the family (q_proj, v_proj). Every
    name in a list of targets must select a linear, and everything they select must be one; checked before
    the model changes. Returns the model (changed in place); prints the trainable parameter count when verbose.
    """
    config = (config or LoKrConfig(r=r, alpha=alpha, targets=targets, init_weights=init_weights,
                                   decompose_both=decompose_both, decompose_factor=decompose_factor,
                                   rank_dropout_scale=rank_dropout_scale, layers=layers)
              ).resolve(model.config.model_type)
    if adapter_name in adapter_configs(model):
        raise ValueError(f"an adapter named {adapter_name!r} already exists; delete it or pick another name")
    plan = plan_or_refuse(model, config, LoKrLinear, "LoKr")
    _attach(model, plan, adapter_name, config)
    register_config(model, adapter_name, config)
    set_adapter(model, adapter_name)
    if verbose:
        report(model, f"LoKr '{adapter_name}': {len(plan)} modules, r={config.r}, alpha={config.alpha}")
    return model


# -- PEFT adapter folders (the registry dispatches here on peft_type "LOKR") ------------------------------

# PEFT options minicustom does not implement: (field, the value that means "off").
_UNSUPPORTED = (("rank_dropout", 0), ("module_dropout", 0), ("use_effective_conv2d", False),
                ("rank_pattern", {}), ("alpha_pattern", {}), ("exclude_modules", None), ("modules_to_save", None),
                ("layers_pattern", None))
_FIELDS = {"r": "positive int", "alpha": "number", "target_modules": "names", "init_weights": "bool or str",
           "decompose_both": "bool", "rank_dropout_scale": "bool", "layers_to_transform": "layers",
           "rank_dropout": "dropout", "module_dropout": "dropout", "use_effective_conv2d": "bool",
           "rank_pattern": "ranks", "alpha_pattern": "numbers", "exclude_modules": "names",
           "modules_to_save": "name list"}


def to_peft(model: nn.Module, adapter_name: str):
    """(adapter_config.json as PEFT writes it for LOKR, tensors, no extra files). Merged or not, the
    factors are what is saved."""
    config = adapter_configs(model)[adapter_name]
    state = {f"{PREFIX}{name}.{k}": t for name, layer in model.named_modules()
             if isinstance(layer, LoKrLinear) and adapter_name in layer.adapters
             for k, t in layer.adapter_state(adapter_name).items()}
    return {
        "peft_type": "LOKR", "task_type": "CAUSAL_LM", "r": config.r, "alpha": config.alpha,
        "rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False,
        "decompose_both": config.decompose_both, "decompose_factor": config.decompose_factor,
        "rank_dropout_scale": config.rank_dropout_scale, "target_modules": config.targets, "exclude_modules": None,
        "init_weights": config.init_weights, "layers_to_transform": config.layers, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "inference_mode": True,
        "auto_mapping": None, "base_model_name_or_path": None, "revision": None,
    }, state, {}


def _config_of(peft: dict, where: Path, model_type: str) -> LoKrConfig:
    """The LoKrConfig of a LOKR adapter_config.json, or an AdapterError naming the field."""
    check_fields(peft, where, _FIELDS)
    refuse_unsupported(peft, where, _UNSUPPORTED, "LoKr")
    init, factor = peft.get("init_weights"), peft.get("decompose_factor")
    if isinstance(init, str) and init != "lycoris":
        raise AdapterError(f"{where}: field 'init_weights' must be true, false or \"lycoris\", found {init!r}")
    if factor is not None and (type(factor) is not int or not (factor == -1 or factor >= 1)):
        raise AdapterError(f"{where}: field 'decompose_factor' must be -1 or a positive integer, found {factor!r}")
    return LoKrConfig(r=peft.get("r") or 8, alpha=8 if peft.get("alpha") is None else peft["alpha"],
                      targets=peft.get("target_modules"), init_weights=True if init is None else init,
                      decompose_both=peft.get("decompose_both") is True,
                      decompose_factor=-1 if factor is None else factor,
                      rank_dropout_scale=peft.get("rank_dropout_scale") is True,
                      layers=peft.get("layers_to_transform")).resolve(model_type)


def load_peft(model: nn.Module, path: Path, peft: dict, tensors: dict, adapter_name: str):
    """Attach PEFT's LOKR folder: every targeted linear must have the factors that r, decompose_both and
    decompose_factor give it, of the right shapes, and every key must belong to a targeted linear; all of it
    is checked before the model changes."""
    where = path / CONFIG_FILE
    config = _config_of(peft, where, model.config.model_type)
    plan, problems = plan_linears(model, config, LoKrLinear, "LoKr")
    if problems or not plan:
        raise AdapterError(f"{where}: target_modules {config.targets!r}: " + (
            "; ".join(problems) or "select no module of this model"))
    modules = dict(model.named_modules())
    shapes = {n: config.shapes(modules[n]) for n in plan}
    wrong = [f"{k} ({n} holds {', '.join(shapes[n])} for r={config.r}, decompose_both={config.decompose_both}, "
             f"decompose_factor={config.decompose_factor})"
             for k in sorted(tensors) for n, _, f in [k.removeprefix(PREFIX).rpartition(".")]
             if k.startswith(PREFIX) and n in shapes and f in FACTORS and f not in shapes[n]]
    if wrong:  # a full factor where PEFT's rule says a product, or the other way round: other options wrote it
        raise AdapterError(f"{path}: {len(wrong)} keys are factors these options do not give: "
                           + ", ".join(wrong[:20]))
    expected = {f: {n: s[f] for n, s in shapes.items() if f in s} for f in FACTORS}
    found = match_factors(path, tensors, {f: e for f, e in expected.items() if e}, modules, "LoKr", config.targets)

    # Checked: now change the model.
    layers = _attach(model, plan, adapter_name, config)
    with torch.no_grad():
        for f, by_name in found.items():
            for name, t in by_name.items():
                getattr(layers[name], f)[adapter_name].copy_(t)
    register_config(model, adapter_name, config)


LOKR = Method("lokr", lambda model, r=8, alpha=8.0, targets=None, decompose_both=False, decompose_factor=-1:
              apply_lokr(model, r=r, alpha=alpha, targets=targets, decompose_both=decompose_both,
                         decompose_factor=decompose_factor),
              "LoKr: a Kronecker product of two (low-rank) factors beside each frozen linear", lr=1e-3,
              mergeable=True, peft_type="LOKR", options=(
                  Option("r", 8, "rank r of each low-rank factor", type=COUNT),
                  Option("alpha", 8.0, "LoKr alpha: the update is scaled by alpha / r (PEFT's default 8)",
                         type=POSITIVE),
                  Option("targets", None, "modules to adapt: all-linear, or names separated by commas (LoKr "
                                          "without it: PEFT's for the family, q_proj,v_proj)", type=targets_option),
                  Option("decompose_both", False, "LoKr: w1, the Kronecker product's left factor, low-rank too "
                                                  "where r < half its largest side", flag=True),
                  Option("decompose_factor", -1, "LoKr: split each dimension as (f, dim / f) where f divides it "
                                                 "(-1: the factor pair nearest its square root)",
                         type=DECOMPOSE_FACTOR)),
              to_peft=to_peft, load_peft=load_peft)
