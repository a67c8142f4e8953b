"""OFT: Controlling Text-to-Image Diffusion by Orthogonal Finetuning (Qiu, Liu, Feng, Xiao, Heng, Tenenbaum,
Weller and Schölkopf, 2023, arXiv:2306.07280), as PEFT 0.21's OFT computes it (the parametrisation of 2025:
a packed skew-symmetric Q per block, Cayley or its Neumann series, the input rotated).

A frozen linear W0 (out, in) keeps its weights; its *input* is rotated by a block-diagonal orthogonal R, which
keeps the angles between W0's neurons (the paper's hyperspherical energy). With x a row vector, as PEFT writes it:

    y = (x R) W0ᵀ + b = x (W0 Rᵀ)ᵀ + b,    R = diag(R_1, ..., R_nb),    R_i: (bs, bs),    nb · bs = in

so the merged weight is W' = W0 Rᵀ (the paper's W = R W0 in its (in, out) layout). Each block comes from a
skew-symmetric Q_i = U_i - U_iᵀ, U_i strictly upper triangular holding the bs(bs-1)/2 numbers of oft_R.weight[i]
row by row, by Cayley's transform, as PEFT's two paths compute it:

    use_cayley_neumann=False:  R_i = (I - Q_i)(I + Q_i)⁻¹                        (exactly orthogonal)
    use_cayley_neumann=True:   R_i = I + 2 Q_i + 2 Q_i² + ... + 2 Q_iⁿ⁻² + Q_iⁿ⁻¹   (n = num_cayley_neumann_terms ≥ 4;
                               PEFT's loop gives n = 3 the terms of n = 4, n = 2: I + 2 Q_i, n = 1: I)

The series is that of (I + Q_i)(I - Q_i)⁻¹, the inverse of the exact path's R_i: for the same Q PEFT's two
paths rotate opposite ways (both reproduced). The series is only nearly orthogonal (error ~ |Q|ⁿ).

PEFT's init (init_weights=True): oft_R.weight = 0, so Q = 0, R = I exactly and the model is unchanged at step 0;
init_weights=False draws N(0, 0.1²) (a test setting in PEFT). COFT (coft=True, the paper's constrained OFT):
before each use, every block's Q_i is projected in place (no gradient) onto ‖Q_i‖_F ≤ eps / √(rows of
oft_R.weight), Q_i <- eps' Q_i / ‖Q_i‖_F where larger (PEFT's _project_batch). block_share: one Q for every
block (oft_R.weight has one row). Several named adapters active in one module rotate in turn, x R_a R_b.
Merging: W0 <- W0 Rᵀ block by block; unmerging solves W Rᵀ = W' for W (Rᵀ's inverse is R for the exact Cayley
R, and the series is inverted as PEFT does), W0 within float error. Rotations do not commute, so a layer merges
one OFT adapter at a time: merging while another of its adapters is active or merged is refused.

Which modules: PEFT takes LoRA's defaults per family (TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING):
q_proj, v_proj on every family here; PEFT has none for Phi-3 (ours: qkv_proj) and Qwen3-MoE (ours: Qwen3's).
Targets and `layers` (layers_to_transform) as in loha.py. Block size: exactly one of r (blocks per module)
and oft_block_size (their size); r · oft_block_size = in_features. PEFT's default is oft_block_size = 32, and
where a size does not divide in_features PEFT moves it to the nearest divisor (adjust_oft_parameters) with a
warning. Here a size given that does not divide is an error naming the module and its features; PEFT's
adjustment applies only to the default (oft_block_size None) and to folders, which PEFT wrote that way. The
file key is PEFT's: "base_model.model." + module name + ".oft_R.weight", shape (nb, or 1 with block_share, n).

Left out, which PEFT has: Conv2d and Embedding targets, module_dropout (only 0 is accepted: PEFT 0.21 builds
its MultiplicativeDropoutLayer but never calls it on a Linear), bias "all" / "oft_only", fan_in_fan_out,
exclude_modules, modules_to_save, layers_pattern, safe_merge and folding into a 4-bit base.

Dimensions: in/out features of the adapted linear, nb blocks (PEFT's r), bs block size, n = bs(bs-1)/2.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..argtypes import COUNT
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
from .peft_format import CONFIG_FILE, PREFIX, AdapterError, check_fields, match_keys, refuse_unsupported

__all__ = ["OFTConfig", "OFTRotation", "OFTLinear", "apply_oft", "to_peft", "load_peft"]

# PEFT's TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING (LoRA's) for our families; phi3, qwen3_moe: ours.
DEFAULT_TARGETS = {"phi3": ["qkv_proj"]}
_QV = ["q_proj", "v_proj"]
PEFT_BLOCK_SIZE = 32  # OFTConfig.oft_block_size's default
KEY = "oft_R.weight"


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


@dataclass
class OFTConfig:
    """Blocks, rotation and which linears are rotated. targets None means PEFT's default for the model family,
    and oft_block_size None (with r 0) PEFT's 32, both filled in by `resolve` when the adapter is attached."""

    peft_type: ClassVar[str] = "OFT"

    r: int = 0  # blocks per module (PEFT's r); 0: oft_block_size sets them
    oft_block_size: int | None = None  # block size; None: PEFT's 32, adjusted where it does not divide
    targets: list[str] | str | None = None  # names (suffix match), one regex (full match), "all-linear"
    coft: bool = False  # constrained OFT: ‖Q_i‖_F ≤ eps / √nb
    eps: float = 6e-5
    block_share: bool = False  # one Q for every block of a module
    use_cayley_neumann: bool = True  # PEFT's default: the series; False: the exact Cayley transform
    num_cayley_neumann_terms: int = 5
    module_dropout: float = 0.0  # only 0 (left out)
    bias: str = "none"  # only "none" (left out)
    init_weights: bool = True  # False: Q ~ N(0, 0.1²), so R != I at init (PEFT's testing switch)
    layers: list[int] | None = None  # only these decoder layers (PEFT's layers_to_transform)
    adjust: bool = False  # a size that does not divide in_features moves to PEFT's nearest divisor (not an error)

    def __post_init__(self):
        if isinstance(self.targets, (tuple, set)):
            self.targets = sorted(self.targets)
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        bs = self.oft_block_size
        if not (self.r == 0 or _positive_int(self.r)) or not (bs is None or bs == 0 or _positive_int(bs)):
            raise ValueError(f"OFT r and oft_block_size must be positive integers (0 or None: not set), found "
                             f"r={self.r!r}, oft_block_size={bs!r}")
        if self.r and bs:
            raise ValueError(f"OFT takes r (blocks per module) or oft_block_size (their size), not both "
                             f"(r × oft_block_size = in_features); found r={self.r}, oft_block_size={bs}")
        if not self.r and bs == 0:
            raise ValueError("OFT needs r (blocks per module) or oft_block_size (their size); both are 0")
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"OFT eps (COFT's radius) must be a positive number, found {self.eps!r}")
        if not _positive_int(self.num_cayley_neumann_terms):
            raise ValueError(f"OFT num_cayley_neumann_terms must be a positive integer, found "
                             f"{self.num_cayley_neumann_terms!r}")
        if self.module_dropout != 0:
            raise ValueError(f"OFT module_dropout={self.module_dropout!r} is not supported (only 0: PEFT 0.21 "
                             "never applies it on a Linear)")
        if self.bias != "none":
            raise ValueError(f"OFT bias={self.bias!r} is not supported (only 'none': the base bias stays frozen)")

    def resolve(self, model_type: str) -> OFTConfig:
        targets = DEFAULT_TARGETS.get(model_type, _QV) if self.targets is None else self.targets
        default = not self.r and self.oft_block_size is None
        return dc_replace(self, targets=list(targets) if isinstance(targets, list) else targets,
                          oft_block_size=PEFT_BLOCK_SIZE if default else self.oft_block_size or 0,
                          adjust=self.adjust or default)

    def block_size(self, in_features: int) -> int | None:
        """The block size on a linear of `in_features` (None: the size given does not divide it)."""
        size = in_features // self.r if self.r else self.oft_block_size
        given = self.r or self.oft_block_size
        if in_features % given == 0 and given <= in_features:
            return size
        if not self.adjust:
            return None
        near = _nearest_divisor(in_features, given)
        return in_features // near if self.r else near


def _nearest_divisor(n: int, k: int) -> int:
    """PEFT's adjust_oft_parameters: the divisor of n nearest k (the lower one on a tie); n if k > n."""
    if k >= n:
        return n
    higher = k
    while higher <= n and n % higher:
        higher += 1
    lower = k
    while lower > 1 and n % lower:
        lower -= 1
    return lower if k - lower <= higher - k else higher


class OFTRotation(nn.Module):
    """One adapter's rotation of one module: `weight` (nb, or 1 with block_share, n) packs each block's Q."""

    def __init__(self, blocks: int, block_size: int, config: OFTConfig, **factory):
        super().__init__()
        self.blocks, self.block_size = blocks, block_size  # nb · bs = in
        self.coft, self.eps, self.block_share = config.coft, config.eps, config.block_share
        self.terms = config.num_cayley_neumann_terms if config.use_cayley_neumann else 0  # 0: exact Cayley
        n = block_size * (block_size - 1) // 2
        self.weight = nn.Parameter(torch.zeros(1 if config.block_share else blocks, n, **factory))
        if not config.init_weights:
            nn.init.normal_(self.weight, mean=0.0, std=0.1)
        rows, cols = torch.triu_indices(block_size, block_size, 1, device=self.weight.device)
        self.register_buffer("rows", rows, persistent=False)  # U's entries, row by row
        self.register_buffer("cols", cols, persistent=False)

    def skew(self, vec: torch.Tensor) -> torch.Tensor:
        """Q = U - Uᵀ: (k, n) -> (k, bs, bs)."""
        u = vec.new_zeros(vec.shape[0], self.block_size, self.block_size)
        u[:, self.rows, self.cols] = vec
        return u - u.transpose(-2, -1)

    @torch.no_grad()
    def project(self):
        """COFT: each Q_i onto the Frobenius ball of radius eps / √k, in place (PEFT's _project_batch)."""
        q = self.skew(self.weight)  # (k, bs, bs)
        eps = self.eps / torch.tensor(float(q.shape[0]), device=q.device).sqrt()
        norm = torch.linalg.matrix_norm(q, keepdim=True)  # (k, 1, 1)
        q = torch.where(norm <= eps, q, eps * (q / norm))
        self.weight.copy_(q[:, self.rows, self.cols])

    def blocks_r(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """R_1 ... R_nb: (nb, bs, bs), in `dtype` (default the weight's); projects Q first under COFT."""
        if self.coft:
            self.project()
        q = self.skew(self.weight if dtype is None else self.weight.to(dtype))  # (k, bs, bs)
        eye = torch.eye(self.block_size, device=q.device, dtype=q.dtype)
        if self.terms == 0:  # R (I + Q) = I - Q, solved in fp32 at least (linalg.solve takes no half)
            wide = torch.promote_types(q.dtype, torch.float32)
            eye, qw = eye.to(wide), q.to(wide)
            r = torch.linalg.solve(eye + qw, eye - qw, left=False).to(q.dtype)
        else:  # PEFT's loop, term by term: I + 2Q + 2Q² + ... + Qⁿ⁻¹
            r = eye.expand_as(q)
            if self.terms > 1:
                r = r + 2.0 * q
            if self.terms > 2:
                power = torch.bmm(q, q)  # (k, bs, bs)
                r = r + 2.0 * power
                for _ in range(3, self.terms - 1):
                    power = torch.bmm(power, q)
                    r = r + 2.0 * power
                r = r + torch.bmm(power, q)
        return r.expand(self.blocks, -1, -1) if self.block_share else r  # (nb, bs, bs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x R: (..., in) -> (..., nb, bs), each block times its R_i -> (..., in)."""
        h = x.to(self.weight.dtype)
        r = self.blocks_r()  # (nb, bs, bs)
        h = h.reshape(*h.shape[:-1], self.blocks, self.block_size)  # (..., nb, bs)
        h = torch.einsum("...rk,rkc->...rc", h, r)  # (..., nb, bs) @ (nb, bs, bs) -> (..., nb, bs)
        return h.reshape(*x.shape).to(x.dtype)  # (..., in)

    def extra_repr(self) -> str:
        cayley = f"cayley_neumann_terms={self.terms}" if self.terms else "exact cayley"
        return (f"blocks={self.blocks}, block_size={self.block_size}, {cayley}, coft={self.coft}, "
                f"block_share={self.block_share}")


class OFTLinear(LinearAdapterLayer):
    """OFT on an nn.Linear (W0 shared as `weight`, b as `bias`, so base keys do not move) or on a 4-bit
    `Linear4bit` (held as `base_layer`; its input is rotated, merging into it is refused)."""

    def __init__(self, base: nn.Linear | Linear4bit):
        super().__init__()
        self.hold(base)
        self.oft_R = nn.ModuleDict()  # name -> OFTRotation
        self.active: list[str] = []
        self.merged: dict[str, None] = {}

    def add(self, name: str, block_size: int, config: OFTConfig):
        self.oft_R[name] = OFTRotation(self.in_features // block_size, block_size, config, **self.factory())

    def forward(self, x):
        h = x
        for name in self.active:
            if name not in self.merged:
                h = self.oft_R[name](h)  # x R_a R_b ...
        return self.base_forward(h).to(x.dtype)

    @property
    def mergeable(self) -> bool:
        """One OFT adapter per layer merges at a time (rotations do not commute): see `merge`."""
        return len({*self.active, *self.merged}) <= 1

    def _blocks_r(self, name: str) -> torch.Tensor:
        return self.oft_R[name].blocks_r(torch.promote_types(self.weight.dtype, torch.float32))  # (nb, bs, bs)

    @torch.no_grad()
    def merge(self, name: str):
        if name in self.merged:
            return
        if self.base_layer is not None:
            raise ValueError("the base is 4-bit and cannot take OFT's rotation in place (qlora.merge_4bit folds LoRA "
                             "only); keep the adapter unmerged, or load the base in full precision to merge")
        if others := sorted({*self.active, *self.merged} - {name}):
            raise ValueError(f"OFT rotations do not commute: merging {name!r} into a layer that also applies "
                             f"{others} would reorder them; merge one OFT adapter at a time (set_adapter to it alone)")
        r = self._blocks_r(name)  # (nb, bs, bs)
        w = self.weight.to(r.dtype).unflatten(1, (r.shape[0], -1))  # (out, nb, bs)
        merged = torch.einsum("obk,bck->obc", w, r)  # W0_b R_bᵀ: (out, nb, bs) @ (nb, bs, bs)ᵀ -> (out, nb, bs)
        self.weight.copy_(merged.flatten(1))  # (out, in)
        self.merged[name] = None

    @torch.no_grad()
    def unmerge(self, name: str):
        if name in self.merged:
            del self.merged[name]
            r = self._blocks_r(name)  # (nb, bs, bs)
            w = self.weight.to(r.dtype).unflatten(1, (r.shape[0], -1)).transpose(0, 1)  # (nb, out, bs)
            w0 = torch.linalg.solve(r.transpose(-2, -1), w, left=False)  # W0_b R_bᵀ = W_b -> W0_b (nb, out, bs)
            self.weight.copy_(w0.transpose(0, 1).flatten(1))  # (out, in)

    def delete(self, name: str):
        if name in self.merged:
            raise ValueError(f"adapter {name!r} is merged into the weights; unmerge it before deleting it")
        if name in self.oft_R:
            del self.oft_R[name]
        self.active = [a for a in self.active if a != name]

    @property
    def adapters(self) -> list[str]:
        return list(self.oft_R)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return {KEY: self.oft_R[name].weight}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={self.adapters}"


# -- attaching adapters to a model -----------------------------------------------------------------

def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def _plan(model: nn.Module, config: OFTConfig) -> tuple[dict[str, int], list[str]]:
    """({name of a targeted linear: its block size}, [problems]); changes nothing."""
    plan, problems = {}, []
    for name in find_targets(model, config.targets, config.layers):
        module = model.get_submodule(name)
        if isinstance(module, OFTLinear) and module.merged:
            problems.append(f"{name} has adapter {list(module.merged)} merged; unmerge it before adding another")
        elif isinstance(module, AdapterLayer) and not isinstance(module, OFTLinear):
            problems.append(f"{name} already carries a {type(module).__name__}; OFT cannot be stacked on it")
        elif not linear_like(module):
            problems.append(f"{name} is a {type(module).__name__}; OFT targets nn.Linear (Conv and Embedding "
                            "layers are left out)")
        elif (size := config.block_size(module.in_features)) is None:
            given = f"r={config.r} blocks" if config.r else f"oft_block_size={config.oft_block_size}"
            problems.append(f"{name} has in_features {module.in_features}, which {given} does not divide "
                            f"(r × oft_block_size = in_features; its divisors: {_divisors(module.in_features)})")
        else:
            plan[name] = size
    return plan, problems


def _linear_names(model: nn.Module) -> str:
    return ", ".join(sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if linear_like(m)}))


def _attach(model: nn.Module, plan: dict[str, int], adapter_name: str, config: OFTConfig) -> dict[str, OFTLinear]:
    layers = {}
    for name, size in plan.items():
        module = model.get_submodule(name)
        if not isinstance(module, OFTLinear):
            module = OFTLinear(module)
            model.set_submodule(name, module)
        module.add(adapter_name, size, config)
        layers[name] = module
    return layers


def apply_oft(model: nn.Module, r: int = 0, oft_block_size: int | None = None, targets=None, coft: bool = False,
              eps: float = 6e-5, block_share: bool = False, use_cayley_neumann: bool = True,
              num_cayley_neumann_terms: int = 5, module_dropout: float = 0.0, bias: str = "none",
              init_weights: bool = True, layers=None, adapter_name: str = "default", verbose: bool = True,
              config: OFTConfig | None = None) -> nn.Module:
    """Attach an OFT adapter named `adapter_name` (R = I unless init_weights=False), make it the active one,
    and freeze everything else. r (blocks) or oft_block_size (their size), not both; neither: PEFT's 32.
    targets None: PEFT's defaults for the family (q_proj, v_proj). Every name in a list of targets must
    select a linear whose in_features the blocks divide; checked before the model changes. Returns the model
    (changed in place); prints the trainable parameter count when verbose."""
    config = (config or OFTConfig(
        r=r, oft_block_size=oft_block_size, targets=targets, coft=coft, eps=eps, block_share=block_share,
        use_cayley_neumann=use_cayley_neumann, num_cayley_neumann_terms=num_cayley_neumann_terms,
        module_dropout=module_dropout, bias=bias, init_weights=init_weights, layers=layers,
    )).resolve(model.config.model_type)
    if adapter_name in adapter_configs(model):
        raise ValueError(f"an adapter named {adapter_name!r} already exists; delete it or pick another name")
    plan, problems = _plan(model, config)
    if isinstance(config.targets, list):
        problems += [f"target {t!r} matches no module" for t in config.targets
                     if not find_targets(model, [t], config.layers)]
    if not plan and not problems:
        problems.append(f"targets {config.targets!r} match no module")
    if problems:  # one line: the first problem, and how many more
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"cannot attach OFT: {problems[0]}{more}; linear modules here are named "
                         f"{_linear_names(model)}")
    _attach(model, plan, adapter_name, config)
    register_config(model, adapter_name, config)
    set_adapter(model, adapter_name)
    if verbose:
        sizes = ", ".join(str(s) for s in sorted(set(plan.values())))
        report(model, f"OFT '{adapter_name}': {len(plan)} modules, block size {sizes}")
    return model


# -- PEFT adapter folders (the registry dispatches here on peft_type "OFT") ------------------------------

# PEFT options minicustom does not implement: (field, the value that means "off").
_UNSUPPORTED = (("module_dropout", 0), ("bias", "none"), ("fan_in_fan_out", False), ("exclude_modules", None),
                ("modules_to_save", None), ("layers_pattern", None))
_FIELDS = {"target_modules": "names", "init_weights": "bool",
           "layers_to_transform": "layers", "module_dropout": "dropout", "coft": "bool", "eps": "number",
           "block_share": "bool", "use_cayley_neumann": "bool", "num_cayley_neumann_terms": "positive int",
           "bias": "str", "fan_in_fan_out": "bool", "exclude_modules": "names", "modules_to_save": "name list"}
# The oldest PEFT whose Cayley-Neumann series this is (0.18 changed it; PEFT warns on folders stamped older).
SERIES_SINCE = "0.18.0"


def to_peft(model: nn.Module, adapter_name: str):
    """(adapter_config.json as PEFT writes it for OFT, tensors, no extra files). Merged or not, Q is saved."""
    config = adapter_configs(model)[adapter_name]
    state = {f"{PREFIX}{name}.{k}": t for name, layer in model.named_modules()
             if isinstance(layer, OFTLinear) and adapter_name in layer.adapters
             for k, t in layer.adapter_state(adapter_name).items()}
    return {
        "peft_type": "OFT", "task_type": "CAUSAL_LM", "peft_version": SERIES_SINCE, "r": config.r,
        "oft_block_size": config.oft_block_size, "module_dropout": 0.0, "target_modules": config.targets,
        "fan_in_fan_out": False, "bias": "none", "exclude_modules": None, "init_weights": config.init_weights,
        "layers_to_transform": config.layers, "layers_pattern": None, "modules_to_save": None,
        "coft": config.coft, "eps": config.eps, "block_share": config.block_share,
        "use_cayley_neumann": config.use_cayley_neumann, "num_cayley_neumann_terms": config.num_cayley_neumann_terms,
        "inference_mode": True, "auto_mapping": None, "base_model_name_or_path": None, "revision": None,
    }, state, {}


def _older(version: str, than: str) -> bool:
    def parts(v):
        return tuple(int(p) for p in re.findall(r"\d+", v.partition("@")[0])[:3])
    return parts(version) < parts(than)


def load_peft(model: nn.Module, path: Path, peft: dict, tensors: dict, adapter_name: str):
    """Attach PEFT's OFT folder: every targeted linear must have its oft_R.weight, of the shape its blocks give
    (r or oft_block_size adjusted as PEFT adjusts it), and every key must belong to a targeted linear; all of
    it is checked before the model changes."""
    where = path / CONFIG_FILE
    check_fields(peft, where, _FIELDS)
    for key in ("r", "oft_block_size"):  # 0 is PEFT's "not set"
        if peft.get(key) is not None and not (_positive_int(peft[key]) or peft[key] == 0):
            raise AdapterError(f"{where}: field {key!r} must be an integer >= 0, found {peft[key]!r}")
    if "oft_block_size" not in peft:
        raise AdapterError(f"{where}: no field 'oft_block_size': a folder of PEFT < 0.14's OFT, whose weights "
                           "PEFT itself no longer reads (retrain with PEFT >= 0.18)")
    refuse_unsupported(peft, where, _UNSUPPORTED, "OFT")
    neumann, stamp = peft.get("use_cayley_neumann") is not False, peft.get("peft_version")
    if neumann and _older(stamp or "0.0.0", SERIES_SINCE):  # PEFT, too, reads no stamp as older (and warns)
        said = "no peft_version" if stamp is None else f"peft_version {stamp!r}"
        raise AdapterError(f"{where}: {said} with use_cayley_neumann: PEFT < {SERIES_SINCE} (which wrote no "
                           "peft_version) used another Cayley-Neumann series, which minicustom does not compute")
    r, size = peft.get("r") or 0, peft.get("oft_block_size")
    if bool(r) == bool(size):
        raise AdapterError(f"{where}: exactly one of 'r' and 'oft_block_size' must be non-zero, found r={r!r}, "
                           f"oft_block_size={size!r}")
    try:
        config = OFTConfig(r=r, oft_block_size=size or None, targets=peft.get("target_modules"),
                           coft=bool(peft.get("coft")), eps=6e-5 if peft.get("eps") is None else peft["eps"],
                           block_share=bool(peft.get("block_share")), use_cayley_neumann=neumann,
                           num_cayley_neumann_terms=peft.get("num_cayley_neumann_terms") or 5,
                           init_weights=peft.get("init_weights") is not False,
                           layers=peft.get("layers_to_transform"), adjust=True).resolve(model.config.model_type)
    except ValueError as e:  # eps <= 0, ...
        raise AdapterError(f"{where}: {e}") from None
    plan, problems = _plan(model, config)
    if problems or not plan:
        raise AdapterError(f"{where}: target_modules {config.targets!r}: " + (
            "; ".join(problems) or "select no module of this model"))
    modules = dict(model.named_modules())
    expected = {n: (1 if config.block_share else modules[n].in_features // bs, bs * (bs - 1) // 2)
                for n, bs in plan.items()}
    found = match_keys(path, tensors, "." + KEY, expected, modules, "OFT", "linear", config.targets,
                       shape_note=lambda shape: " (blocks, block size × (block size - 1) / 2)")

    # Checked: now change the model.
    layers = _attach(model, plan, adapter_name, config)
    with torch.no_grad():
        for name, t in found.items():
            layers[name].oft_R[adapter_name].weight.copy_(t)
    register_config(model, adapter_name, config)


def _apply(model, r=None, oft_block_size=None, targets=None, coft=False, block_share=False):
    return apply_oft(model, r=r or 0, oft_block_size=oft_block_size, targets=targets, coft=coft,
                     block_share=block_share)


OFT = Method("oft", _apply, "OFT: a learned block-diagonal rotation of each frozen linear's input", lr=1e-3,
             mergeable=True, peft_type="OFT", options=(
                 Option("r", None, "OFT: blocks per module (r × oft_block_size = in_features; give one of them)",
                        type=COUNT),
                 Option("oft_block_size", None, "OFT block size (without it and --r: PEFT's 32, moved to the "
                                                "nearest divisor of a module's in_features)", type=COUNT),
                 Option("targets", None, "modules to adapt: all-linear, or names separated by commas (OFT "
                                         "without it: PEFT's for the family, q_proj,v_proj)", type=targets_option),
                 Option("coft", False, "constrained OFT: every block's Q within eps of zero", flag=True),
                 Option("block_share", False, "OFT: one rotation block shared by every block of a module",
                        flag=True)),
             to_peft=to_peft, load_peft=load_peft)
